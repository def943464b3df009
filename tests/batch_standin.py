"""A local stand-in for an OpenAI-compatible Batch API (127.0.0.1 only), for the openai_batch engine's tests.

It implements the lifecycle the engine uses: files (POST /v1/files multipart upload, GET /v1/files/{id}/content),
batches (POST /v1/batches, GET /v1/batches/{id}, GET /v1/batches, POST /v1/batches/{id}/cancel), output and error
files, and expiry. A batch's status goes validating -> in_progress -> completed | expired | cancelled on the polls
it receives; tests steer it with `plans` (per batch, in creation order): `hold` keeps it in_progress until
`release()`, `expire_after: k` expires it with its first k requests done (the rest get `batch_expired` lines in
the error file, as OpenAI writes them), `cancel_after: k` likewise as a cancellation, `fail: [custom_id, ...]`
answers those requests with an HTTP 500 line (a retryable error), `fail_batch` fails the batch in validation
(no files; the batch's `errors` say why, as OpenAI's enqueued-token limit does).

Completions come from a `completer`: a function from input lines (the batch file's JSON objects) to output lines
in the OpenAI batch format. `RunBatchCompleter` runs vLLM's offline batch runner
(`python -m vllm.entrypoints.openai.run_batch`) on the offline model: one run over every request a test module
needs (`prewarm`), then each batch's lines are served from that run's outputs, looked up by request body; a body
that was not pre-warmed gets its own run_batch call. `echo_completer` is a tiny deterministic stand-in for the
unit tests of the engine's bookkeeping (no model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

Completer = Callable[[list[dict]], list[dict]]


def body_key(body: dict) -> str:
    return json.dumps(body, sort_keys=True)


def echo_completer(lines: list[dict]) -> list[dict]:
    """A deterministic chat completion per line: the words of the last message, reversed (no model)."""
    out = []
    for i, line in enumerate(lines):
        msg = line["body"]["messages"][-1]["content"]
        words = msg.split()[: int(line["body"].get("max_tokens", 16))]
        text = " ".join(reversed(words))
        out.append({"id": f"echo-{i}", "custom_id": line["custom_id"], "error": None, "response": {
            "status_code": 200, "request_id": f"req-{i}", "body": {
                "id": f"chatcmpl-{i}", "object": "chat.completion", "model": line["body"]["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(msg.split()), "completion_tokens": len(words),
                          "total_tokens": len(msg.split()) + len(words)}}}})
    return out


class RunBatchCompleter:
    """Completions from vLLM's offline batch runner on a local model folder (the OpenAI batch file format)."""

    def __init__(self, model_dir: Path, served_name: str, workdir: Path, max_model_len: int = 2048,
                 timeout_s: float = 900) -> None:
        self.model_dir, self.served_name, self.workdir = Path(model_dir), served_name, Path(workdir)
        self.max_model_len, self.timeout_s = max_model_len, timeout_s
        self.bank: dict[str, dict] = {}
        self.runs = 0
        self.lock = threading.Lock()

    def run_batch(self, lines: list[dict]) -> None:
        """One run_batch invocation over `lines` (deduplicated by body); its outputs go to the bank."""
        todo: dict[str, dict] = {}
        for line in lines:
            todo.setdefault(body_key(line["body"]), line)
        todo = {k: v for k, v in todo.items() if k not in self.bank}
        if not todo:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        n = self.runs
        inp, out = self.workdir / f"run{n}.in.jsonl", self.workdir / f"run{n}.out.jsonl"
        keys = list(todo)
        inp.write_text("".join(json.dumps({**todo[k], "custom_id": f"k{i}"}) + "\n" for i, k in enumerate(keys)))
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(inp), "-o", str(out),
               "--model", str(self.model_dir), "--served-model-name", self.served_name, "--dtype", "float32",
               "--enforce-eager", "--max-model-len", str(self.max_model_len), "--seed", "0"]
        with open(self.workdir / f"run{n}.log", "w") as log:
            subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=self.timeout_s, check=True)
        self.runs += 1
        for text in out.read_text().splitlines():
            rec = json.loads(text)
            self.bank[keys[int(rec["custom_id"][1:])]] = rec

    def __call__(self, lines: list[dict]) -> list[dict]:
        with self.lock:
            self.run_batch(lines)
            return [{**self.bank[body_key(line["body"])], "custom_id": line["custom_id"]} for line in lines]


