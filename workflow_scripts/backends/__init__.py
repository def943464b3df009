"""Generation backends behind one interface (docs/backends.md).

`get_backend(name, settings)` returns an object with `generate(requests) -> iterator of Completion`.
Engines are imported lazily: vLLM in particular is never imported unless asked for (it cannot import on CPU).
"""

from .base import Backend, Completion, GenerationRequest, engine_for, engine_settings, get_backend

__all__ = ["Backend", "Completion", "GenerationRequest", "engine_for", "engine_settings", "get_backend"]
