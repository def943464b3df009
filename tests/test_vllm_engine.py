"""The real vLLM engine with the offline model (SmolLM2-135M-Instruct): vLLM's CPU build on a machine without
CUDA (`bash scripts/bootstrap.sh --vllm`), the same code on a GPU.

- (a) entity extraction, EntiGraph and Rephrase synthesis of one article through `LLM.chat` with prefix caching:
  later requests with an article's prompt prefix report cached prompt tokens, the records follow the shard
  contract, and their ids equal those the transformers engine gives for the same requests;
- (b) kill -9 during a vLLM synthesis job, then a re-run: no duplicate and no lost record;
- (c) chain-of-thought sampling on vLLM: several samples per question, cut at the `Answer: X.` stops.

The engine runs in subprocesses (vLLM spawns its engine process): one driver run for (a) and (c)
(tests/vllm_engine_driver.py: one engine start), and the synthesis command line twice for (b).
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

from workflow_scripts import synthesis as syn
from workflow_scripts.config import validate_config
from workflow_scripts.io_utils import iter_jsonl, read_jsonl

pytestmark = pytest.mark.engine

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed in this environment; `bash scripts/bootstrap.sh --vllm` adds it (the README's "
                "test command does)", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
ARTICLE = {
    "uid": "v1", "title": "The Lighthouse at Gull Island", "author": "Keeper, Anna", "year": 1961,
    "text": ("Anna Keeper tended the lighthouse on Gull Island for twenty years. Her brother Thomas Keeper ran the "
             "ferry between the island and the town of Port Ellen, and the doctor, Margaret Hale, came over once a "
             "month. One stormy night in November the great lamp failed. Anna climbed the tower with an oil "
             "lantern and kept it burning until dawn, so that the fishing boat Marigold, caught in the gale with "
             "six men aboard, could find the harbour. Captain Robert Dunn of the Marigold later wrote to the "
             "Lighthouse Board in Edinburgh, and the Board sent Anna a silver medal and a new lamp from Glasgow. "
             "Anna kept the medal in a drawer and used the new lamp for eleven more years."),
}
COT_QUESTIONS = [
    {"qid": "q1", "question": "Who kept the lantern burning?", "options": ["Anna Keeper", "Thomas Keeper",
                                                                           "Margaret Hale", "Robert Dunn"]},
    {"qid": "q2", "question": "Where did the new lamp come from?", "options": ["Edinburgh", "Glasgow", "Port Ellen",
                                                                               "Gull Island"]},
]


def engine_config(model_dir: Path, seed: int = 5, chunk_size: int = 2048, max_new_tokens: int = 8) -> dict:
    """vLLM's CPU build needs float32 and eager mode; a 1 GiB KV cache holds these prompts many times over."""
    return {
        "seed": 42,
        "models": {"generator": {"source": "path", "name": str(model_dir)}},
        "backends": {"vllm": {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048,
                              "cpu_kvcache_space_gib": 1, "enable_prefix_caching": True, "progress": False,
                              "chunk_size": chunk_size},
                     "transformers": {"num_threads": 1, "batch_size": 8, "max_prefix_reuse": True,
                                      "progress": False}},
        "synthesis": {"backend": "vllm", "articles_per_job": 4,
                      "sampling": {"max_new_tokens": max_new_tokens, "seed": seed},
                      "entigraph": {"max_entities": 3, "max_pairs": 3, "max_triples": 1, "extraction_retries": 0,
                                    "extraction_max_new_tokens": 24, "extraction_fallback": "heuristic"},
                      "rephrase": {"styles": ["easy", "hard"], "repeats": 2}},
        "evaluation": {"modes": ["cot"], "cot": {"engine": "vllm", "n": 3, "max_new_tokens": 48,
                                                 "temperature": 0.1}},
    }


def child_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the config's cpu_kvcache_space_gib sets it
    return env


