"""Pure helpers shared by the three engines: stop strings, per-sample seeds, request ordering, error results.

Kept free of torch, vLLM and network code so that tests pin them directly.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

from .base import Completion, GenerationRequest


def validate_request(req: GenerationRequest) -> str | None:
    """Return why a request cannot be run, or None. Checked before any engine work so one bad request becomes
    one error Completion instead of an exception that would lose the others."""
    if (req.messages is None) == (req.prompt is None):
        return f"request {req.id}: set exactly one of `messages` (chat) or `prompt` (plain completion)"
    if req.messages is not None:
        if not req.messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in req.messages):
            return f"request {req.id}: `messages` must be a non-empty list of {{role, content}} dicts"
    if req.n < 1:
        return f"request {req.id}: n must be >= 1 (got {req.n})"
    if req.max_new_tokens < 1:
        return f"request {req.id}: max_new_tokens must be >= 1 (got {req.max_new_tokens})"
    if req.temperature < 0:
        return f"request {req.id}: temperature must be >= 0 (got {req.temperature})"
    if not 0 < req.top_p <= 1:
        return f"request {req.id}: top_p must be in (0, 1] (got {req.top_p})"
    return None


def apply_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` after the earliest occurrence of any stop string, keeping the stop string itself.

    The CoT evaluator passes stops like "\\nAnswer: B." and reads the answer from the kept stop string. When two
    stops match at the same position the longer one wins (it is the more specific). Returns (text, matched).
    """
    best: tuple[int, int] | None = None  # (end, -len) of the earliest match
    for s in stops:
        if not s:
            continue
        i = text.find(s)
        if i < 0:
            continue
        key = (i, -len(s))
        if best is None or key < best:
            best = key
    if best is None:
        return text, False
    start, neg_len = best
    return text[: start - neg_len], True


def sample_seed(seed: int, sample_index: int) -> int:
    """A 63-bit seed for sample `sample_index` of a request seeded `seed`: independent of batch composition, so
    a request's samples are the same whether it runs alone or beside others."""
    digest = hashlib.sha256(f"{seed}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def order_by_group(requests: Iterable[GenerationRequest]) -> list[GenerationRequest]:
    """Stable order with requests of one group adjacent, groups in order of first appearance.

    Requests without a group keep their relative order and form one group (CoT prompts share the few-shot
    prefix, so they profit from the same prefix reuse)."""
    first_seen: dict[str | None, int] = {}
    reqs = list(requests)
    for r in reqs:
        first_seen.setdefault(r.group, len(first_seen))
    return sorted(reqs, key=lambda r: first_seen[r.group])


def longest_common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token sequences (0 for an empty list)."""
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        for s in seqs[1:]:
            if s[i] != t:
                return i
    return n


def error_completion(req: GenerationRequest, model: str, message: str, prompt_tokens: int = 0) -> Completion:
    return Completion(id=req.id, texts=[], prompt_tokens=prompt_tokens, completion_tokens=0, finish_reasons=[],
                      model=model, error=message)
