"""The openai backend against a real OpenAI-compatible server: vLLM's own (`python -m
vllm.entrypoints.openai.api_server`, the CPU build without CUDA) serving the offline model on 127.0.0.1.

A full synthesis job (extraction, EntiGraph, Rephrase of one article) runs against it. Then the server is killed
(kill -9) in the middle of a second job: after its configured retries the job stops with one clear error line
and keeps what it finished; the server is restarted and a re-run completes the job with no duplicate and no lost
record.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from workflow_scripts import synthesis as syn
from workflow_scripts.io_utils import iter_jsonl, read_jsonl

pytestmark = pytest.mark.engine

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed in this environment; `bash scripts/bootstrap.sh --vllm` adds it (the README's "
                "test command does)", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
SERVED = "smollm2-test"
ARTICLE = {"uid": "s1", "title": "The Ferry to Port Ellen", "author": "Keeper, Thomas", "year": 1958,
           "text": ("Thomas Keeper ran the ferry between Gull Island and Port Ellen. Every morning he carried the "
                    "post, the doctor Margaret Hale and the schoolchildren of the island across the sound. In the "
                    "winter of 1957 the ferry Heron broke her propeller on the rocks off Black Point, and Thomas "
                    "rowed the children home in a borrowed boat while Captain Robert Dunn towed the Heron to the "
                    "yard at Port Ellen.")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """vLLM's OpenAI-compatible server in its own process group (kill -9 takes its engine process too)."""

    def __init__(self, model_dir: Path, port: int, log: Path) -> None:
        self.model_dir, self.port, self.log = model_dir, port, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 900) -> float:
        t0 = time.time()
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                 "--served-model-name", SERVED, "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
                 "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"the vLLM server exited ({self.proc.returncode}): "
                                     f"{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=5) as r:
                    if SERVED in r.read().decode():
                        return time.time() - t0
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"the vLLM server did not come up in {timeout:.0f}s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def server(smollm_dir, tmp_path_factory):
    srv = Server(smollm_dir, free_port(), tmp_path_factory.mktemp("server") / "server.log")
    print(f"vLLM server up in {srv.start():.0f}s")
    yield srv
    srv.kill()


def job_config(port: int, seed: int, styles: list[str], repeats: int, max_new_tokens: int) -> dict:
    return {
        "models": {"generator": {"source": "hf", "name": SERVED}},
        "backends": {"openai": {"base_url": f"http://127.0.0.1:{port}/v1", "api_key_env": None,
                                "max_concurrency": 1, "max_retries": 2, "backoff_base_s": 0.2, "backoff_max_s": 1,
                                "timeout_s": 60, "progress": False}},
        "synthesis": {"backend": "openai", "articles_per_job": 4,
                      "sampling": {"max_new_tokens": max_new_tokens, "seed": seed},
                      "entigraph": {"max_entities": 3, "max_pairs": 2, "max_triples": 1, "extraction_retries": 0,
                                    "extraction_max_new_tokens": 24, "extraction_fallback": "heuristic"},
                      "rephrase": {"styles": styles, "repeats": repeats}},
    }


def run_cli(*args: str, cfg: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflow_scripts.synthesis", *args, "--config-json",
                           json.dumps(cfg)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=timeout)


def test_synthesis_against_a_real_server_survives_its_death(server, tmp_path):
    articles = tmp_path / "articles.jsonl"
    articles.write_text(json.dumps(ARTICLE) + "\n")
    ((shard, uids),) = syn.article_shards(["s1"], 4)
    common = ["--articles", str(articles), "--shard", shard, "--shard-articles", *uids]

    # 1. a full synthesis job: extraction, then both methods
    cfg = job_config(server.port, seed=3, styles=["easy", "hard"], repeats=1, max_new_tokens=16)
    ext = run_cli("extract-shard", *common, "--outdir", str(tmp_path / "entities"), "--work-dir",
                  str(tmp_path / "work" / "extraction"), cfg=cfg)
    assert ext.returncode == 0, ext.stderr[-3000:]
    doc = json.loads((tmp_path / "entities" / "s1.json").read_text())
    assert doc["status"] in ("ok", "fallback") and doc["attempts"][0]["prompt_tokens"] > 100
    for method, n in (("entigraph", None), ("rephrase", 2)):
        res = run_cli("synthesize-shard", "--method", method, *common, "--entities-dir", str(tmp_path / "entities"),
                      "--outdir", str(tmp_path / method), "--work-dir", str(tmp_path / "work" / method), cfg=cfg)
        assert res.returncode == 0, res.stderr[-3000:]
        recs = read_jsonl(tmp_path / method / "s1.jsonl")
        stats = json.loads((tmp_path / method / "stats" / "s1.json").read_text())
        assert stats["status"] == "complete" and stats["backend"] == "openai" and stats["failures"] == 0
        body = [r for r in recs if r["kind"] != "summary"]
        assert body and (n is None or len(body) == n)
        for r in body:
            assert r["model"] == SERVED and r["text"] and 1 <= r["completion_tokens"] <= 16 and r["prompt_tokens"] > 100

    # 2. the server dies (kill -9) during a job: one clear error line after the configured retries, records kept
    cfg2 = job_config(server.port, seed=11, styles=["easy", "medium", "hard"], repeats=3, max_new_tokens=48)
    args2 = ["synthesize-shard", "--method", "rephrase", *common, "--outdir", str(tmp_path / "r2"),
             "--work-dir", str(tmp_path / "work" / "r2")]
    work = tmp_path / "work" / "r2" / "s1.jsonl"
    job = subprocess.Popen([sys.executable, "-m", "workflow_scripts.synthesis", *args2, "--config-json",
                            json.dumps(cfg2)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and job.poll() is None and not (work.exists() and work.read_text().count("\n")):
        time.sleep(0.1)
    assert job.poll() is None, "the job ended before the server could be killed"
    server.kill()
    _, err = job.communicate(timeout=300)
    assert job.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: shard ") and "gave up after 3 attempts" in last and "re-run" in last, last
    assert f"127.0.0.1:{server.port}" in last
    kept = {r["id"]: r for _, r in iter_jsonl(work, allow_truncated_tail=True)}
    assert 1 <= len(kept) < 9 and not (tmp_path / "r2" / "s1.jsonl").exists()

    # 3. the server is back: the re-run generates only what is missing
    print(f"vLLM server restarted in {server.start():.0f}s")
    res = run_cli(*args2, cfg=cfg2)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = read_jsonl(tmp_path / "r2" / "s1.jsonl")
    assert len(recs) == 9 and len({r["id"] for r in recs}) == 9
    assert all(old in recs for old in kept.values())
    stats = json.loads((tmp_path / "r2" / "stats" / "s1.json").read_text())
    assert stats["reused"] == len(kept) and stats["generated"] == 9 - len(kept)
