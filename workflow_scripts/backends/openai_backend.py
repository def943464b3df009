"""The openai engine: any OpenAI-compatible HTTP endpoint (`vllm serve`, a hosted API, a llama.cpp server).

Chat requests go to POST {base_url}/chat/completions, plain prompts to POST {base_url}/completions. Standard
library only (urllib + a thread pool): at most `max_concurrency` requests are in flight; 429, 5xx, timeouts and
connection errors are retried up to `max_retries` times with exponential backoff and jitter, waiting at least
what a `Retry-After` header asks. Any other 4xx fails that request at once. A request that fails for good yields a
Completion with `error` set; the others go on.

Secrets: the API key is read from the environment variable named by `api_key_env` when the engine is built. It
is sent only in the Authorization header, never logged, never stored in results, and scrubbed from every error
message (a server may echo request headers back in an error body).

Stop strings (`stop_mode`): "client" (default) cuts the text after the first stop string, keeping it, on this
side; the server generates up to max_new_tokens and the token counts (from the response `usage`) include what it
generated past the stop. "server" sends `stop` with vLLM's `include_stop_str_in_output: true` extension, which
saves those tokens on a `vllm serve` endpoint (other servers may reject or ignore the extension).

Settings (config `backends.openai`, documented in schemas/config.schema.yaml): base_url, api_key_env,
max_concurrency, max_retries, timeout_s, backoff_base_s, backoff_max_s, stop_mode, extra_body, progress.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Iterable, Iterator

from ..io_utils import InputError
from .base import Completion, GenerationRequest
from .common import apply_stop, error_completion, validate_request

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}  # plus any other 5xx


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Fatal(Exception):
    pass


def request_body(req: GenerationRequest, model: str, stop_mode: str, extra_body: dict[str, Any] | None = None
                 ) -> tuple[str, dict[str, Any]]:
    """(endpoint path, JSON body) for one request."""
    body: dict[str, Any] = {"model": model, "max_tokens": int(req.max_new_tokens),
                            "temperature": float(req.temperature), "top_p": float(req.top_p),
                            "seed": int(req.seed), "n": int(req.n)}
    if req.stop and stop_mode == "server":
        body["stop"] = list(req.stop)
        body["include_stop_str_in_output"] = True
    if req.metadata.get("response_format") == "json_object":  # entity extraction asks for a JSON object
        body["response_format"] = {"type": "json_object"}
    body.update(extra_body or {})
    if req.messages is not None:
        body["messages"] = [{"role": m["role"], "content": m["content"]} for m in req.messages]
        return "/chat/completions", body
    body["prompt"] = req.prompt
    return "/completions", body


def parse_response(req: GenerationRequest, data: dict[str, Any], model: str) -> Completion:
    """Map a chat/completions or completions response to a Completion; token counts come from `usage`."""
    choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != req.n:
        raise _Retryable(f"expected {req.n} choices, got {len(choices)}")
    texts, reasons = [], []
    for ch in choices:
        text = (ch.get("message") or {}).get("content") if req.messages is not None else ch.get("text")
        text = text or ""
        reason = ch.get("finish_reason") or "stop"
        if req.stop:
            text, hit = apply_stop(text, req.stop)
            reason = "stop" if hit else reason
        texts.append(text)
        reasons.append(reason)
    usage = data.get("usage") or {}
    if "prompt_tokens" not in usage or "completion_tokens" not in usage:
        log.warning("response for request %s has no usage counts; token counts recorded as 0", req.id)
    return Completion(id=req.id, texts=texts, prompt_tokens=int(usage.get("prompt_tokens", 0)),
                      completion_tokens=int(usage.get("completion_tokens", 0)), finish_reasons=reasons,
                      model=str(data.get("model") or model))


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header (delta-seconds or an HTTP date) in seconds, or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None, rng: random.Random) -> float:
    """Exponential backoff with jitter (half fixed, half random) for retry number `attempt` (0-based), never
    shorter than the server's Retry-After."""
    exp = min(cap, base * (2 ** attempt))
    delay = exp / 2 + rng.uniform(0, exp / 2)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


