"""The backend interface shared by synthesis (chat requests) and CoT evaluation (plain-completion requests)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol

from ..io_utils import EngineUnavailable


@dataclass
class GenerationRequest:
    """One generation. Exactly one of `messages` (chat, the model's chat template applies) or `prompt`
    (plain completion, no template: the paper's few-shot QA prompt) is set.

    `group` names requests that share a long prompt prefix (synthesis: the article uid); engines order and batch
    by it so that the prefix is computed once (KV reuse / prefix caching).
    """

    id: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    group: str | None = None
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    n: int = 1  # samples per request (CoT evaluation); synthesis uses 1
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Completion:
    """The result of one request: `texts` holds n samples (texts[0] is the usual one)."""

    id: str
    texts: list[str]
    prompt_tokens: int
    completion_tokens: int
    finish_reasons: list[str]
    model: str
    error: str | None = None  # set when the request failed for good (after retries); texts is then empty
    # prompt tokens served from the engine's prefix cache (vLLM's num_cached_tokens); None: not reported
    cached_prompt_tokens: int | None = None

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""

    @property
    def finish_reason(self) -> str:
        return self.finish_reasons[0] if self.finish_reasons else "error"


class Backend(Protocol):
    name: str
    model: str

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[Completion]:
        """Yield one Completion per request, in any order, as soon as each is done (callers append them to
        disk immediately, so an interruption loses at most the in-flight batch)."""
        ...

    def close(self) -> None:
        ...


_ENGINES = {
    "transformers": "workflow_scripts.backends.transformers_backend:TransformersBackend",
    "vllm": "workflow_scripts.backends.vllm_backend:VLLMBackend",
    "openai": "workflow_scripts.backends.openai_backend:OpenAIBackend",
    "openai_batch": "workflow_scripts.backends.openai_batch:OpenAIBatchBackend",
}


def get_backend(name: str, settings: dict[str, Any]) -> Backend:
    """Instantiate engine `name` with its settings dict (the config's `backends.<name>` section plus the model)."""
    if name not in _ENGINES:
        raise EngineUnavailable(f"unknown backend {name!r}; choose one of {', '.join(_ENGINES)}")
    module_name, cls_name = _ENGINES[name].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, cls_name)(**settings)


def engine_settings(cfg: dict, engine: str, model: str | None = None) -> dict[str, Any]:
    """The settings of engine `engine` for a stage: the config's `backends.<engine>` section (a copy), with
    `model` set when given (a stage that lets the section name the model uses `setdefault` on the result)."""
    settings = dict((cfg.get("backends") or {}).get(engine) or {})
    if model is not None:
        settings["model"] = model
    return settings


def engine_for(cfg: dict, engine: str, model: str) -> Backend:
    """Engine `engine` serving `model`, with the config's settings for it."""
    return get_backend(engine, engine_settings(cfg, engine, model))
