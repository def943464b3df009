"""The transformers engine: a local causal LM on CPU or GPU, with batching and reuse of a shared prefix's KV cache.

This is the engine of the CPU demo. It runs its own decode loop instead of `model.generate` because it needs two
things `generate` does not give together:

1. Prefix reuse. Requests of one `group` (synthesis: one article) share a long token prefix: system prompt +
   article, then a short instruction naming the entities. The longest common token prefix of the group is
   prefilled once (batch 1) and its KV cache is copied into every batch of that group; a batch then extends it
   with its own common prefix, expands it to the batch and feeds only each row's suffix.
2. Per-row sampling streams. Every row (one sample of one request) draws from its own `torch.Generator`
   seeded from the request's seed, so a request's output does not depend on what else shares its batch.

Suffixes are LEFT-padded inside the suffix region; an explicit attention mask hides the pads and explicit
position ids keep each row's positions contiguous (prefix 0..P-1, then P.. for the real suffix tokens), which is
what a one-request-at-a-time `model.generate` computes. Finished rows leave the batch at once.

Settings (config `backends.transformers`, documented in schemas/config.schema.yaml): batch_size, device, dtype,
max_prefix_reuse, num_threads, progress.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from .base import Completion, GenerationRequest
from .common import apply_stop, error_completion, longest_common_prefix, order_by_group, sample_seed, validate_request

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """One sample of one request inside the decode loop."""

    req_index: int
    sample: int
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    generator: Any  # torch.Generator
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


@dataclass
class _Pending:
    """A request whose samples are being generated; complete when all n samples are in."""

    req: GenerationRequest
    prompt_tokens: int
    texts: list[str | None]
    finish: list[str | None]
    completion_tokens: int = 0

    def done(self) -> bool:
        return all(t is not None for t in self.texts)


class TransformersBackend:
    """Generation with a Hugging Face causal LM; see the module docstring for the decode loop."""

    name = "transformers"

    def __init__(self, model: str, batch_size: int = 8, device: str = "auto", dtype: str = "auto",
                 max_prefix_reuse: bool = True, num_threads: int | None = None, progress: bool = True) -> None:
        import torch

        from ..models import load_causal_lm, load_tokenizer

        if batch_size < 1:
            raise ValueError(f"backends.transformers.batch_size must be >= 1 (got {batch_size})")
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.model = str(model)
        self.batch_size = int(batch_size)
        self.max_prefix_reuse = bool(max_prefix_reuse)
        self.progress = bool(progress)
        self.tokenizer = load_tokenizer(self.model)
        self.lm = load_causal_lm(self.model, dtype=dtype, device=None if device == "auto" else device)
        self.lm.eval()
        self.device = next(self.lm.parameters()).device
        cfg = self.lm.config.get_text_config(decoder=True) if hasattr(self.lm.config, "get_text_config") else self.lm.config
        self.max_positions: int | None = getattr(cfg, "max_position_embeddings", None)
        # Sliding-window attention crops its cache, which breaks the "prefix cache is a prefix of every row"
        # assumption; such models run without prefix reuse (batching still applies).
        layer_types = getattr(cfg, "layer_types", None)
        self.prefix_reuse_supported = (all(t == "full_attention" for t in layer_types) if layer_types
                                       else not getattr(cfg, "sliding_window", None))
        if self.max_prefix_reuse and not self.prefix_reuse_supported:
            log.warning("%s uses sliding-window attention: prefix KV reuse is off for this model", self.model)
        self.eos_ids = self._eos_ids()
        # Counters a caller (or the benchmark) can read after a run.
        self.stats = {"prompt_tokens": 0, "prefilled_tokens": 0, "completion_tokens": 0, "seconds": 0.0}

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.lm, "generation_config", None), self.lm.config, self.tokenizer):
            eos = getattr(src, "eos_token_id", None)
            if eos is None:
                continue
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        return ids

    # ---- prompt assembly ------------------------------------------------------------------------------------
    def encode(self, req: GenerationRequest) -> list[int]:
        """Token ids of a request's prompt: chat messages through the chat template (with the generation prompt),
        a plain prompt as is (the tokenizer's own special tokens, as `model.generate` on `tokenizer(prompt)`)."""
        if req.messages is not None:
            text = self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(req.prompt)["input_ids"])

    # ---- public API -----------------------------------------------------------------------------------------
    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[Completion]:
        """Yield one Completion per request as soon as all its samples are done (order: by group, then length)."""
        import torch
        from tqdm.auto import tqdm

        reqs = order_by_group(requests)
        pending: dict[int, _Pending] = {}
        rows_by_group: dict[str | None, list[_Row]] = {}
        early: list[Completion] = []
        for i, req in enumerate(reqs):
            problem = validate_request(req)
            if problem is None:
                try:
                    ids = self.encode(req)
                except Exception as e:  # a template error on one request must not lose the others
                    problem = f"request {req.id}: could not build the prompt ({type(e).__name__}: {e})"
            if problem is None:
                budget = req.max_new_tokens
                if self.max_positions is not None:
                    budget = min(budget, self.max_positions - len(ids))
                    if budget < 1:
                        problem = (f"request {req.id}: prompt of {len(ids)} tokens leaves no room for generation "
                                   f"in the model's {self.max_positions}-token context; shorten the prompt")
            if problem is not None:
                early.append(error_completion(req, self.model, problem))
                continue
            pending[i] = _Pending(req, len(ids), [None] * req.n, [None] * req.n)
            group_rows = rows_by_group.setdefault(req.group, [])
            for s in range(req.n):
                g = torch.Generator(device=self.device)
                g.manual_seed(sample_seed(req.seed, s))
                group_rows.append(_Row(i, s, ids, budget, float(req.temperature), float(req.top_p), list(req.stop), g))

        bar = tqdm(total=len(reqs), unit="req", desc=f"generate ({self.name})", file=sys.stderr,
                   disable=not self.progress, dynamic_ncols=True)
        t0, tok0 = time.perf_counter(), self.stats["completion_tokens"]
        try:
            for c in early:
                bar.update(1)
                yield c
            for rows in rows_by_group.values():
                # Shortest prompts first: rows of similar length share a batch, so less padding.
                rows.sort(key=lambda r: len(r.prompt_ids))
                try:
                    group_prefix = self._group_prefix(rows)
                except Exception as e:  # noqa: BLE001 - reuse is an optimisation; run the group without it
                    log.warning("prefilling the shared prefix failed (%s: %s); continuing without reuse",
                                type(e).__name__, e)
                    group_prefix = None
                for b in range(0, len(rows), self.batch_size):
                    batch = rows[b:b + self.batch_size]
                    for c in self._run_batch_safely(batch, pending, group_prefix):
                        bar.update(1)
                        elapsed = time.perf_counter() - t0
                        rate = (self.stats["completion_tokens"] - tok0) / max(elapsed, 1e-9)
                        bar.set_postfix(tok_s=f"{rate:.1f}")
                        yield c
        finally:
            self.stats["seconds"] += time.perf_counter() - t0
            bar.close()

    def close(self) -> None:
        self.lm = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # closing must never raise
            pass

    # ---- batching and prefix reuse --------------------------------------------------------------------------
    def _group_prefix(self, rows: list[_Row]) -> tuple[list[int], Any] | None:
        """Prefill the group's longest common prefix once; None when reuse is off or there is nothing to share."""
        if not (self.max_prefix_reuse and self.prefix_reuse_supported) or len(rows) < 2:
            return None
        n = longest_common_prefix([r.prompt_ids for r in rows])
        n = min(n, min(len(r.prompt_ids) for r in rows) - 1)  # every row keeps >= 1 token to produce logits from
        if n < 1:
            return None
        tokens = rows[0].prompt_ids[:n]
        return tokens, self._prefill(tokens, None)

    def _prefill(self, tokens: list[int], cache: Any, start: int = 0) -> Any:
        """Run `tokens` (batch 1, positions start..) through the model, extending `cache`; return the cache."""
        import torch

        ids = torch.tensor([tokens], device=self.device)
        pos = torch.arange(start, start + len(tokens), device=self.device)[None]
        mask = torch.ones(1, start + len(tokens), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.lm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                          use_cache=True, logits_to_keep=1)
        self.stats["prefilled_tokens"] += len(tokens)
        return out.past_key_values

    def _run_batch_safely(self, batch: list[_Row], pending: dict[int, _Pending],
                          group_prefix: tuple[list[int], Any] | None) -> Iterator[Completion]:
        """Run a batch; if it fails (e.g. out of memory), run its unfinished requests one at a time, and turn a
        request that still fails into an error Completion."""
        try:
            yield from self._run_batch(batch, pending, group_prefix)
            return
        except Exception as e:  # noqa: BLE001 - any engine failure becomes per-request handling below
            first_error = e
            log.warning("batch of %d rows failed (%s: %s); retrying its requests one at a time",
                        len(batch), type(e).__name__, e)
        left = sorted({r.req_index for r in batch if r.req_index in pending})
        for idx in left:
            p = pending[idx]
            # Restart this request's samples of this batch from scratch (a yielded request left `pending`, so
            # nothing here was handed out yet); undo the tokens of samples that had already finished.
            rows = [r for r in batch if r.req_index == idx]
            for r in rows:
                if p.texts[r.sample] is not None:
                    p.completion_tokens -= len(r.out_ids)
                p.texts[r.sample] = p.finish[r.sample] = None
                r.out_ids, r.text, r.finish_reason = [], "", None
                r.generator.manual_seed(sample_seed(p.req.seed, r.sample))
            try:
                if len(batch) == 1:
                    raise first_error
                yield from self._run_batch(rows, pending, None)
            except Exception as e:  # noqa: BLE001
                del pending[idx]
                yield error_completion(p.req, self.model, f"request {p.req.id}: generation failed "
                                       f"({type(e).__name__}: {e})", prompt_tokens=p.prompt_tokens)

    def _run_batch(self, batch: list[_Row], pending: dict[int, _Pending],
                   group_prefix: tuple[list[int], Any] | None) -> Iterator[Completion]:
        import torch

        # 1. The shared prefix of this batch, reusing (and extending) the group's prefilled cache.
        prefix_len, cache = 0, None
        if self.max_prefix_reuse and self.prefix_reuse_supported:
            n = longest_common_prefix([r.prompt_ids for r in batch])
            n = min(n, min(len(r.prompt_ids) for r in batch) - 1)
            if group_prefix is not None and n >= len(group_prefix[0]):
                prefix_len = len(group_prefix[0])
                cache = copy.deepcopy(group_prefix[1])
            if len(batch) > 1 and n > prefix_len:
                cache = self._prefill(batch[0].prompt_ids[prefix_len:n], cache, start=prefix_len)
                prefix_len = n
            if cache is not None and len(batch) > 1:
                cache.batch_repeat_interleave(len(batch))

        # 2. The suffixes, left-padded inside the suffix region.
        suffixes = [r.prompt_ids[prefix_len:] for r in batch]
        width = max(len(s) for s in suffixes)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        suffix_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, s in enumerate(suffixes):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            suffix_mask[i, width - len(s):] = 1
        ids, suffix_mask = ids.to(self.device), suffix_mask.to(self.device)
        attn = torch.cat([torch.ones(len(batch), prefix_len, dtype=torch.long, device=self.device), suffix_mask], 1)
        pos = (prefix_len + suffix_mask.cumsum(1) - 1).clamp(min=prefix_len)
        with torch.inference_mode():
            out = self.lm(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                          use_cache=True, logits_to_keep=1)
        self.stats["prefilled_tokens"] += int(suffix_mask.sum())
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
        next_pos = pos[:, -1] + 1

        # 3. Decode; rows leave the batch as they finish.
        active = list(batch)
        while True:
            tokens = self._choose(logits, active)
            keep: list[int] = []
            for i, (row, tok) in enumerate(zip(active, tokens)):
                row.out_ids.append(tok)
                self.stats["completion_tokens"] += 1
                if tok in self.eos_ids:
                    row.finish_reason = "stop"
                    row.text = self.tokenizer.decode(row.out_ids, skip_special_tokens=True)
                elif row.stop:
                    text, hit = apply_stop(self.tokenizer.decode(row.out_ids, skip_special_tokens=True), row.stop)
                    if hit:
                        row.finish_reason, row.text = "stop", text
                if row.finish_reason is None and len(row.out_ids) >= row.max_new_tokens:
                    row.finish_reason = "length"
                    row.text = self.tokenizer.decode(row.out_ids, skip_special_tokens=True)
                if row.finish_reason is None:
                    keep.append(i)
                else:
                    done = self._finish_row(row, pending)
                    if done is not None:
                        yield done
            if not keep:
                return
            if len(keep) < len(active):
                idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(idx)
                attn, next_pos = attn[idx], next_pos[idx]
                tokens = [tokens[i] for i in keep]
                active = [active[i] for i in keep]
            attn = torch.cat([attn, torch.ones(len(active), 1, dtype=torch.long, device=self.device)], 1)
            step = torch.tensor(tokens, device=self.device)[:, None]
            with torch.inference_mode():
                out = self.lm(input_ids=step, attention_mask=attn, position_ids=next_pos[:, None],
                              past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1

    def _choose(self, logits: Any, rows: list[_Row]) -> list[int]:
        """Next token per row: argmax at temperature 0, else temperature + top-p sampling from the row's stream."""
        import torch

        logits = logits.float()
        chosen = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            if row.temperature == 0:
                continue
            probs = torch.softmax(logits[i] / row.temperature, -1)
            if row.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                # Keep the smallest set whose mass reaches top_p (the top token is always kept).
                drop = sorted_p.cumsum(-1) - sorted_p > row.top_p
                sorted_p = sorted_p.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
            chosen[i] = int(torch.multinomial(probs, 1, generator=row.generator))
        return chosen

    def _finish_row(self, row: _Row, pending: dict[int, _Pending]) -> Completion | None:
        p = pending[row.req_index]
        p.texts[row.sample] = row.text
        p.finish[row.sample] = row.finish_reason
        p.completion_tokens += len(row.out_ids)
        if not p.done():
            return None
        del pending[row.req_index]
        self.stats["prompt_tokens"] += p.prompt_tokens
        return Completion(id=p.req.id, texts=[t or "" for t in p.texts], prompt_tokens=p.prompt_tokens,
                          completion_tokens=p.completion_tokens, finish_reasons=[f or "stop" for f in p.finish],
                          model=self.model)
