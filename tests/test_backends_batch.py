"""The openai_batch engine's bookkeeping (workflow_scripts/backends/openai_batch.py): the requests file, result
lines, the state file, re-attaching, expiry and resubmission, the ledger's and the planner's batch price.

The lifecycle tests run against tests/batch_standin.py with its `echo_completer` (no model: these pin the
engine's bookkeeping); tests/test_backends_batch_engine.py runs the same lifecycle with completions from vLLM's
offline batch runner on the offline model, through the synthesis shard job (a kill and re-attach included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batch_standin import StandInServer, echo_completer
from workflow_scripts.backends import GenerationRequest, get_backend
from workflow_scripts.backends import openai_batch as ob
from workflow_scripts.config import load_config
from workflow_scripts.io_utils import InputError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PORTS = iter(range(20210, 20260))


def chat(i: int, text: str = "", **kw) -> GenerationRequest:
    return GenerationRequest(id=f"r{i}", messages=[{"role": "system", "content": "sys"},
                                                    {"role": "user", "content": text or f"one two three {i}"}],
                             max_new_tokens=kw.pop("max_new_tokens", 4), temperature=1.0, seed=i, **kw)


# ------------------------------------------------------------------------------------------------ pure logic
def test_requests_file_lines_carry_the_record_id_and_the_openai_body():
    url, line = ob.batch_line(chat(0), "gpt-4o-mini")
    rec = json.loads(line)
    assert url == "/v1/chat/completions" and rec["url"] == url and rec["method"] == "POST"
    assert rec["custom_id"] == "r0"
    assert rec["body"]["model"] == "gpt-4o-mini" and rec["body"]["max_tokens"] == 4 and rec["body"]["seed"] == 0
    assert rec["body"]["messages"][1]["content"] == "one two three 0"
    plain = GenerationRequest(id="p", prompt="Q: 1+1?\nA:", max_new_tokens=2)
    assert ob.batch_line(plain, "m")[0] == "/v1/completions"


def test_requests_files_are_cut_by_count_bytes_and_endpoint():
    reqs = [chat(i) for i in range(5)] + [GenerationRequest(id="p", prompt="x", max_new_tokens=1)]
    files = ob.request_files(reqs, "m", None, max_requests=2, max_bytes=10**9)
    assert [(u, ids) for u, ids, _ in files] == [("/v1/chat/completions", ["r0", "r1"]),
                                                 ("/v1/chat/completions", ["r2", "r3"]),
                                                 ("/v1/chat/completions", ["r4"]), ("/v1/completions", ["p"])]
    assert all(content.count("\n") == len(ids) for _, ids, content in files)
    one_line = len(ob.batch_line(chat(0), "m")[1].encode())
    files = ob.request_files(reqs[:3], "m", None, max_requests=100, max_bytes=2 * one_line + 2)
    assert [ids for _, ids, _ in files] == [["r0", "r1"], ["r2"]]


def test_result_lines_are_classified_as_openai_and_vllm_write_them():
    ok = {"custom_id": "a", "response": {"status_code": 200, "body": {"choices": []}}, "error": None}
    assert ob.classify_result(ok) == ("a", {"choices": []}, "", False)
    vllm_400 = {"custom_id": "b", "response": {"status_code": 400, "body": None}, "error": {"error": {
        "message": "This model's maximum context length is 2048 tokens.", "type": "BadRequestError", "code": 400}}}
    cid, body, err, retry = ob.classify_result(vllm_400)
    assert (cid, body, retry) == ("b", None, False) and "HTTP 400" in err and "maximum context length" in err
    expired = {"custom_id": "c", "response": None, "error": {"code": "batch_expired", "message": "too late"}}
    assert ob.classify_result(expired)[2:] == ("batch_expired: too late", True)
    server = {"custom_id": "d", "response": {"status_code": 500, "body": {"error": {"message": "boom"}}},
              "error": None}
    assert ob.classify_result(server)[2:] == ("HTTP 500: boom", True)


def test_state_file_missing_damaged_and_owners(tmp_path):
    p = tmp_path / "s.json"
    assert ob.load_state(p) == {"version": 1, "batches": []}
    p.write_text("{not json")
    with pytest.raises(InputError, match=r"s\.json:1: malformed batch state.*delete it"):
        ob.load_state(p)
    p.write_text(json.dumps({"version": 9, "batches": []}))
    with pytest.raises(InputError, match="not a batch state file"):
        ob.load_state(p)
    a = {"batch_id": "b0", "request_ids": ["x", "y"]}
    b = {"batch_id": "b1", "request_ids": ["y"]}
    owner, tries = ob.owners({"batches": [a, b]}, ["x", "y", "z"])
    assert owner == {"x": a, "y": b} and tries == {"x": 1, "y": 2}


def test_ledger_cost_is_at_the_batch_price():
    from workflow_scripts.synth_report import build_ledger

    stats = [{"article_uid": "a", "model": "gpt-4o-mini", "backend": "openai_batch", "records": 2, "requests": 2,
              "prompt_tokens": 2_000_000, "completion_tokens": 1_000_000, "failures": 0, "failed_requests": [],
              "generated": 2, "reused": 0,
              "run": {"wall_seconds": 1.0, "requests": 2, "prompt_tokens": 0, "completion_tokens": 0}}]
    cfg = load_config(overrides={"synthesis": {"backend": "openai_batch", "prices": {
        "input_per_mtok": 0.15, "output_per_mtok": 0.6}}})
    cost = build_ledger(cfg, "rephrase", stats, {})["cost"]
    assert cost["total"] == pytest.approx((2 * 0.15 + 1 * 0.6) * 0.5) and cost["pricing"] == "batch"
    sync = build_ledger(cfg, "rephrase", [stats[0] | {"backend": "openai"}], {})["cost"]
    assert sync["total"] == pytest.approx(2 * 0.15 + 1 * 0.6) and sync["price_factor"] == 1.0


def test_planner_prices_the_batch_discount():
    from workflow_scripts import plan as P

    files = [ROOT / "experiments" / "paper.yaml", ROOT / "experiments" / "paper-batch.yaml"]
    cfg = load_config(P.config_files(files))
    assert cfg["synthesis"]["backend"] == "openai_batch" and cfg["models"]["generator"]["name"] == "gpt-4o-mini"
    batch = P.make_plan(cfg, root=Path("/nonexistent"))
    sync_cfg = load_config(P.config_files(files), overrides={"synthesis": {"backend": "openai"}})
    sync = P.make_plan(sync_cfg, root=Path("/nonexistent"))
    b, s = batch.total("usd", "synthesis"), sync.total("usd", "synthesis")
    assert s > 0 and b == pytest.approx(0.5 * s)
    assert "batch_factor 0.5" in batch.sources["generator"]
    # the same tokens as the paper's synchronous gpt-4-turbo run, at a small fraction of its price
    api = P.make_plan(load_config(P.config_files([files[0], ROOT / "experiments" / "paper-api.yaml"])),
                      root=Path("/nonexistent"))
    assert batch.total("prompt_tokens", "synthesis") == pytest.approx(api.total("prompt_tokens", "synthesis"))
    assert b < api.total("usd", "synthesis") / 50


# ------------------------------------------------------------------------------------------------ lifecycle
def engine(srv: StandInServer, state: Path, **kw):
    settings = {"model": "m", "base_url": srv.base_url, "api_key_env": None, "poll_interval_s": 0.01,
                "progress": False, "backoff_base_s": 0.01, "backoff_max_s": 0.02} | kw
    e = get_backend("openai_batch", settings)
    e.state_path = state
    return e


def posts(srv: StandInServer, path: str) -> int:
    return sum(1 for m, p in srv.state.log if m == "POST" and p == path)


def test_one_batch_its_results_and_its_state(tmp_path):
    with StandInServer(next(PORTS), echo_completer) as srv:
        out = {c.id: c for c in engine(srv, tmp_path / "s.json").generate([chat(i) for i in range(4)])}
    assert sorted(out) == ["r0", "r1", "r2", "r3"] and not any(c.error for c in out.values())
    assert out["r1"].text == "1 three two one" and out["r1"].completion_tokens == 4
    assert posts(srv, "/v1/files") == 1 and posts(srv, "/v1/batches") == 1
    state = json.loads((tmp_path / "s.json").read_text())
    (entry,) = state["batches"]
    assert entry["batch_id"] == "batch_0000" and entry["status"] == "completed" and entry["try"] == 1
    assert entry["request_ids"] == ["r0", "r1", "r2", "r3"] and entry["output_file_id"]


def test_a_new_run_re_attaches_to_the_batch_in_progress(tmp_path):
    with StandInServer(next(PORTS), echo_completer) as srv:
        srv.state.plans = [{"hold": True}]
        first = list(engine(srv, tmp_path / "s.json", max_wait_s=0.2, max_retries=0).generate(
            [chat(i) for i in range(3)]))
        assert all(c.error and "not finished after max_wait_s" in c.error for c in first)
        srv.state.release()
        # the re-run asks for the same requests: it polls batch_0000, uploads and creates nothing
        second = {c.id: c for c in engine(srv, tmp_path / "s.json").generate([chat(i) for i in range(3)])}
    assert sorted(second) == ["r0", "r1", "r2"] and not any(c.error for c in second.values())
    assert posts(srv, "/v1/files") == 1 and posts(srv, "/v1/batches") == 1


def test_a_batch_whose_creation_was_cut_off_is_found_by_its_input_file(tmp_path):
    with StandInServer(next(PORTS), echo_completer) as srv:
        e = engine(srv, tmp_path / "s.json")
        list(e.generate([chat(0)]))
        state = json.loads((tmp_path / "s.json").read_text())
        state["batches"][0].update(batch_id=None, status="creating")  # as if killed before the id was saved
        (tmp_path / "s.json").write_text(json.dumps(state))
        (c,) = engine(srv, tmp_path / "s.json").generate([chat(0)])
    assert not c.error and posts(srv, "/v1/batches") == 1 and ("GET", "/v1/batches") in srv.state.log


def test_an_expired_batch_keeps_its_results_and_resubmits_the_rest(tmp_path):
    with StandInServer(next(PORTS), echo_completer) as srv:
        srv.state.plans = [{"expire_after": 2}]
        out = {c.id: c for c in engine(srv, tmp_path / "s.json").generate([chat(i) for i in range(5)])}
    assert sorted(out) == [f"r{i}" for i in range(5)] and not any(c.error for c in out.values())
    b0, b1 = json.loads((tmp_path / "s.json").read_text())["batches"]
    assert b0["status"] == "expired" and b1["status"] == "completed"
    assert b1["request_ids"] == ["r2", "r3", "r4"] and b1["try"] == 2


def test_expired_and_failed_requests_are_recorded_when_the_tries_run_out(tmp_path):
    with StandInServer(next(PORTS), echo_completer) as srv:
        srv.state.plans = [{"expire_after": 1, "fail": ["r0"]}, {"cancel_after": 0}]
        out = {c.id: c for c in engine(srv, tmp_path / "s.json", max_batch_tries=2).generate(
            [chat(i) for i in range(3)])}
    # r0 failed (HTTP 500) and r1, r2 expired in batch 0; all three were cancelled in batch 1
    assert all(c.error for c in out.values()) and len(out) == 3
    assert "batch_cancelled" in out["r1"].error and "2 batch(es) tried" in out["r1"].error
    assert posts(srv, "/v1/batches") == 2
    # a re-run reports the same errors from the state's batches and submits nothing
    with StandInServer(next(PORTS), echo_completer) as srv2:
        srv2.state.files, srv2.state.batches, srv2.state.order = srv.state.files, srv.state.batches, srv.state.order
        again = {c.id: c.error for c in engine(srv2, tmp_path / "s.json", max_batch_tries=2).generate(
            [chat(i) for i in range(3)])}
    assert again == {k: c.error for k, c in out.items()} and posts(srv2, "/v1/batches") == 0


def test_a_failed_batch_is_resubmitted_and_its_reason_recorded(tmp_path):
    with StandInServer(next(PORTS), echo_completer) as srv:
        srv.state.plans = [{"fail_batch": True}]
        out = list(engine(srv, tmp_path / "s.json").generate([chat(0), chat(1)]))
        assert not any(c.error for c in out) and posts(srv, "/v1/batches") == 2
        srv.state.plans = [{}, {}, {"fail_batch": True}]
        (c,) = engine(srv, tmp_path / "t.json", max_batch_tries=1).generate([chat(2)])
    assert "status failed: token_limit_exceeded stand-in: enqueued token limit" in c.error


def test_an_output_file_the_provider_no_longer_keeps_means_resubmission(tmp_path):
    with StandInServer(next(PORTS), echo_completer) as srv:
        list(engine(srv, tmp_path / "s.json").generate([chat(0)]))
        del srv.state.files[srv.state.batches["batch_0000"]["output_file_id"]]
        (c,) = engine(srv, tmp_path / "s.json").generate([chat(0)])
    assert not c.error and posts(srv, "/v1/batches") == 2


def test_the_key_comes_from_the_environment_and_is_never_shown(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCH_TEST_KEY", "sk-secret-123")
    with StandInServer(next(PORTS), echo_completer, api_key="sk-other") as srv:
        e = engine(srv, tmp_path / "s.json", api_key_env="BATCH_TEST_KEY", max_retries=0)
        assert "sk-secret" not in repr(e)
        (c,) = e.generate([chat(0)])
    assert c.error and "HTTP 401" in c.error and "sk-secret" not in c.error
    assert not (tmp_path / "s.json").exists() or "sk-secret" not in (tmp_path / "s.json").read_text()
    monkeypatch.delenv("BATCH_TEST_KEY")
    with pytest.raises(InputError, match="BATCH_TEST_KEY"):
        engine(srv, tmp_path / "s.json", api_key_env="BATCH_TEST_KEY")


def test_extraction_of_a_shard_is_one_batch_per_attempt(tmp_path):
    """EntiGraph extraction through the shard runner's batch rounds: each attempt of every article of the shard
    goes into one batch (the echo answers are no JSON, so each article retries once, then falls back)."""
    from workflow_scripts import synthesis as syn

    arts = [{"uid": u, "title": f"T {u}", "author": "Doe, Jane", "year": 1950,
             "text": f"Anna met Thomas in {u}. Thomas met Margaret Hale."} for u in ("x1", "x2")]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(a) + "\n" for a in arts))
    ((shard, uids),) = syn.article_shards(["x1", "x2"], 2)
    with StandInServer(next(PORTS), echo_completer) as srv:
        cfg = {"models": {"generator": {"source": "hf", "name": "m"}},
               "synthesis": {"backend": "openai_batch", "entigraph": {
                   "extraction_retries": 1, "extraction_max_new_tokens": 8, "extraction_fallback": "heuristic"}},
               "backends": {"openai_batch": {"base_url": srv.base_url, "api_key_env": None,
                                             "poll_interval_s": 0.01, "progress": False}}}
        assert syn.main(["extract-shard", "--articles", str(tmp_path / "a.jsonl"), "--shard", shard,
                         "--shard-articles", *uids, "--outdir", str(tmp_path / "out"), "--work-dir",
                         str(tmp_path / "work"), "--config-json", json.dumps(cfg)]) == 0
    state = json.loads((tmp_path / "work" / "batches" / f"{shard}.json").read_text())
    assert [len(b["request_ids"]) for b in state["batches"]] == [2, 2] and posts(srv, "/v1/batches") == 2
    for uid in uids:
        doc = json.loads((tmp_path / "out" / f"{uid}.json").read_text())
        assert doc["status"] == "fallback" and len(doc["attempts"]) == 2
