"""Request and token estimates of synthesis methods, for the planner (python -m workflow_scripts.plan): pure
arithmetic that each method's `estimate` uses (workflow_scripts.synth_framework.Method.estimate)."""

from __future__ import annotations

import math

# One estimated group of requests: (item, {requests, prompt, cached, completion}, note).
Estimate = tuple[str, dict[str, float], str]


def n_tuples(n_entities: int, k: int, cap: int | None) -> int:
    """Entity tuples of size k for one article: C(E, k), capped (None = all)."""
    total = math.comb(n_entities, k)
    return total if cap is None else min(total, int(cap))


def article_requests(per_article: list[int], tokens: list[float], overhead: float, suffix: float,
                     completion: float) -> dict[str, float]:
    """Tokens of requests whose prompt is a per-article prefix (prompt overhead + the article) and a
    per-request suffix (e.g. the entity names): `per_article[a]` requests for article a.

    The engines order requests by article, so a prefix cache computes each article's prefix once; `cached` is
    the prompt tokens it avoids.
    """
    n = sum(per_article)
    prompt = sum(k * (overhead + t + suffix) for k, t in zip(per_article, tokens))
    uncached = sum(overhead + t for k, t in zip(per_article, tokens) if k) + n * suffix
    return {"requests": n, "prompt": prompt, "cached": prompt - uncached, "completion": n * completion}