@pytest.fixture(scope="module")
def driver_run(smollm_dir, tmp_path_factory):
    """One engine start: extraction, EntiGraph, Rephrase, then CoT sampling (tests/vllm_engine_driver.py)."""
    from workflow_scripts.qa_eval import load_prompt_template, render_question

    tmp = tmp_path_factory.mktemp("vllm")
    articles = tmp / "articles.jsonl"
    articles.write_text(json.dumps(ARTICLE) + "\n")
    prefix = load_prompt_template()
    # a question the few-shot format answers, and one whose prompt makes the `Answer: B.` line all but certain
    prompts = [prefix + render_question(COT_QUESTIONS[0], ARTICLE),
               "Answer: B.\nAnswer: B.\nAnswer: B.\nAnswer: B.\nAnswer: B.\n"]
    spec = {"config": engine_config(smollm_dir), "articles": str(articles), "out": str(tmp / "out"),
            "cot": {"prompts": prompts, "qids": ["q1", "repeat"]}}
    (tmp / "spec.json").write_text(json.dumps(spec))
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "vllm_engine_driver.py"), str(tmp / "spec.json")],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
    print(f"vLLM driver run: {time.time() - t0:.0f}s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"tmp": tmp, "articles": articles, "spec": spec, "stderr": proc.stderr,
            "result": json.loads((tmp / "out" / "driver.json").read_text())}


def test_extraction_and_synthesis_on_vllm_with_prefix_caching(driver_run):
    out = driver_run["tmp"] / "out"
    res = driver_run["result"]
    assert res["engine_starts"] == 1
    shard = res["shard"]
    doc = json.loads((out / "entities" / "v1.json").read_text())
    assert doc["status"] in ("ok", "fallback") and len(doc["entities"]) >= 3
    ((_, work_rec),) = list(iter_jsonl(out / "work" / "extraction" / "v1.jsonl"))
    assert work_rec["prompt_tokens"] > 200 and 1 <= work_rec["completion_tokens"] <= 24
    # decoded under the extraction's JSON schema (structured outputs): the answer is a JSON object from its first
    # character, with the schema's first key (cut off by the 24-token limit)
    assert work_rec["text"].lstrip().startswith('{') and '"summary"' in work_rec["text"], work_rec["text"]
    for method, kinds in (("entigraph", {"pair": 3, "triple": 1}),
                          ("rephrase", {"rephrase-easy": 2, "rephrase-hard": 2})):
        folder = out / method / "shards" / shard
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["articles"] == ["v1"] and manifest["status"] == {"v1": "complete"}
        recs = read_jsonl(folder / "v1.jsonl")
        stats = json.loads((folder / "stats" / "v1.json").read_text())
        body = [r for r in recs if r["kind"] != "summary"]
        assert {k: sum(r["kind"] == k for r in body) for k in kinds} == kinds
        assert stats["status"] == "complete" and stats["backend"] == "vllm" and stats["records"] == len(recs)
        assert len({r["id"] for r in recs}) == len(recs)
        # the shard contract: one record per planned text, fields as docs/architecture.md lists them
        for r in body:
            assert r["method"] == method and r["article_uid"] == "v1" and r["model"] == driver_run["spec"][
                "config"]["models"]["generator"]["name"]
            assert r["text"].strip() and 1 <= r["completion_tokens"] <= 8 and r["prompt_tokens"] > 200
            assert r["finish_reason"] in ("stop", "length") and r["prompt_version"] and r["config_hash"]
        # prefix caching: requests after the first with the same system prompt and article reuse their prefix
        by_template: dict[str, list[dict]] = {}
        for r in body:
            by_template.setdefault(r["template"], []).append(r)
        later = [r for group in by_template.values() for r in group[1:]]
        assert later, method
        for r in later:
            assert r["cached_prompt_tokens"] >= r["prompt_tokens"] // 2, (method, r["kind"], r["cached_prompt_tokens"],
                                                                          r["prompt_tokens"])
    # the job log names the single engine start
    assert driver_run["stderr"].count("engine vllm started") >= 1


