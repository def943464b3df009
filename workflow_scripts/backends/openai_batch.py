"""The openai_batch engine: any OpenAI-compatible Batch API (OpenAI's, or a server that implements it).

One `generate(requests)` call is one or more batches (docs/backends.md "Batch API"):

1. the requests file: one JSON line per request, `{"custom_id": <request id>, "method": "POST", "url":
   "/v1/chat/completions", "body": {...}}` (the body is the openai engine's, `request_body`), cut into files of at
   most `max_requests_per_batch` lines and `max_batch_bytes` bytes (OpenAI: 50,000 requests, 200 MB);
2. upload it (`POST {base_url}/files`, purpose=batch), create the batch (`POST {base_url}/batches` with the
   endpoint and `completion_window`), poll it (`GET {base_url}/batches/{id}` every `poll_interval_s`);
3. once it is terminal, download its output and error files (`GET {base_url}/files/{id}/content`) and yield one
   Completion per request.

Re-attach: every batch is written to a small JSON state file (atomically; `state_path`, which the shard runner
sets to the shard's work folder) as soon as its input file is uploaded (before the batch is created) and again
when it is created. A run killed at any point re-reads the state file: a request that is already in a batch is
polled and collected from that batch, never submitted again. A batch whose creation was cut off (input file
uploaded, no batch id recorded) is found again by its input file id in `GET {base_url}/batches` before a new one
is created.

Expired, cancelled and failed batches: completed requests in the output file are kept; requests without a result,
or with a retryable error (`batch_expired`, `batch_cancelled`, `request_timeout`, HTTP 408/409/429/5xx) are
resubmitted in a new batch until a request has been in `max_batch_tries` batches; then, like a non-retryable error
(a 400), it yields a Completion with `error` set (the synthesis stats and ledger record it). A re-run asks again
only for requests with no record: an error known from the state's batches is reported again without a new
submission (delete the state file to force one).

Secrets as in the openai engine: the key is read from the environment variable `api_key_env`, sent only in the
Authorization header, and scrubbed from every error message; the state file holds ids only.

Settings (config `backends.openai_batch`, documented in schemas/config.schema.yaml): base_url, api_key_env,
completion_window, poll_interval_s, max_wait_s, max_batch_tries, max_requests_per_batch, max_batch_bytes,
max_retries, timeout_s, backoff_base_s, backoff_max_s, extra_body, progress.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..io_utils import InputError, stable_hash, write_json_atomic
from .base import Completion, GenerationRequest
from .common import error_completion, validate_request
from .openai_backend import RETRY_STATUS, backoff_delay, parse_response, request_body, retry_after_seconds

TERMINAL = ("completed", "failed", "expired", "cancelled")
RETRY_CODES = {"batch_expired", "batch_cancelled", "request_timeout", "rate_limit_exceeded", "server_error"}
STATE_VERSION = 1


class BatchAPIError(RuntimeError):
    """A Files/Batches call that failed for good (a 4xx other than 408/409/429, or retries exhausted)."""


# ------------------------------------------------------------------------------------------- pure helpers
def batch_line(req: GenerationRequest, model: str, extra_body: dict[str, Any] | None = None) -> tuple[str, str]:
    """(endpoint, one line of the batch requests file) for a request; custom_id is the request (record) id."""
    path, body = request_body(req, model, "client", extra_body)
    url = "/v1" + path
    return url, json.dumps({"custom_id": req.id, "method": "POST", "url": url, "body": body},
                           ensure_ascii=False, sort_keys=True) + "\n"


def request_files(requests: Iterable[GenerationRequest], model: str, extra_body: dict[str, Any] | None,
                  max_requests: int, max_bytes: int) -> list[tuple[str, list[str], str]]:
    """The batch files for `requests`: [(endpoint, request ids, file content)], one endpoint per file, each with
    at most `max_requests` lines and `max_bytes` bytes (a single line over the byte limit gets a file of its
    own, and the server will say if it is too large)."""
    by_endpoint: dict[str, list[tuple[str, str]]] = {}
    for req in requests:
        url, line = batch_line(req, model, extra_body)
        by_endpoint.setdefault(url, []).append((req.id, line))
    files: list[tuple[str, list[str], str]] = []
    for url, lines in by_endpoint.items():
        ids: list[str] = []
        parts: list[str] = []
        size = 0
        for rid, line in lines:
            n = len(line.encode("utf-8"))
            if parts and (len(parts) >= max_requests or size + n > max_bytes):
                files.append((url, ids, "".join(parts)))
                ids, parts, size = [], [], 0
            ids.append(rid)
            parts.append(line)
            size += n
        if parts:
            files.append((url, ids, "".join(parts)))
    return files


def classify_result(line: dict[str, Any]) -> tuple[str, dict[str, Any] | None, str, bool]:
    """(custom_id, response body or None, error message, retryable) of one output- or error-file line.

    A success has a 200 response with a body and no error. Everything else is an error: retryable when its code
    is one of RETRY_CODES or its HTTP status is 408/409/429/5xx (the request is resubmitted in a new batch)."""
    cid = str(line.get("custom_id"))
    response = line.get("response") or {}
    status = int(response.get("status_code") or 0)
    err = line.get("error")
    body = response.get("body")
    if not err and status == 200 and isinstance(body, dict):
        return cid, body, "", False
    code = ""
    message = ""
    if isinstance(err, dict):
        inner = err.get("error") if isinstance(err.get("error"), dict) else err  # vLLM nests {"error": {...}}
        code = inner.get("code")
        code = code if isinstance(code, str) and code else str(inner.get("type") or "")
        message = str(inner.get("message") or "")
    elif err:
        message = str(err)
    if not message and isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        message = str(inner.get("message") or "")
        code = code or str(inner.get("code") or "")
    retryable = code in RETRY_CODES or status in RETRY_STATUS or status >= 500
    label = f"HTTP {status}" if status else (code or "error")
    if code and status:
        label += f" {code}"
    return cid, None, f"{label}: {message or 'no message'}"[:500], retryable


def completion_from_body(req: GenerationRequest, body: dict[str, Any], model: str) -> Completion:
    """The Completion of a successful batch line (the openai engine's mapping; client-side stop strings), with
    the provider's cached prompt tokens when it reports them."""
    c = parse_response(req, body, model)
    details = (body.get("usage") or {}).get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        c.cached_prompt_tokens = int(details["cached_tokens"])
    return c


def batch_errors(entry: dict[str, Any]) -> str:
    """The first of a failed batch's own errors (e.g. the provider's validation or token-limit message), or ''."""
    errors = entry.get("errors") or {}
    data = errors.get("data") if isinstance(errors, dict) else errors
    if not data:
        return ""
    first = data[0] if isinstance(data, list) else data
    if isinstance(first, dict):
        first = f"{first.get('code') or ''} {first.get('message') or ''}".strip()
    return f": {str(first)[:300]}"


def load_state(path: Path) -> dict[str, Any]:
    """The state file of a shard's batches, or an empty one. A damaged file stops the job with one line."""
    if not path.exists():
        return {"version": STATE_VERSION, "batches": []}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: malformed batch state ({e.msg}); it lists the batches already "
                         "submitted - fix it, or delete it to submit the missing requests again") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or not isinstance(
            state.get("batches"), list):
        raise InputError(f"{path}: not a batch state file of version {STATE_VERSION}; delete it to submit the "
                         "missing requests again")
    return state


