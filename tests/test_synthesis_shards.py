"""Synthesis jobs per shard of articles (synthesis.articles_per_job): one engine start per shard, the per-article
record and stats files unchanged, shards named by their article list (a changed list is rebuilt, never mixed),
the workflow's rules cut the jobs that way, and a config that needs vLLM stops in one line when it is missing.

The engine is tests/test_synthesis.py's FakeBackend (the real engines: test_vllm_engine.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_synthesis import ARTICLE, ARTICLE2, FakeBackend, make_cfg, write_articles
from test_synthesis import _reset_fake  # noqa: F401 - the autouse fixture that resets FakeBackend per test
from workflow_scripts import synthesis as syn
from workflow_scripts.config import missing_engine_message, validate_config, vllm_users
from workflow_scripts.io_utils import InputError, read_jsonl

ROOT = Path(__file__).resolve().parent.parent
ARTICLE3 = {"uid": "a3", "title": "The Ferry", "author": "Keeper, Thomas", "year": 1958,
            "text": "Thomas ran the ferry Heron to Port Ellen. Margaret Hale crossed with him every month."}
ENGINE = "test_synthesis:FakeBackend"


@pytest.mark.unit
def test_shards_cut_the_corpus_in_order_and_name_their_articles():
    shards = syn.article_shards(["a", "b", "c", "d", "e"], 2)
    assert [u for _, u in shards] == [["a", "b"], ["c", "d"], ["e"]]
    assert [s.split("-")[0] for s, _ in shards] == ["0000", "0001", "0002"]
    assert syn.article_shards(["a", "b", "c", "d", "e"], 2) == shards  # stable across runs
    # one article more or another article in a shard: a new name, so Snakemake builds a new shard
    assert syn.article_shards(["a", "b", "c", "x", "e"], 2)[1][0] != shards[1][0]
    assert syn.article_shards(["a", "b", "c", "d", "e"], 2)[0][0] == syn.article_shards(["a", "b", "z"], 2)[0][0]
    assert len(syn.article_shards([str(i) for i in range(265)], 32)) == 9  # the paper's 265 articles
    syn.check_shard(shards[1][0], ["c", "d"])
    with pytest.raises(InputError, match="does not hold articles c, x"):
        syn.check_shard(shards[1][0], ["c", "x"])


@pytest.mark.unit
def test_a_shard_job_starts_its_engine_once_and_keeps_the_per_article_contract(tmp_path):
    articles = write_articles(tmp_path, (ARTICLE, ARTICLE2, ARTICLE3))
    ((shard, uids),) = syn.article_shards(["a1", "a2", "a3"], 3)
    cfg = json.dumps({"models": {"generator": {"source": "hf", "name": "fake-model"}},
                      "synthesis": {"sampling": {"max_new_tokens": 16}, "entigraph": {"max_triples": 1}}})
    synth = tmp_path / "synth"
    assert syn.main(["extract-shard", "--articles", str(articles), "--shard", shard, "--shard-articles", *uids,
                     "--outdir", str(synth / "entigraph" / "extract_shards" / shard), "--work-dir",
                     str(synth / "entigraph" / "work" / "extraction"), "--engine", ENGINE, "--config-json", cfg]) == 0
    assert FakeBackend.constructed == 1
    ents = synth / "entigraph" / "extract_shards" / shard
    for method in ("entigraph", "rephrase"):
        FakeBackend.constructed = 0
        out = synth / method / "shards" / shard
        assert syn.main(["synthesize-shard", "--method", method, "--articles", str(articles), "--shard", shard,
                         "--shard-articles", *uids, "--entities-dir", str(ents), "--outdir", str(out),
                         "--work-dir", str(synth / method / "work"), "--engine", ENGINE, "--config-json", cfg]) == 0
        assert FakeBackend.constructed == 1, method  # one engine for the three articles
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["articles"] == uids and manifest["engine_starts"] == 1
        assert manifest["status"] == {u: "complete" for u in uids}
        for uid in uids:
            recs = read_jsonl(out / f"{uid}.jsonl")
            stats = json.loads((out / "stats" / f"{uid}.json").read_text())
            assert recs and all(r["article_uid"] == uid and r["method"] == method for r in recs)
            assert stats["records"] == len(recs) and stats["status"] == "complete"
            # the same records as the per-article command makes
            single = tmp_path / "single" / method
            assert syn.main(["synthesize", "--method", method, "--articles", str(articles), "--article", uid,
                             *(["--entities", str(ents / f"{uid}.json")] if method == "entigraph" else []),
                             "--output", str(single / f"{uid}.jsonl"), "--stats", str(single / "stats" / f"{uid}.json"),
                             "--work", str(synth / method / "work" / f"{uid}.jsonl"), "--engine", ENGINE,
                             "--config-json", cfg]) == 0
            assert read_jsonl(single / f"{uid}.jsonl") == recs

    # a fully cached shard builds no engine
    FakeBackend.constructed = 0
    out = synth / "rephrase" / "shards" / shard
    assert syn.main(["synthesize-shard", "--method", "rephrase", "--articles", str(articles), "--shard", shard,
                     "--shard-articles", *uids, "--outdir", str(out), "--work-dir", str(synth / "rephrase" / "work"),
                     "--engine", ENGINE, "--config-json", cfg]) == 0
    assert FakeBackend.constructed == 0
    assert json.loads((out / "manifest.json").read_text())["engine_starts"] == 0


@pytest.mark.unit
def test_a_shard_folder_with_another_article_list_is_cleared(tmp_path):
    articles = write_articles(tmp_path, (ARTICLE, ARTICLE2, ARTICLE3))
    cfg = make_cfg()
    out = tmp_path / "shard"
    ((old, old_uids),) = syn.article_shards(["a1", "a2"], 2)
    syn.synthesize_shard(cfg, "rephrase", articles, old, old_uids, out, tmp_path / "work", make_backend=FakeBackend)
    assert (out / "a2.jsonl").exists()
    ((new, new_uids),) = syn.article_shards(["a1", "a3"], 2)
    syn.synthesize_shard(cfg, "rephrase", articles, new, new_uids, out, tmp_path / "work", make_backend=FakeBackend)
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["a1.jsonl", "a3.jsonl"]  # nothing of a2 is left
    assert json.loads((out / "manifest.json").read_text())["articles"] == ["a1", "a3"]


@pytest.mark.unit
def test_an_incomplete_article_fails_the_shard_after_the_others_ran(tmp_path, capsys):
    fail = dict(ARTICLE2, uid="bad")
    articles = write_articles(tmp_path, (ARTICLE, fail, ARTICLE3))
    (tmp_path / "ents").mkdir()
    for uid, ents in (("a1", ["Korvin", "Tr'en"]), ("bad", ["FAIL", "Venus"]), ("a3", ["Thomas", "Heron"])):
        (tmp_path / "ents" / f"{uid}.json").write_text(json.dumps({"status": "ok", "entities": ents}))
    ((shard, uids),) = syn.article_shards(["a1", "bad", "a3"], 3)
    cfg = json.dumps({"models": {"generator": {"source": "hf", "name": "fake-model"}},
                      "synthesis": {"entigraph": {"max_triples": 0}}})
    rc = syn.main(["synthesize-shard", "--method", "entigraph", "--articles", str(articles), "--shard", shard,
                   "--shard-articles", *uids, "--entities-dir", str(tmp_path / "ents"), "--outdir",
                   str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--engine", ENGINE, "--config-json",
                   cfg])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith(f"error: shard {shard}: 1 of 3 articles incomplete; first: entigraph/bad")
    assert (tmp_path / "out" / "a1.jsonl").exists() and (tmp_path / "out" / "a3.jsonl").exists()
    assert not (tmp_path / "out" / "bad.jsonl").exists()


@pytest.mark.unit
def test_configs_that_need_vllm():
    demo = validate_config({})
    assert vllm_users(demo) == [] and missing_engine_message(demo) is None
    cfg = validate_config({"synthesis": {"backend": "vllm"}, "evaluation": {"modes": ["loglik", "cot"],
                                                                         "cot": {"engine": "vllm"}}})
    assert vllm_users(cfg) == ["synthesis.backend", "evaluation.cot.engine"]
    # the engine setting alone does not count: loglik scoring never samples
    assert vllm_users(validate_config({"evaluation": {"cot": {"engine": "vllm"}}})) == []


def workflow_copy(tmp_path: Path) -> Path:
    """A copy of the workflow (no results), so that a run that should stop cannot touch the repository's results."""
    work = tmp_path / "wf"
    ignore = shutil.ignore_patterns("results", ".venv", ".snakemake", "__pycache__", ".cache", ".git")
    work.mkdir()
    for name in ("Snakefile", "config.yaml", "rules", "schemas", "workflow_scripts", "envs", "experiments",
                 "resources", "report"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=ignore)
        else:
            shutil.copy(src, work / name)
    return work


def snakemake(work: Path, hide_vllm: bool, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if hide_vllm:  # an interpreter without vLLM: find_spec("vllm") answers None
        (work / "hide").mkdir(exist_ok=True)
        (work / "hide" / "sitecustomize.py").write_text('import sys\nsys.modules["vllm"] = None\n')
        env["PYTHONPATH"] = str(work / "hide")
    return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_a_vllm_run_without_the_engine_stops_before_any_job_in_one_line(tmp_path):
    work = workflow_copy(tmp_path)
    res = snakemake(work, True, "--configfile", "experiments/cpu-vllm.yaml")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        "error: this config uses the vllm engine (synthesis.backend and evaluation.cot.engine) but vLLM is not "
        "installed in this environment; build it with `bash scripts/bootstrap.sh --vllm`, then run again")
    assert "Traceback" not in res.stderr and not (work / "results").exists()  # no job ran
    # planning (a dry run) needs no engine: a GPU config can be planned on a laptop
    dry = snakemake(work, True, "-n", "--configfile", "experiments/cpu-vllm.yaml")
    assert dry.returncode == 0 and "download_quality" in dry.stdout, dry.stderr[-2000:]