def test_record_ids_equal_those_of_the_transformers_engine(driver_run, tmp_path):
    """The same requests through the transformers engine make the same record ids (ids name the request, not the
    engine), with the entity file of the vLLM run."""
    out = driver_run["tmp"] / "out"
    shard = driver_run["result"]["shard"]
    cfg = validate_config(dict(engine_config(Path(driver_run["spec"]["config"]["models"]["generator"]["name"])),
                               synthesis={**engine_config(Path("."))["synthesis"], "backend": "transformers"}))
    engine = syn.SharedEngine(syn.backend_factory(cfg), "transformers")
    try:
        for method in ("entigraph", "rephrase"):
            syn.synthesize_shard(cfg, method, driver_run["articles"], shard, ["v1"], tmp_path / method, tmp_path /
                                 "work" / method, out / "entities", engine)
            tf = read_jsonl(tmp_path / method / "v1.jsonl")
            vl = read_jsonl(out / method / "shards" / shard / "v1.jsonl")
            assert [r["id"] for r in tf] == [r["id"] for r in vl], method
            assert [(r["kind"], r["entities"], r["seed"]) for r in tf] == [(r["kind"], r["entities"], r["seed"])
                                                                           for r in vl]
            assert all(r["cached_prompt_tokens"] is None for r in tf if r["kind"] != "summary")
    finally:
        engine.shutdown()


def test_chain_of_thought_samples_stop_at_the_answer(driver_run):
    from workflow_scripts.qa_eval import extract_answer

    recs = driver_run["result"]["cot"]
    assert len(recs) == 2
    for rec in recs:
        assert len(rec["completions"]) == 3 and len(rec["finish_reasons"]) == 3 and rec["error"] is None
        for text, reason in zip(rec["completions"], rec["finish_reasons"]):
            letter = extract_answer(text)
            if letter is not None:  # a sample that wrote an answer line ends right after it
                assert text.rstrip().endswith(f"Answer: {'ABCD'[letter]}.") and reason == "stop", text
            else:
                assert reason in ("length", "stop")
    # the repeated-answer prompt: every sample stops at its first `Answer: B.`
    repeat = recs[1]
    assert repeat["answers"] == [1, 1, 1] and repeat["finish_reasons"] == ["stop"] * 3
    assert all(t.count("Answer:") == 1 for t in repeat["completions"])


def _shard_command(cfg: dict, articles: Path, shard: str, outdir: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "workflow_scripts.synthesis", "synthesize-shard", "--method", "rephrase",
            "--articles", str(articles), "--shard", shard, "--shard-articles", "v1", "--outdir", str(outdir),
            "--work-dir", str(work), "--config-json", json.dumps(cfg)]


def test_kill_during_a_vllm_synthesis_job_then_rerun(smollm_dir, tmp_path):
    """kill -9 (the job and vLLM's engine process) once some records are written; the re-run generates only the
    rest: no duplicate, no lost record."""
    # other seeds: nothing is reused from the driver run; one request per engine call, so records arrive one by one
    cfg = engine_config(smollm_dir, seed=9, chunk_size=1, max_new_tokens=32)
    cfg["synthesis"]["rephrase"] = {"styles": ["easy", "medium", "hard"], "repeats": 3}
    ((shard, _),) = syn.article_shards(["v1"], 4)
    outdir, work = tmp_path / "shard", tmp_path / "work"
    articles = tmp_path / "articles.jsonl"
    articles.write_text(json.dumps(ARTICLE) + "\n")
    cmd = _shard_command(cfg, articles, shard, outdir, work)
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=log, start_new_session=True)
    deadline = time.time() + 600
    lines = 0
    while time.time() < deadline and proc.poll() is None:
        lines = sum(1 for _ in open(work / "v1.jsonl")) if (work / "v1.jsonl").exists() else 0
        if lines >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the job ended before it could be killed: {(tmp_path / 'killed.log').read_text()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    before = {r["id"]: r for _, r in iter_jsonl(work / "v1.jsonl", allow_truncated_tail=True)}
    assert 2 <= len(before) < 9 and not (outdir / "v1.jsonl").exists()

    rerun = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert rerun.stderr.count("engine vllm started") == 1
    recs = read_jsonl(outdir / "v1.jsonl")
    ids = [r["id"] for r in recs]
    assert len(recs) == 9 and len(set(ids)) == 9
    for rid, old in before.items():  # every record of the killed run is kept as it was
        assert old in recs, rid
    stats = json.loads((outdir / "stats" / "v1.json").read_text())
    assert stats["reused"] == len(before) and stats["generated"] == 9 - len(before)
    work_ids = [r["id"] for _, r in iter_jsonl(work / "v1.jsonl", allow_truncated_tail=True)]
    assert sorted(work_ids) == sorted(ids)  # the working shard holds each record once
