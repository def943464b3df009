"""Budget units: how a CPT budget in config becomes a label (in model ids and paths) and a prefix of the corpus.

`cpt.budget_unit` (docs/cpt.md, "Budgets"):
- `tokens` (default): a budget is a count of this workflow's corpus tokens; label `N` (`entigraph-455000000`,
  results/models/entigraph/455000000/). The prefix is exactly N tokens.
- `fraction`: a budget is a fraction of the method's whole corpus, the authors' `subsample_ratio` (their
  scripts/train.sh and data/cptdata.py: `ids[:int(len(ids) * subsample_ratio)]` of the 599,385,906-token file,
  then `int(len / block_size)` blocks, the partial last block dropped). Label `r` + the ratio as the shortest
  decimal that reads back to the same float (`entigraph-r0.0004`, results/models/entigraph/r0.0004/). The prefix
  is int(ratio x corpus tokens) tokens, computed as the authors do (a Python float product, truncated).
`all` (the Raw baseline) is the whole corpus in either unit.

The label carries its unit, so a trained model never depends on which unit the config uses now, and the two
units can coexist in one results tree.
"""

from __future__ import annotations

import math
import re

from .io_utils import InputError

UNITS = ("tokens", "fraction")
FRACTION_PREFIX = "r"
ALL = "all"
# the Snakefile's `budget` wildcard constraint: a token count, `all`, or r + a positional decimal ratio
WILDCARD = r"\d+|all|r\d+\.\d+"
_WILDCARD_RE = re.compile(rf"^(?:{WILDCARD})$")


def format_ratio(ratio: float) -> str:
    """The shortest positional decimal of a float that parses back to it (0.0004, 0.5, 1.0; never 1e-05)."""
    import numpy as np

    return np.format_float_positional(float(ratio), trim="0")


def budget_label(value: int | float | str, unit: str = "tokens") -> str:
    """The label of a configured budget in model ids and paths: N for tokens, rRATIO for a fraction, `all`."""
    if value == ALL:
        return ALL
    if unit == "tokens":
        if isinstance(value, float) and not value.is_integer():
            raise InputError(f"cpt budget {value}: a token budget must be a whole number (cpt.budget_unit: tokens)")
        return str(int(value))
    if unit == "fraction":
        ratio = float(value)
        if not 0.0 < ratio <= 1.0 or math.isnan(ratio):
            raise InputError(f"cpt budget {value}: a fraction budget must be in (0, 1] (cpt.budget_unit: fraction)")
        return FRACTION_PREFIX + format_ratio(ratio)
    raise InputError(f"cpt.budget_unit {unit!r}: choose one of {', '.join(UNITS)}")


def parse_budget(label: int | str) -> tuple[str, int | float | None]:
    """(unit, value) of a budget label: ('all', None), ('tokens', N) or ('fraction', ratio)."""
    text = str(label)
    if not _WILDCARD_RE.match(text):
        raise InputError(f"budget {text!r}: expected a token count, 'all', or r followed by a ratio such as r0.0004")
    if text == ALL:
        return ALL, None
    if text.startswith(FRACTION_PREFIX):
        ratio = float(text[len(FRACTION_PREFIX):])
        if not 0.0 < ratio <= 1.0:
            raise InputError(f"budget {text!r}: a fraction budget must be in (0, 1]")
        return "fraction", ratio
    return "tokens", int(text)


def prefix_tokens(total: int, label: int | str) -> int:
    """Tokens of the corpus prefix a budget trains on, before any cap: `all` -> total; N -> N; rRATIO ->
    int(total x ratio), the authors' `int(len(self.ids) * subsample_ratio)` (data/cptdata.py _MemmapDataset)."""
    unit, value = parse_budget(label)
    if unit == ALL:
        return int(total)
    if unit == "fraction":
        return int(int(total) * value)
    return int(value)


def budget_fraction(label: int | str, total: int | None) -> float | None:
    """The budget as a fraction of the corpus: the ratio itself for a fraction label, N / total for a token label
    (None when the corpus size is unknown), 1.0 for `all`."""
    unit, value = parse_budget(label)
    if unit == ALL:
        return 1.0
    if unit == "fraction":
        return float(value)
    return float(value) / total if total else None


def nominal_tokens(label: int | str, corpus_estimate: float | None) -> float | None:
    """Tokens a budget stands for when only an estimate of the corpus is known (the planner): N for a token label,
    ratio x estimate for a fraction, the estimate for `all` (None when unknown)."""
    unit, value = parse_budget(label)
    if unit == "tokens":
        return float(value)
    if corpus_estimate is None:
        return None
    return float(corpus_estimate) * (1.0 if unit == ALL else float(value))


def check_budget_values(values: list, unit: str, where: str = "cpt.budgets") -> None:
    """Every configured value fits the unit (whole token counts >= 1, or fractions in (0, 1]), and no two name the
    same label: one line naming the key and the value otherwise."""
    seen: dict[str, object] = {}
    for v in values:
        try:
            label = budget_label(v, unit)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        if unit == "tokens" and int(v) < 1:
            raise InputError(f"{where}: budget {v} must be at least 1 token")
        if label in seen:
            raise InputError(f"{where}: budgets {seen[label]} and {v} name the same model ({label})")
        seen[label] = v
