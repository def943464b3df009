"""The vLLM engine: offline batch generation on GPUs, or with vLLM's CPU build (`LLM.chat` for chat requests,
`LLM.generate` for plain prompts), with automatic prefix caching so that an article shared by many requests is
prefilled once.

vLLM is imported only inside `VLLMBackend.__init__`: the small CPU environment does not hold it
(`bash scripts/bootstrap.sh --vllm` adds it: vLLM's CPU build without CUDA, vllm with CUDA). Everything that
decides what vLLM is asked (ordering, chunking, SamplingParams arguments, conversation lists, mapping results back
to Completions) lives in pure functions below, tested with a fake LLM (the real engine: tests/test_vllm_engine.py).

Settings (config `backends.vllm`, documented in schemas/config.schema.yaml): tensor_parallel_size,
gpu_memory_utilization, max_model_len, dtype, enable_prefix_caching, enforce_eager, chunk_size, progress,
cpu_kvcache_space_gib (the CPU build's KV cache).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

from ..io_utils import EngineUnavailable
from .base import Completion, GenerationRequest
from .common import apply_stop, error_completion, order_by_group, validate_request

log = logging.getLogger(__name__)

# vLLM's finish reasons are "stop" (EOS or a stop string) and "length"; anything else (e.g. "abort") is passed on.


def sampling_kwargs(req: GenerationRequest) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one request.

    `include_stop_str_in_output` keeps the matched stop string in the text, as the other engines do (the CoT
    evaluator reads the answer letter from it). `seed` makes the request's samples reproducible on its own,
    whatever it is batched with. A request that asks for a JSON answer (metadata `response_format: json_object`, as
    the entity extraction does; the openai engine sends it as the API's JSON mode) is decoded under vLLM's
    structured outputs: to the JSON schema of metadata `json_schema` when the request gives one (the shape its
    prompt asks for), else to any JSON object. `structured_outputs` is the keyword arguments of
    `vllm.sampling_params.StructuredOutputsParams`.
    """
    kw: dict[str, Any] = {
        "n": req.n,
        "temperature": float(req.temperature),
        "top_p": float(req.top_p),
        "max_tokens": int(req.max_new_tokens),
        "seed": int(req.seed),
        "stop": list(req.stop) or None,
        "include_stop_str_in_output": True,
    }
    meta = req.metadata or {}
    if meta.get("json_schema") is not None:
        kw["structured_outputs"] = {"json": meta["json_schema"]}
    elif meta.get("response_format") == "json_object":
        kw["structured_outputs"] = {"json_object": True}
    return kw