class StandIn:
    """The server's state: files, batches and the test's plans."""

    def __init__(self, completer: Completer, api_key: str | None = None) -> None:
        self.completer = completer
        self.api_key = api_key
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.order: list[str] = []
        self.plans: list[dict] = []  # per batch in creation order; missing = complete normally
        self.held = threading.Event()
        self.log: list[tuple[str, str]] = []  # (method, path) of every call
        self.lock = threading.RLock()

    def release(self) -> None:
        self.held.set()

    # ---- files -------------------------------------------------------------------------------------------
    def add_file(self, content: bytes) -> str:
        fid = f"file-{len(self.files):04d}"
        self.files[fid] = content
        return fid

    def input_lines(self, batch_id: str) -> list[dict]:
        return [json.loads(x) for x in self.files[self.batches[batch_id]["input_file_id"]].decode().splitlines()
                if x.strip()]

    # ---- batches -----------------------------------------------------------------------------------------
    def create(self, body: dict) -> tuple[int, dict]:
        fid = body.get("input_file_id")
        if fid not in self.files:
            return 400, {"error": {"message": f"no file {fid}", "type": "invalid_request_error"}}
        if body.get("endpoint") not in ("/v1/chat/completions", "/v1/completions"):
            return 400, {"error": {"message": "unsupported endpoint", "type": "invalid_request_error"}}
        bid = f"batch_{len(self.order):04d}"
        n = len([x for x in self.files[fid].decode().splitlines() if x.strip()])
        self.batches[bid] = {"id": bid, "object": "batch", "endpoint": body["endpoint"], "input_file_id": fid,
                             "completion_window": body.get("completion_window", "24h"), "status": "validating",
                             "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
                             "metadata": body.get("metadata"), "errors": None,
                             "request_counts": {"total": n, "completed": 0, "failed": 0}}
        self.order.append(bid)
        return 200, self.batches[bid]

    def plan_of(self, bid: str) -> dict:
        i = self.order.index(bid)
        return self.plans[i] if i < len(self.plans) else {}

    def advance(self, bid: str) -> dict:
        """One poll's step of the lifecycle."""
        b = self.batches[bid]
        plan = self.plan_of(bid)
        if b["status"] == "validating" and plan.get("fail_batch"):
            b["status"] = "failed"
            b["errors"] = {"object": "list", "data": [{"code": "token_limit_exceeded",
                                                       "message": "stand-in: enqueued token limit reached"}]}
        elif b["status"] == "validating":
            b["status"] = "in_progress"
        elif b["status"] == "in_progress" and not (plan.get("hold") and not self.held.is_set()):
            self.finish(bid, plan)
        elif b["status"] == "cancelling":
            self.finish(bid, {"cancel_after": 0})
        return b

    def finish(self, bid: str, plan: dict) -> None:
        b = self.batches[bid]
        lines = self.input_lines(bid)
        stop = plan.get("expire_after", plan.get("cancel_after"))
        done_lines = lines if stop is None else lines[:stop]
        fail = set(plan.get("fail") or [])
        outputs = self.completer([x for x in done_lines if x["custom_id"] not in fail])
        ok, errors = [], []
        for rec in outputs:
            resp = rec.get("response") or {}
            (ok if resp.get("status_code") == 200 and not rec.get("error") else errors).append(rec)
        for x in done_lines:
            if x["custom_id"] in fail:
                errors.append({"id": f"err-{x['custom_id']}", "custom_id": x["custom_id"], "response": {
                    "status_code": 500, "request_id": "r", "body": {"error": {"message": "stand-in server error",
                                                                              "type": "server_error"}}},
                    "error": None})
        if stop is not None:
            code = "batch_expired" if "expire_after" in plan else "batch_cancelled"
            for x in lines[stop:]:
                errors.append({"id": f"err-{x['custom_id']}", "custom_id": x["custom_id"], "response": None,
                               "error": {"code": code, "message": f"stand-in: {code}"}})
        b["output_file_id"] = self.add_file("".join(json.dumps(r) + "\n" for r in ok).encode()) if ok else None
        b["error_file_id"] = self.add_file("".join(json.dumps(r) + "\n" for r in errors).encode()) if errors else None
        b["request_counts"] = {"total": len(lines), "completed": len(ok), "failed": len(errors)}
        b["status"] = ("expired" if "expire_after" in plan else "cancelled" if "cancel_after" in plan
                       else "completed")


