"""The replay pool built once per run (issue 18): rule replay_pool tokenizes cpt.replay.source into
results/replay/pool (tokens.bin, heldout.bin, meta.json) and every CPT process memory-maps it (train.py
--replay-pool). Pinned here: the built pool holds exactly the tokens a CPT process used to compute itself, a process
given the pool never reads or tokenizes the replay source and trains on the same batches, a pool that is not the
run's is refused in one line, and the workflow builds it once and hands it to every CPT job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from workflow_scripts import corpus as C
from workflow_scripts.config import section_defaults
from workflow_scripts import replay
from workflow_scripts import train as T
from workflow_scripts.config import validate_config
from workflow_scripts.io_utils import InputError

pytestmark = pytest.mark.engine  # real tokenizers, real training runs and a Snakemake dry run

ROOT = Path(__file__).resolve().parent.parent
STORY = ROOT / "resources" / "replay" / "jaywalker.txt"  # the corpus
GENERAL = ROOT / "resources" / "replay" / "reluctant_heroes.txt"  # the replay source, as one JSONL record a paragraph
SEED = 11


def paragraphs(path: Path) -> list[str]:
    return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if len(p.strip()) > 60]


def cfg_with(source: Path, probe: str = replay.HELDOUT, **replay_cfg) -> dict:
    return validate_config({"seed": SEED, "cpt": {
        "block_size": 32, "global_batch": 4, "micro_batch": 2, "lr": 3e-3, "epochs": 1, "threads": 1,
        "log_every": 100, "checkpoint_every": 0,
        "replay": {"rate": 0.25, "source": str(source), "heldout_fraction": 0.1, "max_tokens": 4000, **replay_cfg},
        "probe": {"source": probe, "max_tokens": 128}}})


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("general")
    with open(d / "part-00000.jsonl", "w", encoding="utf-8") as f:
        for text in paragraphs(GENERAL):
            f.write(json.dumps({"text": text}) + "\n")
    return d


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, tiny_model_dir) -> Path:
    d = tmp_path_factory.mktemp("synth")
    with open(d / "a1.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(paragraphs(STORY)[:40]):
            f.write(json.dumps({"id": f"r{i:03d}", "method": "entigraph", "kind": "pair", "article_uid": "a1",
                                "text": text}) + "\n")
    out = d / "corpus"
    C.build_corpus("entigraph", [d / "a1.jsonl"], str(tiny_model_dir), out, validate_config({"seed": 5}))
    return out


def build_with_cli(cfg: dict, model: Path, outdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflow_scripts.replay", "pool", "--model", str(model),
                           "--outdir", str(outdir), "--config-json", json.dumps(cfg)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_built_pool_holds_what_each_process_tokenized(source, tiny_model_dir, tmp_path):
    tok = C.load_tokenizer(str(tiny_model_dir))
    specials = C.special_tokens(tok, section_defaults("corpus"))
    cfg = cfg_with(source)
    meta = replay.build_pool(cfg["cpt"], SEED, str(tiny_model_dir), tok, specials, tmp_path)
    assert meta["heldout_documents"] == int(0.1 * meta["documents"]) > 0 and meta["tokens"] == 4000
    pool = replay.load_pool(tmp_path, cfg["cpt"], SEED, replay.tokenizer_record(str(tiny_model_dir), tok, specials))
    assert isinstance(pool.tokens, np.memmap) and pool.tokens.dtype == np.uint32
    per_process = replay.replay_pool(cfg["cpt"]["replay"], tok, specials, SEED)
    assert np.array_equal(pool.tokens, per_process)
    assert np.array_equal(pool.heldout, replay.probe_tokens(cfg["cpt"], tok, specials, SEED))
    assert np.array_equal(replay.draw_blocks(pool.tokens, 50, 32, SEED), replay.draw_blocks(per_process, 50, 32, SEED))
    # a probe that is a file of its own: the pool holds no held-out tokens, and the probe is that file's
    other = cfg_with(source, probe=str(STORY))
    meta = replay.build_pool(other["cpt"], SEED, str(tiny_model_dir), tok, specials, tmp_path / "p2")
    assert meta["heldout_tokens"] == 0 and (tmp_path / "p2" / replay.POOL_HELDOUT).stat().st_size == 0


def test_with_the_pool_training_never_tokenizes_the_replay_source(source, corpus_dir, tiny_model_dir, tmp_path,
                                                                  monkeypatch):
    """Two real runs, per-process tokenization and the pool: no replay-source read and no tokenizer call in the
    second (the probe is the pool's held-out part), and the same replay blocks, probe and per-step losses."""
    cfg = cfg_with(source)
    r = build_with_cli(cfg, tiny_model_dir, tmp_path / "pool")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == 4000

    calls = {"encode": 0, "read": []}
    real_encode, real_iter = C.encode_documents, replay.iter_documents

    def encode(*a, **k):
        calls["encode"] += 1
        return real_encode(*a, **k)

    def read(src, *a, **k):
        calls["read"].append(str(src))
        return real_iter(src, *a, **k)

    monkeypatch.setattr(C, "encode_documents", encode)
    monkeypatch.setattr(replay, "iter_documents", read)
    before = T.prepare_data(cfg, corpus_dir, 512, str(tiny_model_dir), None)
    assert calls["encode"] > 0 and calls["read"] == [str(source)] * 2  # the pool, then the held-out probe
    calls.update(encode=0, read=[])
    after = T.prepare_data(cfg, corpus_dir, 512, str(tiny_model_dir), None, replay_pool=tmp_path / "pool")
    assert calls == {"encode": 0, "read": []}
    assert np.array_equal(after.plan, before.plan) and (after.plan < 0).sum() > 0
    assert np.array_equal(after.blocks.replay, before.blocks.replay)
    assert np.array_equal(after.probe_blocks, before.probe_blocks)

    one = T.train(cfg, corpus_dir, 512, str(tiny_model_dir), tmp_path / "m1", tmp_path / "w1")
    calls.update(encode=0, read=[])
    two = T.train(cfg, corpus_dir, 512, str(tiny_model_dir), tmp_path / "m2", tmp_path / "w2",
                  replay_pool=tmp_path / "pool")
    assert calls == {"encode": 0, "read": []}
    assert two["replay_tokens_seen"] == one["replay_tokens_seen"] > 0
    logs = [(d / "train_log.csv").read_text().splitlines() for d in (tmp_path / "m1", tmp_path / "m2")]
    assert [row.split(",")[2] for row in logs[1]] == [row.split(",")[2] for row in logs[0]]  # the losses
    assert two["forgetting_probe"]["loss_after"] == one["forgetting_probe"]["loss_after"]


def test_a_pool_that_is_not_the_runs_is_refused(source, tiny_model_dir, tmp_path):
    tok = C.load_tokenizer(str(tiny_model_dir))
    specials = C.special_tokens(tok, section_defaults("corpus"))
    record = replay.tokenizer_record(str(tiny_model_dir), tok, specials)
    cfg = cfg_with(source)
    replay.build_pool(cfg["cpt"], SEED, str(tiny_model_dir), tok, specials, tmp_path / "pool")
    with pytest.raises(InputError, match=r"built with other settings \(max_tokens: \[4000\] vs \[2000\]\)"):
        replay.load_pool(tmp_path / "pool", cfg_with(source, max_tokens=2000)["cpt"], SEED, record)
    with pytest.raises(InputError, match=r"built with other settings \(seed"):
        replay.load_pool(tmp_path / "pool", cfg["cpt"], SEED + 1, record)
    with pytest.raises(InputError, match="not like the corpus"):
        replay.load_pool(tmp_path / "pool", cfg["cpt"], SEED, {**record, "sha256": "0" * 64, "location": "other"})
    with pytest.raises(InputError, match="no meta.json; build the replay pool first"):
        replay.load_pool(tmp_path / "nothing", cfg["cpt"], SEED, record)
    with open(source / "part-00000.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "A new document."}) + "\n")
    try:
        with pytest.raises(InputError, match="changed since the replay pool was built"):
            replay.load_pool(tmp_path / "pool", cfg["cpt"], SEED, record)
    finally:  # the module's source again
        lines = (source / "part-00000.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        (source / "part-00000.jsonl").write_text("".join(lines[:-1]), encoding="utf-8")


def test_the_workflow_builds_the_pool_once_for_every_cpt_job(tmp_path):
    """The demo replays general text: one replay_pool job, and every cpt job reads and is given the pool."""
    # from an empty folder: the workflow's config.yaml and resources/ are found beside its Snakefile
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
                        str(tmp_path), "-n", "-p", "--cores", "1"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stats = r.stdout.split("Job stats:", 1)[1].split("total", 1)[0]
    counts = {line.split()[0]: int(line.split()[1]) for line in stats.splitlines()[3:] if len(line.split()) == 2}
    assert counts["replay_pool"] == 1 and counts["cpt"] >= 2
    cpt_commands = [line for line in r.stdout.splitlines() if "-m workflow_scripts.train " in line]
    assert len(cpt_commands) == counts["cpt"]
    assert all("--replay-pool results/replay/pool " in line for line in cpt_commands), cpt_commands
    assert sum("-m workflow_scripts.replay pool " in line for line in r.stdout.splitlines()) == 1