def owners(state: dict[str, Any], ids: Iterable[str]) -> tuple[dict[str, dict], dict[str, int]]:
    """For each of `ids` that a batch of the state holds: its latest batch entry, and how many batches held it."""
    want = set(ids)
    owner: dict[str, dict] = {}
    tries: dict[str, int] = {}
    for entry in state["batches"]:
        for rid in entry["request_ids"]:
            if rid in want:
                owner[rid] = entry
                tries[rid] = tries.get(rid, 0) + 1
    return owner, tries


def multipart(fields: dict[str, str], filename: str, content: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with text fields and one file part named `file`; returns (body, content type)."""
    boundary = f"----batch{uuid.uuid4().hex}"
    out = []
    for k, v in fields.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
               "Content-Type: application/jsonl\r\n\r\n".encode())
    out.append(content)
    out.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


# ------------------------------------------------------------------------------------------------ engine
class OpenAIBatchBackend:
    """Client of an OpenAI-compatible Batch API; see the module docstring."""

    name = "openai_batch"

    def __init__(self, model: str, base_url: str = "https://api.openai.com/v1",
                 api_key_env: str | None = "OPENAI_API_KEY", completion_window: str = "24h",
                 poll_interval_s: float = 60.0, max_wait_s: float | None = None, max_batch_tries: int = 3,
                 max_requests_per_batch: int = 50000, max_batch_bytes: int = 190_000_000,
                 max_retries: int = 6, timeout_s: float = 300.0,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
                 extra_body: dict[str, Any] | None = None, progress: bool = True,
                 state_path: str | Path | None = None) -> None:
        if not model:
            raise ValueError("backends.openai_batch: no model name to send (synthesis sends models.generator.name)")
        if poll_interval_s <= 0 or max_batch_tries < 1 or max_requests_per_batch < 1 or max_batch_bytes < 1:
            raise ValueError("backends.openai_batch: poll_interval_s > 0, max_batch_tries >= 1, "
                             "max_requests_per_batch >= 1 and max_batch_bytes >= 1 are required")
        self.model = str(model)
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.completion_window = str(completion_window)
        self.poll_interval_s = float(poll_interval_s)
        self.max_wait_s = None if max_wait_s is None else float(max_wait_s)
        self.max_batch_tries = int(max_batch_tries)
        self.max_requests_per_batch = int(max_requests_per_batch)
        self.max_batch_bytes = int(max_batch_bytes)
        self.max_retries = int(max_retries)
        self.timeout_s = float(timeout_s)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.extra_body = dict(extra_body or {})
        self.progress = bool(progress)
        # where the batch ids live; the shard runner sets it to the shard's work folder before generating
        self.state_path: Path | None = Path(state_path) if state_path else None
        self._state_path = Path(".batch_state") / "unset.json"  # the state file of the current generate()
        self._key: str | None = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise InputError(f"backends.openai_batch.api_key_env names the environment variable "
                                 f"{api_key_env!r}, which is not set; export it (the key is never read from the "
                                 "config), or set api_key_env: null for a local server without authentication")
            self._key = key
        self._rng = random.Random()
        self.stats = {"submitted_batches": 0, "submitted_requests": 0, "reattached_batches": 0, "polls": 0}

    def __repr__(self) -> str:  # never shows the key
        return (f"OpenAIBatchBackend(model={self.model!r}, base_url={self.base_url!r}, "
                f"api_key_env={self.api_key_env!r})")

    def _say(self, msg: str) -> None:
        if self.progress:
            print(f"[openai_batch] {msg}", file=sys.stderr, flush=True)

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    # ---- HTTP with retries ----------------------------------------------------------------------------------
    def _http(self, method: str, path: str, data: bytes | None = None, content_type: str | None = None) -> bytes:
        """One Files/Batches call, retried after 408/409/429/5xx, timeouts and connection errors."""
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        url = self.base_url + path
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method=method)
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return resp.read()
            except urllib.error.HTTPError as e:
                detail = self._redact(e.read(2000).decode("utf-8", "replace").strip())
                last = f"HTTP {e.code} from {method} {url}: {detail[:500]}"
                if not (e.code in RETRY_STATUS or e.code >= 500):
                    raise BatchAPIError(last) from None
                retry_after = retry_after_seconds(e.headers.get("Retry-After"))
            except (TimeoutError, socket.timeout):
                last = f"timed out after {self.timeout_s:g}s ({method} {url})"
            except urllib.error.URLError as e:
                last = f"cannot reach {url}: {self._redact(str(e.reason))}"
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                last = f"connection error with {url}: {type(e).__name__}: {self._redact(str(e))}"
            if attempt < self.max_retries:
                time.sleep(backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, retry_after, self._rng))
        raise BatchAPIError(f"gave up after {self.max_retries + 1} attempts; last error: {last}")

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        raw = self._http(method, path, None if body is None else json.dumps(body).encode("utf-8"),
                         None if body is None else "application/json")
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            raise BatchAPIError(f"{method} {self.base_url}{path}: the answer is not JSON") from None
        if not isinstance(data, dict):
            raise BatchAPIError(f"{method} {self.base_url}{path}: the answer is not a JSON object")
        return data

    # ---- the lifecycle --------------------------------------------------------------------------------------
    def _save(self, state: dict[str, Any]) -> None:
        write_json_atomic(self._state_path, state)

    def _submit(self, state: dict[str, Any], reqs: list[GenerationRequest], tries: dict[str, int]) -> list[dict]:
        """Upload and create the batches of `reqs`; each is in the state file before and after its creation."""
        entries = []
        for url, ids, content in request_files(reqs, self.model, self.extra_body, self.max_requests_per_batch,
                                               self.max_batch_bytes):
            body, ctype = multipart({"purpose": "batch"}, f"{self._state_path.stem}-{len(state['batches'])}.jsonl",
                                    content.encode("utf-8"))
            file_id = str(self._json_raw("POST", "/files", body, ctype)["id"])
            attempt = 1 + max(tries.get(rid, 0) for rid in ids)
            entry = {"batch_id": None, "input_file_id": file_id, "endpoint": url, "request_ids": ids,
                     "try": attempt, "status": "creating", "output_file_id": None, "error_file_id": None,
                     "submitted_at": round(time.time(), 3)}
            state["batches"].append(entry)
            self._save(state)  # a kill from here on finds the batch again by its input file
            self._create(state, entry)
            for rid in ids:
                tries[rid] = tries.get(rid, 0) + 1
            self.stats["submitted_batches"] += 1
            self.stats["submitted_requests"] += len(ids)
            self._say(f"submitted batch {entry['batch_id']} ({len(ids)} requests, try {attempt})")
            entries.append(entry)
        return entries

    def _json_raw(self, method: str, path: str, data: bytes, content_type: str) -> dict[str, Any]:
        raw = self._http(method, path, data, content_type)
        try:
            out = json.loads(raw)
        except json.JSONDecodeError:
            raise BatchAPIError(f"{method} {self.base_url}{path}: the answer is not JSON") from None
        if not isinstance(out, dict) or "id" not in out:
            raise BatchAPIError(f"{method} {self.base_url}{path}: no id in the answer")
        return out

    def _create(self, state: dict[str, Any], entry: dict[str, Any]) -> None:
        batch = self._json("POST", "/batches", {
            "input_file_id": entry["input_file_id"], "endpoint": entry["endpoint"],
            "completion_window": self.completion_window,
            "metadata": {"state": self._state_path.name[:500], "try": str(entry["try"])}})
        self._update(entry, batch)
        self._save(state)

    def _adopt(self, state: dict[str, Any], entry: dict[str, Any]) -> None:
        """A batch whose creation a kill cut off: find it by its input file, else create it now."""
        listing = self._json("GET", "/batches?limit=100")
        for batch in listing.get("data") or []:
            if batch.get("input_file_id") == entry["input_file_id"]:
                self._update(entry, batch)
                self._save(state)
                self._say(f"found batch {entry['batch_id']} of input file {entry['input_file_id']}")
                return
        self._create(state, entry)

    @staticmethod
    def _update(entry: dict[str, Any], batch: dict[str, Any]) -> None:
        entry["batch_id"] = str(batch.get("id") or entry.get("batch_id"))
        entry["status"] = str(batch.get("status") or "validating")
        entry["output_file_id"] = batch.get("output_file_id")
        entry["error_file_id"] = batch.get("error_file_id")
        entry["request_counts"] = batch.get("request_counts")
        if batch.get("errors"):
            entry["errors"] = batch["errors"]

    def _poll(self, state: dict[str, Any], entry: dict[str, Any]) -> None:
        if entry.get("batch_id") is None:
            self._adopt(state, entry)
            return
        before = entry["status"]
        self._update(entry, self._json("GET", f"/batches/{entry['batch_id']}"))
        self.stats["polls"] += 1
        if entry["status"] != before:
            self._save(state)
            counts = entry.get("request_counts") or {}
            self._say(f"batch {entry['batch_id']}: {entry['status']} ({counts.get('completed', '?')} of "
                      f"{counts.get('total', len(entry['request_ids']))} done)")

    def _results(self, entry: dict[str, Any]) -> dict[str, tuple[dict | None, str, bool]]:
        """custom_id -> (body, error, retryable) from a terminal batch's output and error files."""
        out: dict[str, tuple[dict | None, str, bool]] = {}
        for key in ("error_file_id", "output_file_id"):  # an output line wins over an error line
            fid = entry.get(key)
            if not fid:
                continue
            try:
                raw = self._http("GET", f"/files/{fid}/content").decode("utf-8", "replace")
            except BatchAPIError as e:
                if not str(e).startswith("HTTP 404"):
                    raise
                # a file the provider no longer keeps: its requests count as without a result (resubmitted)
                self._say(f"batch {entry['batch_id']}: file {fid} is gone ({e}); its requests have no result")
                continue
            for n, text in enumerate(raw.splitlines(), start=1):
                if not text.strip():
                    continue
                try:
                    line = json.loads(text)
                except json.JSONDecodeError:
                    raise BatchAPIError(f"batch {entry['batch_id']}: line {n} of file {fid} is not JSON") from None
                cid, body, err, retry = classify_result(line)
                out[cid] = (body, err, retry)
        return out

    # ---- public API -----------------------------------------------------------------------------------------
    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[Completion]:
        """Yield one Completion per request once its batch is terminal (see the module docstring)."""
        reqs: dict[str, GenerationRequest] = {}
        for req in requests:
            problem = validate_request(req)
            if problem is not None:
                yield error_completion(req, self.model, problem)
            else:
                reqs[req.id] = req
        if not reqs:
            return
        self._state_path = self.state_path or Path(".batch_state") / f"{stable_hash(sorted(reqs), n=16)}.json"
        self._state_path.parent.mkdir(parents=True, exist_ok=True)
        unresolved = set(reqs)
        try:
            yield from self._run(reqs, unresolved)
        except BatchAPIError as e:
            msg = self._redact(str(e))
            self._say(f"stopped: {msg}; the batch ids are kept in {self._state_path}, a re-run re-attaches")
            for rid in sorted(unresolved):
                yield error_completion(reqs[rid], self.model, f"request {rid}: batch API: {msg}")

    def _run(self, reqs: dict[str, GenerationRequest], unresolved: set[str]) -> Iterator[Completion]:
        state = load_state(self._state_path)
        owner, tries = owners(state, reqs)
        known = [e for e in state["batches"] if any(owner.get(r) is e for r in e["request_ids"])]
        if known:
            self.stats["reattached_batches"] += len(known)
            self._say(f"re-attaching to {len(known)} batch(es) from {self._state_path}")
        new = [reqs[r] for r in reqs if r not in owner]
        active = known + (self._submit(state, new, tries) if new else [])
        for entry in active[len(known):]:
            for rid in entry["request_ids"]:
                owner[rid] = entry
        t0 = time.monotonic()
        while active:
            for entry in list(active):
                if entry["status"] not in TERMINAL:
                    self._poll(state, entry)
                if entry["status"] not in TERMINAL:
                    continue
                active.remove(entry)
                retry: list[GenerationRequest] = []
                results = self._results(entry)
                for rid in entry["request_ids"]:
                    if rid not in unresolved or owner.get(rid) is not entry:
                        continue
                    body, err, retryable = results.get(rid, (None, f"no result in batch {entry['batch_id']} "
                                                                  f"(status {entry['status']}"
                                                                  f"{batch_errors(entry)})", True))
                    if body is not None:
                        c = self._completion(reqs[rid], body)
                    elif retryable and tries.get(rid, 0) < self.max_batch_tries:
                        retry.append(reqs[rid])
                        continue
                    else:
                        c = error_completion(reqs[rid], self.model, f"request {rid}: {err} (batch "
                                             f"{entry['batch_id']}, {tries.get(rid, 0)} batch(es) tried)")
                    unresolved.discard(rid)
                    yield c
                if retry:
                    self._say(f"batch {entry['batch_id']} ({entry['status']}): resubmitting {len(retry)} requests")
                    for new_entry in self._submit(state, retry, tries):
                        active.append(new_entry)
                        for rid in new_entry["request_ids"]:
                            owner[rid] = new_entry
            if active and self.max_wait_s is not None and time.monotonic() - t0 > self.max_wait_s:
                waiting = ", ".join(f"{e['batch_id']} ({e['status']})" for e in active)
                raise BatchAPIError(f"batches {waiting} not finished after max_wait_s={self.max_wait_s:g}s")
            if active:
                time.sleep(self.poll_interval_s)

    def _completion(self, req: GenerationRequest, body: dict[str, Any]) -> Completion:
        try:
            return completion_from_body(req, body, self.model)
        except Exception as e:  # noqa: BLE001 - a malformed line must not lose the others
            return error_completion(req, self.model, f"request {req.id}: bad response in the output file "
                                    f"({type(e).__name__}: {self._redact(str(e))})")

    def close(self) -> None:
        self._key = None