def _handler(state: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, code: int, obj: Any = None, raw: bytes | None = None) -> None:
            data = raw if raw is not None else json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if state.api_key and self.headers.get("Authorization") != f"Bearer {state.api_key}":
                self._send(401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
                return False
            return True

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            with state.lock:
                state.log.append(("GET", path))
                if not self._authorized():
                    return
                parts = path.strip("/").split("/")
                if parts[:2] == ["v1", "files"] and len(parts) == 4 and parts[3] == "content":
                    if parts[2] not in state.files:
                        return self._send(404, {"error": {"message": "no such file"}})
                    return self._send(200, raw=state.files[parts[2]])
                if parts[:2] == ["v1", "batches"] and len(parts) == 3:
                    if parts[2] not in state.batches:
                        return self._send(404, {"error": {"message": "no such batch"}})
                    return self._send(200, state.advance(parts[2]))
                if parts == ["v1", "batches"]:
                    data = [state.batches[b] for b in reversed(state.order)]
                    return self._send(200, {"object": "list", "data": data, "has_more": False})
                self._send(404, {"error": {"message": f"no route {path}"}})

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with state.lock:
                state.log.append(("POST", path))
                if not self._authorized():
                    return
                parts = path.strip("/").split("/")
                if parts == ["v1", "files"]:
                    content, purpose = parse_multipart(body, self.headers.get("Content-Type", ""))
                    if purpose != "batch":
                        return self._send(400, {"error": {"message": "purpose must be batch"}})
                    fid = state.add_file(content)
                    return self._send(200, {"id": fid, "object": "file", "bytes": len(content), "purpose": purpose})
                if parts == ["v1", "batches"]:
                    code, obj = state.create(json.loads(body))
                    return self._send(code, obj)
                if parts[:2] == ["v1", "batches"] and len(parts) == 4 and parts[3] == "cancel":
                    b = state.batches.get(parts[2])
                    if b is None:
                        return self._send(404, {"error": {"message": "no such batch"}})
                    if b["status"] in ("validating", "in_progress"):
                        b["status"] = "cancelling"
                    return self._send(200, b)
                self._send(404, {"error": {"message": f"no route {path}"}})

    return Handler


def parse_multipart(body: bytes, content_type: str) -> tuple[bytes, str]:
    """(file content, purpose) of a multipart/form-data upload."""
    boundary = content_type.split("boundary=", 1)[1].strip().strip('"').encode()
    content, purpose = b"", ""
    for part in body.split(b"--" + boundary):
        if b"\r\n\r\n" not in part:
            continue
        head, data = part.split(b"\r\n\r\n", 1)
        data = data[:-2] if data.endswith(b"\r\n") else data
        if b'name="file"' in head:
            content = data
        elif b'name="purpose"' in head:
            purpose = data.decode()
    return content, purpose


class StandInServer:
    """The stand-in on 127.0.0.1:`port` in a background thread (`with StandInServer(...) as srv:`)."""

    def __init__(self, port: int, completer: Completer, api_key: str | None = None) -> None:
        self.state = StandIn(completer, api_key)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(self.state))
        self.base_url = f"http://127.0.0.1:{port}/v1"
        # shutdown() waits for the serve loop's next poll: 0.05 s, not the default 0.5 s, at every test's end
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "StandInServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


if __name__ == "__main__":  # a manual stand-in: python tests/batch_standin.py PORT (echo completions)
    with StandInServer(int(sys.argv[1]), echo_completer) as srv:
        print(f"stand-in Batch API at {srv.base_url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
