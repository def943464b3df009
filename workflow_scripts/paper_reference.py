"""The paper's reported numbers, as data with their sources, for the figures' optional reference layer.

Every value here is what Yang et al. (2025) report, not something this workflow measured: the figures draw them
grey and dashed, labelled "paper (Yang et al. 2025)", in their own panel by default, and never pool them with
measured points (nor does the fit). Units follow the paper: synthetic tokens in millions, accuracy in percent
(QuALITY closed-book QA, 4,609 questions, Llama 3 8B). Source for all values: the paper (Yang et al., ICLR 2025,
arXiv:2409.07431) as the project's design notes transcribe it; docs/figures.md lists each value's place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CITATION = ('Z. Yang, N. Band, S. Li, E. Candès, T. Hashimoto, "Synthetic continued pretraining", ICLR 2025, '
            "arXiv:2409.07431")
SHORT_LABEL = "paper (Yang et al. 2025)"
MODEL = "Llama 3 8B"
CORPUS = "QuALITY (265 articles, 4,609 questions)"

# Section 6.3 of the paper: y(x) = p - sum_k c_k * r_k^x, x in millions of EntiGraph tokens, y in %.
FIT_ASYMPTOTE = 64.5456
FIT_TERMS: tuple[tuple[float, float], ...] = ((13.8352, 0.9989), (8.4705, 0.8961), (3.932, 0.0546))
FIT_SOURCE = "paper section 6.3 (fitted mixture of exponentials, three terms)"

# The synthetic-token budgets of the paper's scaling curve, in millions (subsets of the 455M corpus).
BUDGETS_MILLIONS: tuple[float, ...] = (
    0.182, 0.3185, 0.455, 0.5915, 0.728, 0.8645, 0.91, 1.1375, 1.82, 2.73, 3.64, 4.55, 5.46, 6.37, 8.19, 9.1,
    13.65, 22.75, 25.025, 29.575, 38.675, 45.5, 68.25, 113.75, 159.25, 191.1, 204.75, 236.6, 250.25, 295.75,
    327.6, 341.25, 373.1, 414.05, 441.35, 450.45, 455.0,
)


HEADLINE_SOURCE = "paper, headline QuALITY closed-book results"

# Which of this workflow's reported numbers (evaluation.report) the paper's values are taken to correspond to. The
# paper does not say; the authors' code (tasks/quality.py performance_stats()) reports accuracy over *attempted*
# questions (unparseable dropped, attempt rate beside it), and their results notebook prints the test split (the
# last 80% of the articles sorted by title). authors_code_notes.md "Closed-book QA". Unverified.
CONVENTION = "dropped"
SPLIT = "test"
CONVENTION_SHORT = "unparseable answers dropped, test split (the authors' code; unverified)"


@dataclass(frozen=True)
class Reported:
    """One reported accuracy: a level (no tokens) or a point at a synthetic-token count."""

    label: str
    accuracy_percent: float
    tokens_millions: float | None  # None: a level drawn as a horizontal line (base, Raw CPT)
    method: str  # base | raw | entigraph | rephrase | qa | api
    source: str
    verified: bool = True


HEADLINE: tuple[Reported, ...] = (
    Reported("Llama 3 8B base", 39.49, None, "base", HEADLINE_SOURCE),
    Reported("Raw CPT (1.3M tokens, 4 epochs)", 38.15, None, "raw", HEADLINE_SOURCE),
    Reported("EntiGraph CPT (455M tokens)", 56.22, 455.0, "entigraph", HEADLINE_SOURCE),
    Reported("Rephrase CPT (~38M tokens)", 43.08, 38.0, "rephrase",
             "paper headline results; unverified: the authors' plotting notebook ends at 46.89 for 33.3M tokens",
             verified=False),
    Reported("QA SFT (~28M tokens)", 52.99, 28.0, "qa", HEADLINE_SOURCE),
    Reported("GPT-3.5 closed-book", 44.81, None, "api", HEADLINE_SOURCE),
    Reported("GPT-4 closed-book", 51.30, None, "api", HEADLINE_SOURCE),
)


def headline(method: str) -> list[Reported]:
    """The reported values of one method (base, raw, entigraph, rephrase, qa, api)."""
    return [r for r in HEADLINE if r.method == method]


def fit_curve(tokens_millions: float) -> float:
    """The paper's fitted accuracy (%) at a synthetic-token count in millions."""
    return FIT_ASYMPTOTE - sum(c * r ** tokens_millions for c, r in FIT_TERMS)


def fit_as_dict() -> dict:
    """The paper's fit in the shape that fit_scaling writes (asymptote, terms, ...), for comparisons."""
    return {
        "asymptote": FIT_ASYMPTOTE,
        "terms": [{"weight": c, "rate": r, "decay_per_million": -math.log(r)} for c, r in FIT_TERMS],
        "x_unit": "millions of synthetic tokens",
        "y_unit": "accuracy (%)",
        "source": f"{FIT_SOURCE}; {CITATION}",
    }
