"""Mixtures and the perplexity curriculum (issue 14): every prefix of a mixture - every budget - holds each source
within one block of its configured share; a CPT run records the realised shares; a curriculum run visits its
budget's blocks from the lowest base-model loss to the highest, on the same blocks as the shuffled run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from workflow_scripts import train as T
from workflow_scripts.config import validate_config
from workflow_scripts.corpus import build_corpus, load_corpus
from workflow_scripts.io_utils import InputError
from workflow_scripts.mixture import (LOSS_FILE, block_losses, build_mixture, curriculum_order, interleave,
                                      mixture_length, main)

ROOT = Path(__file__).resolve().parent.parent
STORY = ROOT / "resources" / "replay" / "jaywalker.txt"
PROBE = ROOT / "resources" / "replay" / "reluctant_heroes.txt"
BLOCK = 16


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(20))
def test_every_prefix_holds_each_share_within_one_block(seed):
    rng = np.random.default_rng(seed)
    w = rng.random(int(rng.integers(2, 6))) + 0.02
    w = w / w.sum()
    seq = interleave(w, 400)
    counts = np.zeros(len(w))
    for k, s in enumerate(seq, start=1):
        counts[s] += 1
        assert np.all(np.abs(counts - w * k) < 1), (k, counts, w * k)


@pytest.mark.unit
def test_mixture_length_is_limited_by_the_scarcest_source():
    w = {"a": 0.7, "b": 0.3}
    n = mixture_length({"a": 100, "b": 9}, w)
    counts = np.bincount(interleave([0.7, 0.3], n), minlength=2)
    assert counts[1] <= 9 and n >= 29


def cfg_for(mixtures: dict, **cpt) -> dict:
    base = {"block_size": BLOCK, "global_batch": 4, "micro_batch": 2, "lr": 3e-3, "epochs": 1, "threads": 2,
            "log_every": 100, "checkpoint_every": 0, "replay": {"rate": 0.0, "source": str(STORY)},
            "probe": {"source": str(PROBE), "max_tokens": 32}} | cpt
    return validate_config({"seed": 3, "cpt": base, "mixtures": mixtures})


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Two real-text corpora tokenized with the tiny model's tokenizer (synthesis-like records and 'raw')."""
    paras = [p.strip() for p in PROBE.read_text(encoding="utf-8").split("\n\n") if len(p.strip()) > 60]
    d = tmp_path_factory.mktemp("mix")
    out = {}
    for name, part in (("entigraph", paras[:30]), ("rephrase", paras[30:45])):
        src = d / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"id": f"{name}{i:03d}", "method": name, "kind": "x", "article_uid": "a",
                                           "text": t}) + "\n" for i, t in enumerate(part)))
        out[name] = d / name
        build_corpus(name, [src], str(tiny_model_dir), out[name], validate_config({"seed": 5}))
    return out