def make_sampling_params(**kw: Any) -> Any:
    """`vllm.SamplingParams(**kw)`, with `structured_outputs` given as StructuredOutputsParams keyword arguments."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    if kw.get("structured_outputs") is not None:
        kw["structured_outputs"] = StructuredOutputsParams(**kw["structured_outputs"])
    return SamplingParams(**kw)


def plan_calls(requests: Iterable[GenerationRequest], chunk_size: int) -> list[tuple[str, list[GenerationRequest]]]:
    """Split requests into engine calls: ("chat" | "generate", requests).

    Requests are ordered by group first (an article's requests are adjacent, so its prefix stays in the prefix
    cache while they run), then cut into chunks of at most `chunk_size` requests; within a chunk, chat and plain
    requests go to separate calls (LLM.chat vs LLM.generate), each keeping the group order. Chunks bound how much
    work is lost if the process dies, since results are yielded (and written) after each call.
    """
    if chunk_size < 1:
        raise ValueError(f"backends.vllm.chunk_size must be >= 1 (got {chunk_size})")
    ordered = order_by_group(requests)
    calls: list[tuple[str, list[GenerationRequest]]] = []
    for start in range(0, len(ordered), chunk_size):
        chunk = ordered[start:start + chunk_size]
        for kind in ("chat", "generate"):
            part = [r for r in chunk if (r.messages is not None) == (kind == "chat")]
            if part:
                calls.append((kind, part))
    return calls


def call_inputs(kind: str, requests: Sequence[GenerationRequest]) -> list[Any]:
    """What LLM.chat (a list of conversations) or LLM.generate (a list of prompt strings) receives."""
    if kind == "chat":
        return [[{"role": m["role"], "content": m["content"]} for m in r.messages or []] for r in requests]
    return [r.prompt for r in requests]


def to_completion(req: GenerationRequest, output: Any, model: str) -> Completion:
    """Map one vLLM RequestOutput (prompt_token_ids, outputs[i].text/.token_ids/.finish_reason, num_cached_tokens)
    to a Completion. Token counts are exact: the prompt's token ids and every sample's generated token ids; the
    prompt tokens served from the prefix cache are passed on."""
    samples = list(output.outputs)
    if not samples:
        return error_completion(req, model, f"request {req.id}: vLLM returned no output",
                                prompt_tokens=len(output.prompt_token_ids or []))
    texts, reasons = [], []
    for s in samples:
        # vLLM already stops at (and, with include_stop_str_in_output, keeps) the first stop string; applying the
        # same cut again only guards against an engine that overshoots.
        text, hit = apply_stop(s.text, req.stop) if req.stop else (s.text, False)
        texts.append(text)
        reasons.append("stop" if hit else (s.finish_reason or "stop"))
    cached = getattr(output, "num_cached_tokens", None)
    return Completion(id=req.id, texts=texts, prompt_tokens=len(output.prompt_token_ids or []),
                      completion_tokens=sum(len(s.token_ids) for s in samples), finish_reasons=reasons, model=model,
                      cached_prompt_tokens=int(cached) if isinstance(cached, int) else None)


def run_calls(llm: Any, make_params: Callable[..., Any], requests: Iterable[GenerationRequest], model: str,
              chunk_size: int, use_tqdm: bool = True) -> Iterator[Completion]:
    """Drive an `LLM`-like object (vllm.LLM, or a fake in tests): one chat/generate call per planned chunk, results
    yielded after each call. A call that raises (a prompt longer than max_model_len makes vLLM reject the whole
    list) is retried request by request; a request that still fails becomes an error Completion."""
    valid: list[GenerationRequest] = []
    for req in requests:
        problem = validate_request(req)
        if problem is not None:
            yield error_completion(req, model, problem)
        else:
            valid.append(req)

    def call(kind: str, reqs: list[GenerationRequest]) -> list[Any]:
        params = [make_params(**sampling_kwargs(r)) for r in reqs]
        fn = llm.chat if kind == "chat" else llm.generate
        outputs = fn(call_inputs(kind, reqs), sampling_params=params, use_tqdm=use_tqdm)
        if len(outputs) != len(reqs):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(reqs)} requests")
        return list(outputs)

    for kind, reqs in plan_calls(valid, chunk_size):
        try:
            outputs = call(kind, reqs)
        except Exception as e:  # noqa: BLE001 - isolate the failing request(s) below
            log.warning("vLLM %s call of %d requests failed (%s: %s); retrying one at a time",
                        kind, len(reqs), type(e).__name__, e)
            for req in reqs:
                try:
                    (out,) = call(kind, [req])
                except Exception as e1:  # noqa: BLE001
                    yield error_completion(req, model, f"request {req.id}: vLLM failed ({type(e1).__name__}: {e1})")
                else:
                    yield to_completion(req, out, model)
            continue
        for req, out in zip(reqs, outputs):
            yield to_completion(req, out, model)


def llm_kwargs(model: str, tensor_parallel_size: int, gpu_memory_utilization: float, max_model_len: int | None,
               dtype: str, enable_prefix_caching: bool, enforce_eager: bool, seed: int) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM(...)`."""
    kw: dict[str, Any] = {
        "model": model,
        "tensor_parallel_size": int(tensor_parallel_size),
        "gpu_memory_utilization": float(gpu_memory_utilization),
        "dtype": dtype,
        "enable_prefix_caching": bool(enable_prefix_caching),
        "enforce_eager": bool(enforce_eager),
        "seed": int(seed),
    }
    if max_model_len is not None:
        kw["max_model_len"] = int(max_model_len)
    return kw


class VLLMBackend:
    """Offline vLLM generation; see the module docstring."""

    name = "vllm"

    def __init__(self, model: str, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, dtype: str = "auto", enable_prefix_caching: bool = True,
                 enforce_eager: bool = False, chunk_size: int = 2048, seed: int = 0, progress: bool = True,
                 cpu_kvcache_space_gib: float | None = None) -> None:
        if cpu_kvcache_space_gib is not None:
            # read by vLLM's CPU build when its engine starts (the KV cache size in GiB; a GPU build ignores it)
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{cpu_kvcache_space_gib:g}"
        try:
            import vllm  # noqa: F401 - imported here only: the small CPU .venv does not hold it
        except Exception as e:  # ImportError, or a CUDA/driver error raised while importing
            raise EngineUnavailable(
                f"the vllm backend needs the vLLM engine ({type(e).__name__}: {e}); build it with "
                "`bash scripts/bootstrap.sh --vllm` (CPU build without CUDA, vllm on a GPU machine), or run with "
                "--use-conda (envs/synthesis-vllm.yaml), or choose the transformers or openai backend") from None
        from vllm import LLM

        self.model = str(model)
        self.chunk_size = int(chunk_size)
        self.progress = bool(progress)
        self._sampling_params = make_sampling_params
        self.llm = LLM(**llm_kwargs(self.model, tensor_parallel_size, gpu_memory_utilization, max_model_len, dtype,
                                    enable_prefix_caching, enforce_eager, seed))

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[Completion]:
        yield from run_calls(self.llm, self._sampling_params, requests, self.model, self.chunk_size, self.progress)

    def close(self) -> None:
        self.llm = None
        try:
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # closing must never raise
            pass
