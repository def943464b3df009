"""The openai engine against a real local HTTP server (127.0.0.1, a thread of this process) that speaks the
OpenAI chat/completions and completions protocol and injects 429s, 500s and timeouts on chosen attempts."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from workflow_scripts.backends import GenerationRequest, get_backend
from workflow_scripts.backends.openai_backend import (OpenAIBackend, backoff_delay, request_body,
                                                      retry_after_seconds)

pytestmark = pytest.mark.unit

KEY = "sk-test-7d1e0c-DO-NOT-LEAK"
TIMEOUT_S = 0.5


class FakeOpenAI:
    """State of the fake server: per-request-id fault plans, attempt counts, concurrency high-water mark."""

    def __init__(self) -> None:
        self.faults: dict[str, list[str]] = {}  # marker -> fault per attempt ("429", "429-after", "500", "timeout", "400-echo")
        self.attempts: dict[str, int] = {}
        self.served: list[str] = []  # markers answered with 200
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.hold_s = 0.0  # how long each successful answer takes (to observe concurrency)


def make_handler(state: FakeOpenAI):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def _send(self, code: int, obj: dict, headers: dict | None = None) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.headers.get("Authorization") != f"Bearer {KEY}":
                return self._send(401, {"error": {"message": "bad key"}})
            if self.path == "/v1/chat/completions":
                prompt = body["messages"][-1]["content"]
            elif self.path == "/v1/completions":
                prompt = body["prompt"]
            else:
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            marker = prompt.split()[0]
            with state.lock:
                attempt = state.attempts.get(marker, 0)
                state.attempts[marker] = attempt + 1
                plan = state.faults.get(marker, [])
                fault = plan[attempt] if attempt < len(plan) else None
            if fault == "429":
                return self._send(429, {"error": {"message": "rate limited"}})
            if fault == "429-after":
                return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.3"})
            if fault == "500":
                return self._send(500, {"error": {"message": "internal"}})
            if fault == "timeout":
                time.sleep(TIMEOUT_S * 3)
                return self._send(200, {"choices": [], "usage": {}})
            if fault == "400-echo":  # a careless server that echoes the request headers back
                return self._send(400, {"error": {"message": f"bad request; headers were {dict(self.headers)}"}})
            # in flight: counted while the answer is held, and no longer once it is being sent (the client
            # may send its next request as soon as it has the answer, before this thread ends)
            with state.lock:
                state.active += 1
                state.max_active = max(state.max_active, state.active)
            time.sleep(state.hold_s)
            with state.lock:
                state.active -= 1
            n = body.get("n", 1)
            words = prompt.split()
            choices = []
            for i in range(n):
                text = f"{marker} sample {i}. Answer: B. trailing words"
                if self.path == "/v1/chat/completions":
                    choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "length"})
                else:
                    choices.append({"index": i, "text": text, "finish_reason": "length"})
            with state.lock:
                state.served.append(marker)
            self._send(200, {"id": "x", "model": body["model"], "choices": choices[::-1],
                             "usage": {"prompt_tokens": len(words) + 3, "completion_tokens": 11 * n,
                                       "total_tokens": len(words) + 3 + 11 * n}})

    return Handler


@pytest.fixture
def server():
    state = FakeOpenAI()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    httpd.daemon_threads = True
    # shutdown() waits for the serve loop's next poll: 0.05 s, not the default 0.5 s
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield state, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def backend(url: str, monkeypatch, **kw) -> OpenAIBackend:
    monkeypatch.setenv("FAKE_OPENAI_KEY", KEY)
    settings = {"model": "served-model", "base_url": url, "api_key_env": "FAKE_OPENAI_KEY", "max_concurrency": 3,
                "max_retries": 4, "timeout_s": TIMEOUT_S, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
                "progress": False}
    settings.update(kw)
    return get_backend("openai", settings)


def chat(marker: str, **kw) -> GenerationRequest:
    return GenerationRequest(id=marker, group="art", max_new_tokens=32,
                             messages=[{"role": "system", "content": "sys"},
                                       {"role": "user", "content": f"{marker} please discuss the article"}], **kw)


def test_faults_are_retried_and_nothing_is_lost_or_duplicated(server, monkeypatch, caplog):
    state, url = server
    state.faults = {"m1": ["429"], "m2": ["500", "500"], "m3": ["timeout"], "m4": ["429-after"],
                    "m5": ["500", "timeout", "429"]}
    state.hold_s = 0.05
    b = backend(url, monkeypatch)
    reqs = [chat(f"m{i}") for i in range(12)]
    caplog.set_level(logging.DEBUG)
    t0 = time.perf_counter()
    got = list(b.generate(reqs))
    elapsed = time.perf_counter() - t0
    ids = [c.id for c in got]
    assert sorted(ids) == sorted(r.id for r in reqs) and len(ids) == len(set(ids))
    assert all(c.error is None for c in got), [c.error for c in got if c.error]
    by_id = {c.id: c for c in got}
    for r in reqs:
        c = by_id[r.id]
        assert c.text == f"{r.id} sample 0. Answer: B. trailing words"
        assert c.prompt_tokens == 5 + 3 and c.completion_tokens == 11  # from `usage`, not re-counted
        assert c.model == "served-model"
    assert state.attempts["m1"] == 2 and state.attempts["m2"] == 3 and state.attempts["m3"] == 2
    assert state.attempts["m4"] == 2 and state.attempts["m5"] == 4 and state.attempts["m0"] == 1
    assert sorted(state.served) == sorted(r.id for r in reqs), "each request answered exactly once"
    assert elapsed >= 0.3, "Retry-After: 0.3 was honoured"
    assert any("retry" in rec.getMessage() for rec in caplog.records)
    assert KEY not in caplog.text


def test_concurrency_is_bounded(server, monkeypatch):
    state, url = server
    state.hold_s = 0.1
    got = list(backend(url, monkeypatch, max_concurrency=3).generate(chat(f"c{i}") for i in range(10)))
    assert len(got) == 10 and all(c.error is None for c in got)
    assert state.max_active == 3, "at most max_concurrency requests in flight, and the pool is used"


def test_plain_prompt_uses_completions_with_n_samples_and_client_side_stop(server, monkeypatch):
    state, url = server
    b = backend(url, monkeypatch)
    req = GenerationRequest(id="q1", prompt="p1 Question: which? Reasoning:", n=3, temperature=0.1,
                            stop=["Answer: C.", "Answer: B."], max_new_tokens=64)
    (c,) = list(b.generate([req]))
    assert c.error is None
    assert c.texts == [f"p1 sample {i}. Answer: B." for i in range(3)]  # choices re-ordered by index, cut after stop
    assert c.finish_reasons == ["stop"] * 3
    assert c.completion_tokens == 33 and c.prompt_tokens == len(req.prompt.split()) + 3
    path, body = request_body(req, "m", "client")
    assert path == "/completions" and "stop" not in body and body["n"] == 3 and body["seed"] == 0
    path, body = request_body(req, "m", "server")
    assert body["stop"] == ["Answer: C.", "Answer: B."] and body["include_stop_str_in_output"] is True
    json_req = chat("x", metadata={"response_format": "json_object"})
    path, body = request_body(json_req, "m", "client", {"top_k": 20})
    assert path == "/chat/completions" and body["response_format"] == {"type": "json_object"}
    assert body["top_k"] == 20 and body["messages"][0] == {"role": "system", "content": "sys"}
    assert "response_format" not in request_body(chat("y"), "m", "client")[1]


def test_permanent_failures_become_errors_without_leaking_the_key(server, monkeypatch, caplog):
    state, url = server
    state.faults = {"bad": ["400-echo"], "down": ["500"] * 10}
    b = backend(url, monkeypatch, max_retries=2)
    caplog.set_level(logging.DEBUG)
    got = {c.id: c for c in b.generate([chat("bad"), chat("ok"), chat("down")])}
    assert set(got) == {"bad", "ok", "down"}
    assert got["ok"].error is None
    assert got["bad"].error and "HTTP 400" in got["bad"].error and got["bad"].texts == []
    assert state.attempts["bad"] == 1, "a 400 is not retried"
    assert got["down"].error and "gave up after 3 attempts" in got["down"].error
    assert state.attempts["down"] == 3
    assert "***" in got["bad"].error, "the echoed Authorization header was redacted"
    for c in got.values():
        assert KEY not in (c.error or "") and KEY not in repr(c)
    assert KEY not in caplog.text and KEY not in repr(b)


def test_missing_key_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ValueError, match="NOT_SET_ANYWHERE"):
        OpenAIBackend(model="m", base_url="http://127.0.0.1:9/v1", api_key_env="NOT_SET_ANYWHERE")


def test_unreachable_server_fails_each_request_after_retries():
    b = OpenAIBackend(model="m", base_url="http://127.0.0.1:9/v1", api_key_env=None, max_retries=1,
                      timeout_s=0.5, backoff_base_s=0.01, progress=False)
    got = list(b.generate([chat("a"), chat("b")]))
    assert sorted(c.id for c in got) == ["a", "b"]
    assert all(c.error and "gave up after 2 attempts" in c.error for c in got)


def test_backoff_and_retry_after_helpers():
    import random

    rng = random.Random(0)
    delays = [backoff_delay(a, 1.0, 60.0, None, rng) for a in range(8)]
    for a, d in enumerate(delays):
        cap = min(60.0, 2.0 ** a)
        assert cap / 2 <= d <= cap
    assert backoff_delay(0, 1.0, 60.0, 5.0, rng) == 5.0
    assert retry_after_seconds("2.5") == 2.5
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after_seconds(future) <= 31
