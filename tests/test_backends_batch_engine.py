"""The openai_batch engine through the synthesis shard job, against the stand-in Batch API (tests/batch_standin.py)
whose completions come from vLLM's offline batch runner (`python -m vllm.entrypoints.openai.run_batch`, the OpenAI
batch file format) on the offline SmolLM2 model.

To keep the engine starts to one, the module runs run_batch once over every request these tests make (three
articles, two Rephrase texts each, 8 new tokens); the stand-in then serves each batch's lines from that run's
outputs by request body. Article a3 is longer than the runner's max_model_len, so vLLM answers its requests with
HTTP 400 lines: the error file's content is real too.

- a normal shard: one upload, one batch, every record's text is run_batch's;
- a kill: the job is SIGKILLed while its batch is in progress; the re-run polls the same batch id, uploads and
  creates nothing, and the records have no duplicates;
- an expired batch: its finished request is kept, the rest go into a second batch;
- errors in the error file are recorded in the stats (the ledger's failures), and a re-run submits nothing new.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch_standin import RunBatchCompleter, StandInServer, body_key
from workflow_scripts import synthesis as syn
from workflow_scripts.backends import openai_batch as ob
from workflow_scripts.config import validate_config
from workflow_scripts.io_utils import iter_jsonl, read_jsonl

pytestmark = pytest.mark.engine

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed in this environment; `bash scripts/bootstrap.sh --vllm` adds it (run_batch "
                "makes the stand-in's completions)", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
SERVED = "smollm2"
A1 = {"uid": "a1", "title": "The Lighthouse", "author": "Keeper, Anna", "year": 1961,
      "text": "Anna Keeper tended the lighthouse on Gull Island. One stormy night the lamp failed and she kept an "
              "oil lantern burning until dawn, so that the boat Marigold found the harbour."}
A2 = {"uid": "a2", "title": "The Ferry", "author": "Keeper, Thomas", "year": 1958,
      "text": "Thomas Keeper ran the ferry Heron to Port Ellen. The doctor, Margaret Hale, crossed with him every "
              "month and brought the news from the mainland."}
A3 = {"uid": "a3", "title": "The Long Log", "author": "Dunn, Robert", "year": 1960,
      "text": " ".join(f"On day {i} the Marigold sailed from Port Ellen past Gull Island and back again."
                       for i in range(300))}  # about 5,000 tokens: over max_model_len 2048
PORTS = iter(range(20260, 20290))


def config(base_url: str) -> dict:
    return {"models": {"generator": {"source": "hf", "name": SERVED}},
            "synthesis": {"backend": "openai_batch", "methods": ["rephrase"], "articles_per_job": 4,
                          "max_failed_fraction": 0.0, "sampling": {"max_new_tokens": 8, "seed": 5},
                          "rephrase": {"styles": ["easy", "hard"], "repeats": 1, "max_new_tokens": 8}},
            "backends": {"openai_batch": {"base_url": base_url, "api_key_env": None, "poll_interval_s": 0.2,
                                          "backoff_base_s": 0.05, "backoff_max_s": 0.1}}}


def batch_lines(articles: list[dict]) -> list[dict]:
    """The requests-file lines the engine writes for these articles (the same planning code as the job)."""
    cfg = validate_config(config("http://unused/v1"))
    out = []
    for article in articles:
        run = syn.plan_article(cfg, "rephrase", article, None)
        out += [json.loads(ob.batch_line(run.request(rid, task, seed), SERVED)[1]) for rid, task, seed in run.planned]
    return out


@pytest.fixture(scope="module")
def completer(smollm_dir, tmp_path_factory):
    """One run_batch invocation over the six requests of the three articles."""
    c = RunBatchCompleter(smollm_dir, SERVED, tmp_path_factory.mktemp("run_batch"), max_model_len=2048)
    t0 = time.time()
    c.run_batch(batch_lines([A1, A2, A3]))
    print(f"run_batch over 6 requests: {time.time() - t0:.0f}s (engine start included)")
    assert c.runs == 1 and len(c.bank) == 6
    return c


def expected_text(completer: RunBatchCompleter, line: dict) -> str:
    return completer.bank[body_key(line["body"])]["response"]["body"]["choices"][0]["message"]["content"]


def setup_shard(tmp_path: Path, articles: list[dict]) -> tuple[Path, str, list[str]]:
    path = tmp_path / "articles.jsonl"
    path.write_text("".join(json.dumps(a) + "\n" for a in articles))
    ((shard, uids),) = syn.article_shards([a["uid"] for a in articles], 4)
    return path, shard, uids


def shard_args(cfg: dict, articles: Path, shard: str, uids: list[str], tmp_path: Path) -> list[str]:
    return ["synthesize-shard", "--method", "rephrase", "--articles", str(articles), "--shard", shard,
            "--shard-articles", *uids, "--outdir", str(tmp_path / "out" / shard), "--work-dir",
            str(tmp_path / "work"), "--config-json", json.dumps(cfg)]


def posts(srv: StandInServer, path: str) -> int:
    return sum(1 for m, p in srv.state.log if m == "POST" and p == path)


def test_a_shard_is_one_batch_of_run_batch_completions(completer, tmp_path):
    articles, shard, uids = setup_shard(tmp_path, [A1, A2])
    with StandInServer(next(PORTS), completer) as srv:
        assert syn.main(shard_args(config(srv.base_url), articles, shard, uids, tmp_path)) == 0
    assert posts(srv, "/v1/files") == 1 and posts(srv, "/v1/batches") == 1  # the shard's 4 requests, one batch
    by_id = {x["custom_id"]: x for x in batch_lines([A1, A2])}
    for uid in uids:
        recs = read_jsonl(tmp_path / "out" / shard / f"{uid}.jsonl")
        assert len(recs) == 2
        for r in recs:  # the text and token counts are vLLM's, as run_batch wrote them
            assert r["text"] == expected_text(completer, by_id[r["id"]]) and r["model"] == SERVED
            assert r["completion_tokens"] == 8 and r["prompt_tokens"] > 50
    state = json.loads((tmp_path / "work" / "batches" / f"{shard}.json").read_text())
    assert [b["status"] for b in state["batches"]] == ["completed"] and len(state["batches"][0]["request_ids"]) == 4


def test_a_killed_job_re_attaches_to_its_batch(completer, tmp_path):
    articles, shard, uids = setup_shard(tmp_path, [A1, A2])
    state_file = tmp_path / "work" / "batches" / f"{shard}.json"
    with StandInServer(next(PORTS), completer) as srv:
        srv.state.plans = [{"hold": True}]
        cfg = config(srv.base_url)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
        with open(tmp_path / "killed.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "workflow_scripts.synthesis",
                                     *shard_args(cfg, articles, shard, uids, tmp_path)],
                                    cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and not (
                state_file.exists() and json.loads(state_file.read_text())["batches"]
                and srv.state.batches.get("batch_0000", {}).get("status") == "in_progress"
                and srv.state.log.count(("GET", "/v1/batches/batch_0000")) >= 2):
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        (entry,) = json.loads(state_file.read_text())["batches"]
        assert entry["batch_id"] == "batch_0000" and entry["status"] == "in_progress"
        assert not (tmp_path / "out" / shard / f"{uids[0]}.jsonl").exists()
        srv.state.release()
        assert syn.main(shard_args(cfg, articles, shard, uids, tmp_path)) == 0
    # the re-run polled batch_0000 and submitted nothing: still one upload and one batch
    assert posts(srv, "/v1/files") == 1 and posts(srv, "/v1/batches") == 1
    assert srv.state.batches["batch_0000"]["status"] == "completed"
    for uid in uids:
        ids = [r["id"] for _, r in iter_jsonl(tmp_path / "work" / f"{uid}.jsonl")]
        assert len(ids) == len(set(ids)) == 2  # no duplicates in the append-only record file
        assert len(read_jsonl(tmp_path / "out" / shard / f"{uid}.jsonl")) == 2


def test_an_expired_batch_keeps_its_finished_request_and_resubmits_the_rest(completer, tmp_path):
    articles, shard, uids = setup_shard(tmp_path, [A1, A2])
    with StandInServer(next(PORTS), completer) as srv:
        srv.state.plans = [{"expire_after": 1}]
        assert syn.main(shard_args(config(srv.base_url), articles, shard, uids, tmp_path)) == 0
    b0, b1 = json.loads((tmp_path / "work" / "batches" / f"{shard}.json").read_text())["batches"]
    assert b0["status"] == "expired" and b0["request_counts"]["completed"] == 1
    assert b1["status"] == "completed" and b1["try"] == 2 and b1["request_ids"] == b0["request_ids"][1:]
    by_id = {x["custom_id"]: x for x in batch_lines([A1, A2])}
    recs = {r["id"]: r for uid in uids for r in read_jsonl(tmp_path / "out" / shard / f"{uid}.jsonl")}
    assert sorted(recs) == sorted(b0["request_ids"])
    assert all(r["text"] == expected_text(completer, by_id[rid]) for rid, r in recs.items())


def test_errors_in_the_error_file_are_recorded_and_not_resubmitted(completer, tmp_path):
    articles, shard, uids = setup_shard(tmp_path, [A1, A3])
    with StandInServer(next(PORTS), completer) as srv:
        cfg = config(srv.base_url)
        assert syn.main(shard_args(cfg, articles, shard, uids, tmp_path)) == 1  # a3 is incomplete
        assert posts(srv, "/v1/batches") == 1
        err_file = srv.state.files[srv.state.batches["batch_0000"]["error_file_id"]].decode()
        assert err_file.count("\n") == 2 and "maximum context length" in err_file  # vLLM's own 400 answers
        out = tmp_path / "out" / shard
        assert len(read_jsonl(out / "a1.jsonl")) == 2 and not (out / "a3.jsonl").exists()
        stats = json.loads((out / "stats" / "a3.incomplete.json").read_text())
        assert stats["failures"] == 2 and stats["backend"] == "openai_batch"
        assert all("HTTP 400" in f["error"] and "maximum context length" in f["error"]
                   for f in stats["failed_requests"])
        # a re-run reports the same errors from the batch it knows and submits nothing
        assert syn.main(shard_args(cfg, articles, shard, uids, tmp_path)) == 1
        assert posts(srv, "/v1/batches") == 1 and posts(srv, "/v1/files") == 1
