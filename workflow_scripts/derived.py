"""Methods derived from other corpora, and the one list of every method that is trained on.

Besides the synthesis methods (synthesis.methods) and `raw`, a corpus can be
- a filtered variant of a method (`filters.variants`, workflow_scripts/filters.py), e.g. `entigraph_judge`;
- an imported synthetic corpus (`imports`, workflow_scripts/import_corpus.py), e.g. the authors' released one;
- a mixture of corpora with fixed weights, optionally ordered by a perplexity curriculum (`mixtures`,
  workflow_scripts/mixture.py).

Each is a method name like any other: it gets a corpus, a CPT model per budget (`{method}-{budget}`), an
evaluation and a point on the scaling curve. Names follow the Snakemake wildcard `[a-z0-9_]+` and contain no `-`
(model ids are split at their last `-`), so a filtered EntiGraph is `entigraph_judge`, not `entigraph+judge`.
"""

from __future__ import annotations

import re

from .io_utils import InputError

NAME = re.compile(r"^[a-z0-9_]+$")
RAW = "raw"  # the Raw CPT baseline's method (its corpus is the articles); layout.RAW is this name
REPLAY = "replay"


def filter_variants(cfg: dict) -> dict[str, dict]:
    return dict((cfg.get("filters") or {}).get("variants") or {})


def imported(cfg: dict) -> dict[str, dict]:
    return dict(cfg.get("imports") or {})


def mixtures(cfg: dict) -> dict[str, dict]:
    return dict(cfg.get("mixtures") or {})


def trained_methods(cfg: dict) -> list[str]:
    """Every method with a corpus and CPT models besides raw: synthesis methods, filtered variants, imported
    corpora, mixtures (in this order)."""
    syn = list((cfg.get("synthesis") or {}).get("methods") or [])
    return syn + list(filter_variants(cfg)) + list(imported(cfg)) + list(mixtures(cfg))


def method_kind(cfg: dict, method: str) -> str:
    """raw | synthesis | filtered | imported | mixture."""
    if method == RAW:
        return RAW
    if method in filter_variants(cfg):
        return "filtered"
    if method in imported(cfg):
        return "imported"
    if method in mixtures(cfg):
        return "mixture"
    return "synthesis"


def check_methods(cfg: dict) -> None:
    """Fail at planning time on a name clash, a bad name, or a source that is not configured."""
    syn = list((cfg.get("synthesis") or {}).get("methods") or [])
    groups = {"synthesis.methods": syn, "filters.variants": list(filter_variants(cfg)),
              "imports": list(imported(cfg)), "mixtures": list(mixtures(cfg))}
    seen: dict[str, str] = {}
    for where, names in groups.items():
        for name in names:
            if not NAME.match(name) or name in (RAW, REPLAY, "base"):
                raise InputError(f"{where}: method name {name!r} must match [a-z0-9_]+ and not be raw, replay or "
                                 "base (model ids are METHOD-BUDGET; use e.g. entigraph_judge)")
            if name in seen:
                raise InputError(f"method name {name!r} is declared in both {seen[name]} and {where}; rename one")
            seen[name] = where
    for name, spec in filter_variants(cfg).items():
        if spec["source"] not in syn and spec["source"] not in imported(cfg):
            raise InputError(f"filters.variants.{name}.source {spec['source']!r} is neither in synthesis.methods "
                             "nor in imports; add it there")
    corpora = set(syn) | set(filter_variants(cfg)) | set(imported(cfg)) | {RAW, REPLAY}
    for name, spec in mixtures(cfg).items():
        bad = [s for s in spec["sources"] if s not in corpora]
        if bad:
            raise InputError(f"mixtures.{name}.sources: {', '.join(map(repr, bad))} is not a configured corpus "
                             f"(one of: {', '.join(sorted(corpora))})")