@pytest.mark.engine
def test_a_built_mixture_has_exact_shares_at_every_budget(corpora, tiny_model_dir, tmp_path):
    cfg = cfg_for({"mix": {"sources": {"entigraph": 3, "rephrase": 1, "replay": 1}}})
    out = tmp_path / "mix"
    m = build_mixture("mix", {k: str(v) for k, v in corpora.items()}, str(tiny_model_dir), out, cfg)
    tokens, manifest = load_corpus(out)
    labels = np.load(out / "block_sources.npy")
    n = m["n_records"]
    assert len(tokens) == n * BLOCK and len(labels) == n and manifest["mixture"]["sources"] == ["entigraph",
                                                                                                 "rephrase", "replay"]
    w = np.array([0.6, 0.2, 0.2])
    for budget_blocks in range(1, n + 1):  # every budget is a prefix
        counts = np.bincount(labels[:budget_blocks], minlength=3)
        assert np.all(np.abs(counts - w * budget_blocks) < 1)
    # each source's blocks appear in its own corpus order (nested budgets)
    ent, _ = load_corpus(corpora["entigraph"])
    ent_blocks = np.asarray(ent[: len(ent) // BLOCK * BLOCK]).reshape(-1, BLOCK)
    mine = np.asarray(tokens).reshape(-1, BLOCK)[labels == 0]
    assert np.array_equal(mine, ent_blocks[: len(mine)])
    # the scarcest source (rephrase: 15 paragraphs) bounds the length
    reph, _ = load_corpus(corpora["rephrase"])
    assert m["mixture"]["blocks_by_source"]["rephrase"] <= len(reph) // BLOCK


@pytest.mark.engine
def test_cpt_on_a_mixture_records_realised_shares(corpora, tiny_model_dir, tmp_path):
    cfg = cfg_for({"mix": {"sources": {"entigraph": 0.75, "rephrase": 0.25}}})
    out = tmp_path / "mix"
    build_mixture("mix", {k: str(v) for k, v in corpora.items()}, str(tiny_model_dir), out, cfg)
    budget = 10 * BLOCK
    s = T.train(cfg, out, budget, str(tiny_model_dir), tmp_path / "model", tmp_path / "work")
    mix = s["mixture"]
    assert mix["configured"] == {"entigraph": 0.75, "rephrase": 0.25}
    assert sum(mix["budget_blocks"].values()) == 10 and mix["max_deviation_blocks"] < 1
    assert abs(mix["budget_blocks"]["entigraph"] - 7.5) < 1
    assert s["source_shares"] == pytest.approx({k: v / 10 for k, v in mix["budget_blocks"].items()})
    # a plain corpus records its one source (and train-time replay when on)
    s2 = T.train(cfg_for({}, replay={"rate": 0.5, "source": str(STORY)}), corpora["entigraph"], budget,
                 str(tiny_model_dir), tmp_path / "m2", tmp_path / "w2")
    assert set(s2["source_shares"]) == {"entigraph", "replay (cpt.replay)"}
    assert s2["source_shares"]["replay (cpt.replay)"] == pytest.approx(s2["replay_fraction"])


@pytest.mark.engine
def test_curriculum_orders_blocks_easy_to_hard_on_the_same_blocks(corpora, tiny_model_dir, tmp_path):
    cfg = cfg_for({"ent_curr": {"sources": {"entigraph": 1}, "order": "perplexity"}})
    out = tmp_path / "curr"
    build_mixture("ent_curr", {"entigraph": str(corpora["entigraph"])}, str(tiny_model_dir), out, cfg)
    _, manifest = load_corpus(out)
    with pytest.raises(InputError, match="block losses not found"):
        curriculum_order(out, manifest, 4, BLOCK)
    info = block_losses(out, str(tiny_model_dir), micro_batch=4)
    losses = np.load(out / LOSS_FILE)
    assert info["blocks"] == len(losses) == manifest["n_records"] and np.all(np.isfinite(losses))
    order = curriculum_order(out, manifest, 8, BLOCK)
    assert sorted(order.tolist()) == list(range(8)) and np.all(np.diff(losses[:8][order]) >= 0)
    plan = T.data_plan(8, 2, seed=1, order=order)
    assert plan.tolist() == order.tolist() * 2
    with pytest.raises(InputError, match="blocks of 16 tokens but cpt.block_size is 32"):
        curriculum_order(out, manifest, 4, 32)
    # the same tokens as the shuffled corpus at a budget: only the order differs
    ent, _ = load_corpus(corpora["entigraph"])
    cur, _ = load_corpus(out)
    assert np.array_equal(np.asarray(cur[: 8 * BLOCK]), np.asarray(ent[: 8 * BLOCK]))
    s = T.train(cfg, out, 8 * BLOCK, str(tiny_model_dir), tmp_path / "model", tmp_path / "work")
    assert s["mixture"]["order"] == "perplexity" and s["tokens_seen"] == 8 * BLOCK


@pytest.mark.unit
def test_command_line_errors_are_one_line(tmp_path, capsys):
    code = main(["build", "--name", "nope", "--model", "x", "--outdir", str(tmp_path),
                 "--config-json", json.dumps({"mixtures": {}})])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "mixtures has no 'nope'" in err[0]