class OpenAIBackend:
    """Client of an OpenAI-compatible endpoint; see the module docstring."""

    name = "openai"

    def __init__(self, model: str, base_url: str = "https://api.openai.com/v1", api_key_env: str | None = "OPENAI_API_KEY",
                 max_concurrency: int = 8, max_retries: int = 6, timeout_s: float = 120.0,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 60.0, stop_mode: str = "client",
                 extra_body: dict[str, Any] | None = None, progress: bool = True) -> None:
        if not model:
            raise ValueError("backends.openai: no model name to send; synthesis sends models.generator.name, "
                             "evaluation the api model's `model`")
        if stop_mode not in ("client", "server"):
            raise ValueError(f"backends.openai.stop_mode must be 'client' or 'server' (got {stop_mode!r})")
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError("backends.openai: max_concurrency >= 1, max_retries >= 0 and timeout_s > 0 are required")
        self.model = str(model)
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.max_concurrency = int(max_concurrency)
        self.max_retries = int(max_retries)
        self.timeout_s = float(timeout_s)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.stop_mode = stop_mode
        self.extra_body = dict(extra_body or {})
        self.progress = bool(progress)
        self._key: str | None = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise InputError(f"backends.openai.api_key_env names the environment variable {api_key_env!r}, "
                                 "which is not set; export it (the key is never read from the config), or set "
                                 "api_key_env: null for a local server without authentication")
            self._key = key
        self._rng = random.Random()
        self._lock = threading.Lock()
        self.stats = {"attempts": 0, "retries": 0}

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    # ---- one HTTP attempt -----------------------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        http_req = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode("utf-8"),
                                          headers=headers, method="POST")
        with self._lock:
            self.stats["attempts"] += 1
        try:
            with urllib.request.urlopen(http_req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = self._redact(e.read(2000).decode("utf-8", "replace").strip())
            msg = f"HTTP {e.code} from {self.base_url}{path}: {detail[:500]}"
            if e.code in RETRY_STATUS or e.code >= 500:
                raise _Retryable(msg, retry_after_seconds(e.headers.get("Retry-After"))) from None
            raise _Fatal(msg) from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"timed out after {self.timeout_s:g}s ({self.base_url}{path})") from None
        except urllib.error.URLError as e:
            raise _Retryable(f"cannot reach {self.base_url}{path}: {self._redact(str(e.reason))}") from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Retryable(f"connection error with {self.base_url}{path}: "
                             f"{type(e).__name__}: {self._redact(str(e))}") from None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            raise _Retryable(f"response from {self.base_url}{path} is not JSON") from None
        if not isinstance(data, dict):
            raise _Retryable(f"response from {self.base_url}{path} is not a JSON object")
        return data

    def _complete(self, req: GenerationRequest) -> Completion:
        """One request with retries; never raises (a final failure is an error Completion)."""
        problem = validate_request(req)
        if problem is not None:
            return error_completion(req, self.model, problem)
        path, body = request_body(req, self.model, self.stop_mode, self.extra_body)
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                return parse_response(req, self._post(path, body), self.model)
            except _Fatal as e:
                return error_completion(req, self.model, f"request {req.id}: {e}")
            except _Retryable as e:
                last = str(e)
                if attempt == self.max_retries:
                    break
                delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, e.retry_after, self._rng)
                with self._lock:
                    self.stats["retries"] += 1
                log.info("request %s: %s; retry %d/%d in %.2fs", req.id, last, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
            except Exception as e:  # noqa: BLE001 - a malformed response must not lose the other requests
                return error_completion(req, self.model, f"request {req.id}: bad response "
                                        f"({type(e).__name__}: {self._redact(str(e))})")
        return error_completion(req, self.model, f"request {req.id}: gave up after {self.max_retries + 1} "
                                f"attempts; last error: {last}")

    # ---- public API -----------------------------------------------------------------------------------------
    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[Completion]:
        """Yield Completions as they finish (not in request order), keeping at most max_concurrency requests in
        flight and reading `requests` lazily."""
        from tqdm.auto import tqdm

        reqs = iter(requests)
        bar = tqdm(unit="req", desc=f"generate ({self.name})", file=sys.stderr, disable=not self.progress,
                   dynamic_ncols=True)
        t0, tokens = time.perf_counter(), 0
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="openai-backend")
        in_flight: set[Future] = set()
        try:
            exhausted = False
            while True:
                while not exhausted and len(in_flight) < self.max_concurrency:
                    req = next(reqs, None)
                    if req is None:
                        exhausted = True
                    else:
                        in_flight.add(pool.submit(self._complete, req))
                if not in_flight:
                    return
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in done:
                    c = fut.result()
                    tokens += c.completion_tokens
                    bar.update(1)
                    bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
                    yield c
        finally:
            for fut in in_flight:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def close(self) -> None:
        self._key = None
