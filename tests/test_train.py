"""Stage 6 (issue 4): CPT. The data plan (blocks, epochs, replay), the LR schedule and the split of a step over
ranks are pinned as pure functions; real runs of the tiny Llama show that the loss falls, that a resumed run
reproduces the uninterrupted one, that budgets are exact and nested, that the forgetting probe is measured, and
that bad inputs fail clearly."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from workflow_scripts import train as T
from workflow_scripts.config import validate_config
from workflow_scripts.corpus import build_corpus, load_corpus
from workflow_scripts.io_utils import InputError

ROOT = Path(__file__).resolve().parent.parent
STORY = ROOT / "resources" / "replay" / "jaywalker.txt"
PROBE = ROOT / "resources" / "replay" / "reluctant_heroes.txt"


def tiny_cfg(**cpt) -> dict:
    """A small, fast recipe for the 2-layer test model (2 torch threads: the machine is shared)."""
    base = {"block_size": 32, "global_batch": 4, "micro_batch": 2, "lr": 3e-3, "epochs": 2, "raw_epochs": 2,
            "warmup_ratio": 0.1, "threads": 2, "log_every": 100, "checkpoint_every": 0,
            "replay": {"rate": 0.0, "source": str(STORY)},
            "probe": {"source": str(PROBE), "max_tokens": 64}}
    for k, v in cpt.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return validate_config({"seed": 11, "cpt": base})


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A real-text corpus: 40 paragraphs of a vendored public-domain story as synthesis records."""
    paras = [p.strip() for p in STORY.read_text(encoding="utf-8").split("\n\n") if len(p.strip()) > 60][:40]
    d = tmp_path_factory.mktemp("synth")
    with open(d / "a1.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(paras):
            f.write(json.dumps({"id": f"r{i:03d}", "method": "entigraph", "kind": "pair", "article_uid": "a1",
                                "text": text}) + "\n")
    out = d / "corpus"
    build_corpus("entigraph", [d / "a1.jsonl"], str(tiny_model_dir), out, validate_config({"seed": 5}))
    return out


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -------------------------------------------------------------------------------------------- pure logic
@pytest.mark.unit
def test_each_epoch_visits_every_block_once_in_a_seeded_order():
    plan = T.data_plan(50, 3, seed=1)
    epochs = plan.reshape(3, 50)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(50))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled per epoch
    assert np.array_equal(plan, T.data_plan(50, 3, seed=1)) and not np.array_equal(plan, T.data_plan(50, 3, seed=2))
    # a longer run starts with the same epochs: an interrupted run's plan is the same plan
    assert np.array_equal(T.data_plan(50, 4, seed=1)[:150], plan)


@pytest.mark.unit
def test_replay_rate_holds_statistically():
    n, epochs, rate = 20_000, 2, 0.1
    plan = T.data_plan(n, epochs, seed=3, replay_rate=rate)
    replay = plan < 0
    sd = math.sqrt(rate * (1 - rate) / plan.size)
    assert abs(replay.mean() - rate) < 4 * sd  # 4 standard deviations: fails by chance about once in 16,000
    for e in plan.reshape(epochs, n):  # each epoch keeps its length; a corpus block appears at most once
        kept = e[e >= 0]
        assert len(set(kept.tolist())) == len(kept) and abs((e < 0).mean() - rate) < 4 * math.sqrt(0.09 / n)
    assert sorted((-1 - plan[replay]).tolist()) == list(range(int(replay.sum())))  # replay draws numbered 0..k-1
    # the mask is independent of the position: no run-length structure beyond chance (replay after replay ~ rate)
    after = replay[1:][replay[:-1]]
    assert abs(after.mean() - rate) < 4 * math.sqrt(rate * (1 - rate) / after.size)
    assert (T.data_plan(100, 1, 0, 0.0) >= 0).all() and (T.data_plan(100, 1, 0, 1.0) < 0).all()


@pytest.mark.unit
def test_replay_blocks_cycle_in_fresh_orders():
    blocks = T.Blocks(np.zeros((4, 8), np.uint16), np.arange(5 * 8).reshape(5, 8), seed=0)
    first, second = [blocks.replay_index(k) for k in range(5)], [blocks.replay_index(k) for k in range(5, 10)]
    assert sorted(first) == sorted(second) == list(range(5))
    batch = blocks.batch(np.array([0, -1, -2]))
    assert batch.shape == (3, 8) and batch.dtype.is_floating_point is False
    assert batch[1].tolist() == list(range(first[0] * 8, first[0] * 8 + 8))


@pytest.mark.unit
def test_lr_warmup_then_cosine():
    total, peak = 100, 1e-3
    warm = T.warmup_steps_for(total, 0.05)
    lrs = [T.lr_at(s, total, peak, warm, 0.1) for s in range(total)]
    assert warm == 5 and lrs[:5] == pytest.approx([peak * (i + 1) / 5 for i in range(5)])
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and lrs[-1] > 0.1 * peak
    assert T.lr_at(total, total, peak, warm, 0.1) == pytest.approx(0.1 * peak)
    assert T.warmup_steps_for(3, 0.05) == 1 and T.lr_at(0, 3, peak, 1) == peak


@pytest.mark.unit
@pytest.mark.parametrize("world,micro,n", [(1, 2, 16), (2, 1, 16), (3, 2, 16), (8, 1, 16), (4, 2, 5), (8, 2, 3)])
def test_a_step_is_split_over_ranks_exactly_once(world, micro, n):
    step = np.arange(100, 100 + n)
    per_rank = [T.rank_micro_batches(step, r, world, micro) for r in range(world)]
    assert len({len(m) for m in per_rank}) == 1  # every rank runs the same number of micro-batches
    seen = np.concatenate([mb for m in per_rank for mb in m])
    assert sorted(seen.tolist()) == step.tolist()
    weights = sum(len(mb) * world / n for m in per_rank for mb in m) / world  # as the loop weights them
    assert weights == pytest.approx(1.0)
    assert T.grad_accum_steps(16, 1, 8) == 2 and T.grad_accum_steps(16, 2, 1) == 8 and T.grad_accum_steps(16, 1, 3) == 6


# ---------------------------------------------------------------------------------------------- real runs
@pytest.mark.engine
def test_loss_falls_and_the_model_is_saved_for_from_pretrained(corpus_dir, tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "model"
    s = T.train(tiny_cfg(epochs=4), corpus_dir, 1024, str(tiny_model_dir), out, tmp_path / "work")
    rows = read_log(out / "train_log.csv")
    losses = [float(r["loss"]) for r in rows]
    assert len(rows) == s["steps"] == math.ceil(4 * (1024 // 32) / 4) == 32
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 1.0, losses  # random init: falls fast on real text
    assert s["budget_tokens"] == 1024 and s["tokens_in_blocks"] + s["tail_tokens_dropped"] == 1024
    assert s["tokens_seen"] == s["sequences_trained"] * 32 == 4 * 1024 and s["padding_tokens"] == 0
    assert s["tokens_per_s"] > 0 and s["peak_memory_mb"] > 0 and s["wall_seconds"] >= s["train_seconds"] > 0
    assert sum(int(r["tokens"]) for r in rows) == s["tokens_seen"]
    probe = s["forgetting_probe"]
    assert probe["tokens"] == 64 and probe["ppl_after"] < probe["ppl_before"]  # a random model learns English
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json",
                                               "train_log.csv", "train_summary.json"}
    assert json.loads((out / "train_summary.json").read_text())["final_loss"] == s["final_loss"]
    assert not list((tmp_path / "work").glob("step_*"))
    assert s["save_dtype"] == "float32" and json.loads((out / "config.json").read_text())["dtype"] == "float32"

    tokens, _ = load_corpus(corpus_dir)
    x = torch.from_numpy(np.asarray(tokens[:256], dtype=np.int64)).view(8, 32)
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=x, labels=x).loss
        after = AutoModelForCausalLM.from_pretrained(out)(input_ids=x, labels=x).loss
    assert float(after) < float(before) - 1.0


@pytest.mark.engine
def test_a_bf16_save_says_bf16_in_its_config(corpus_dir, tiny_model_dir, tmp_path):
    """Trained in fp32 (master weights), saved in bf16: config.json must name bfloat16 (save_pretrained would write
    the in-memory float32), so a loader with dtype "auto" gets bf16, not twice the memory."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "model"
    s = T.train(tiny_cfg(epochs=1, save_dtype="bfloat16"), corpus_dir, 256, str(tiny_model_dir), out, tmp_path / "w")
    assert s["save_dtype"] == "bfloat16" and s["precision"] == "fp32"
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config.get("torch_dtype", "bfloat16") == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16


@pytest.mark.engine
def test_probe_before_is_the_base_models_perplexity(corpus_dir, tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = T.train(tiny_cfg(epochs=1, probe={"max_tokens": 96}), corpus_dir, 256, str(tiny_model_dir),
                tmp_path / "m", tmp_path / "w")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(PROBE.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:96]  # + EOS far away
    x = torch.tensor(ids).view(3, 32)
    with torch.no_grad():
        loss = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=x, labels=x).loss
    assert s["forgetting_probe"]["loss_before"] == pytest.approx(float(loss), rel=1e-5)
    assert s["forgetting_probe"]["ppl_before"] == pytest.approx(math.exp(float(loss)), rel=1e-4)


@pytest.mark.engine
def test_resume_from_a_mid_run_checkpoint_reproduces_the_uninterrupted_run(corpus_dir, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_cfg(epochs=2, checkpoint_every=3, keep_checkpoints=2, replay={"rate": 0.25})
    full = T.train(cfg, corpus_dir, 512, str(tiny_model_dir), tmp_path / "full", tmp_path / "wf")
    with pytest.raises(T.Interrupted):  # a job that dies after step 5: its last checkpoint is step 3
        T.train(cfg, corpus_dir, 512, str(tiny_model_dir), tmp_path / "res", tmp_path / "wr", stop_after_steps=5)
    # stop_after_steps saved step 5; drop it to resume from the regular step-3 checkpoint, as after a kill
    ckpts = sorted((tmp_path / "wr").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_00000003", "step_00000005"]
    import shutil
    shutil.rmtree(ckpts[-1])
    assert not (tmp_path / "res").exists()
    resumed = T.train(cfg, corpus_dir, 512, str(tiny_model_dir), tmp_path / "res", tmp_path / "wr")
    assert resumed["resumed_from_steps"] == [3] and full["resumed_from_steps"] == []
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], abs=1e-5)
    a, b = read_log(tmp_path / "full" / "train_log.csv"), read_log(tmp_path / "res" / "train_log.csv")
    assert [r["step"] for r in b] == [r["step"] for r in a]  # the log has each step once
    assert [float(r["loss"]) for r in b] == pytest.approx([float(r["loss"]) for r in a], abs=1e-5)
    assert resumed["tokens_seen"] == full["tokens_seen"] and resumed["replay_tokens_seen"] == full["replay_tokens_seen"]
    assert resumed["forgetting_probe"]["loss_before"] == full["forgetting_probe"]["loss_before"]
    wa, wb = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "res" / "model.safetensors")
    for k in wa:
        assert np.allclose(wa[k].numpy(), wb[k].numpy(), atol=1e-6), k


@pytest.mark.unit
def test_checkpoint_clock_by_steps_and_by_wall_time():
    """cpt.checkpoint_minutes with a fake clock: due once the minutes have passed since the last checkpoint (or the
    start), whichever kind of checkpoint that was; by steps alone without it."""
    now = [0.0]
    clock = T.CheckpointClock(every=4, minutes=2.5, clock=lambda: now[0])
    due = []
    for step in range(1, 11):
        now[0] += 60.0  # each step takes a minute
        if clock.due(step):
            due.append(step)
            clock.saved()
    assert due == [3, 4, 7, 8]  # 3: 180 s after the start; 4: by steps; 7: 180 s after step 4's; 8: by steps
    steps_only = T.CheckpointClock(every=4, minutes=None, clock=lambda: now[0])
    assert [s for s in range(1, 13) if steps_only.due(s)] == [4, 8, 12]
    time_only = T.CheckpointClock(every=0, minutes=1, clock=lambda: now[0])
    assert not time_only.due(1)
    now[0] += 59.9
    assert not time_only.due(2)
    now[0] += 0.1
    assert time_only.due(3)


@pytest.mark.engine
def test_a_run_checkpoints_by_wall_time(corpus_dir, tiny_model_dir, tmp_path, monkeypatch):
    """A real run whose steps each take a (fake) minute, checkpoint_minutes 2.5 and no step cadence: checkpoints
    after steps 3 and 6 of 8 (none after the last: the model is saved then)."""
    now = [0.0]
    real_step = T.train_step

    def minute_step(*a, **k):
        now[0] += 60.0
        return real_step(*a, **k)

    monkeypatch.setattr(T, "_now", lambda: now[0])
    monkeypatch.setattr(T, "train_step", minute_step)
    cfg = tiny_cfg(epochs=1, checkpoint_every=0, checkpoint_minutes=2.5, keep_checkpoints=5, delete_checkpoints=False)
    s = T.train(cfg, corpus_dir, 1024, str(tiny_model_dir), tmp_path / "m", tmp_path / "w")
    assert s["steps"] == 8
    assert sorted(p.name for p in (tmp_path / "w").glob("step_*")) == ["step_00000003", "step_00000006"]


@pytest.mark.engine
def test_changed_settings_start_afresh(corpus_dir, tiny_model_dir, tmp_path):
    cfg = tiny_cfg(epochs=1, checkpoint_every=2)
    with pytest.raises(T.Interrupted):
        T.train(cfg, corpus_dir, 512, str(tiny_model_dir), tmp_path / "m", tmp_path / "w", stop_after_steps=2)
    s = T.train(tiny_cfg(epochs=1, checkpoint_every=2, lr=1e-3), corpus_dir, 512, str(tiny_model_dir),
                tmp_path / "m", tmp_path / "w")
    assert s["resumed_from_steps"] == [] and len(read_log(tmp_path / "m" / "train_log.csv")) == s["steps"]


@pytest.mark.engine
def test_budgets_are_nested_and_exact_in_training(corpus_dir, tiny_model_dir, tmp_path):
    cfg = tiny_cfg(epochs=1)
    small = T.train(cfg, corpus_dir, 320, str(tiny_model_dir), tmp_path / "s", tmp_path / "ws")
    large = T.train(cfg, corpus_dir, 640, str(tiny_model_dir), tmp_path / "l", tmp_path / "wl")
    assert (small["budget_tokens"], large["budget_tokens"]) == (320, 640)
    assert (small["blocks"], large["blocks"]) == (10, 20) and small["tail_tokens_dropped"] == 0
    tokens, _ = load_corpus(corpus_dir)
    s_blocks = {tuple(b) for b in np.asarray(tokens[:320]).reshape(-1, 32).tolist()}
    l_blocks = {tuple(b) for b in np.asarray(tokens[:640]).reshape(-1, 32).tolist()}
    assert s_blocks <= l_blocks  # every block of the small budget is trained in the large one


@pytest.mark.engine
def test_replay_in_a_run_and_its_errors(corpus_dir, tiny_model_dir, tmp_path):
    s = T.train(tiny_cfg(epochs=4, replay={"rate": 0.5}), corpus_dir, 512, str(tiny_model_dir),
                tmp_path / "m", tmp_path / "w")
    rows = read_log(tmp_path / "m" / "train_log.csv")
    assert sum(int(r["replay_sequences"]) for r in rows) * 32 == s["replay_tokens_seen"] > 0
    assert s["replay_tokens_seen"] + s["synthetic_tokens_seen"] == s["tokens_seen"]
    assert 0.25 < s["replay_fraction"] < 0.75 and s["replay_unique_blocks"] >= 1
    with pytest.raises(InputError, match="general-text source not found"):
        T.train(tiny_cfg(replay={"rate": 0.5, "source": str(tmp_path / "missing.txt")}), corpus_dir, 512,
                str(tiny_model_dir), tmp_path / "m2", tmp_path / "w2")
    with pytest.raises(InputError, match="needs cpt.replay.source"):
        T.train(tiny_cfg(replay={"rate": 0.5, "source": None}), corpus_dir, 512, str(tiny_model_dir),
                tmp_path / "m3", tmp_path / "w3")


@pytest.mark.engine
def test_bad_budgets_fail_clearly_on_the_command_line(corpus_dir, tiny_model_dir, tmp_path, capsys):
    tokens, _ = load_corpus(corpus_dir)
    args = ["--corpus", str(corpus_dir), "--model", str(tiny_model_dir), "--workdir", str(tmp_path / "w"),
            "--config-json", json.dumps({"seed": 1, "cpt": {"block_size": 32, "global_batch": 4, "threads": 2}})]
    assert T.main(args + ["--budget", str(len(tokens) + 1), "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert f"budget {len(tokens) + 1} tokens exceeds the corpus ({len(tokens)} tokens)" in err and "allow_budget_cap" in err
    assert T.main(args + ["--budget", "20", "--output", str(tmp_path / "b")]) == 2
    assert "shorter than one block of 32 tokens" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    capped = T.train(tiny_cfg(epochs=1, allow_budget_cap=True), corpus_dir, len(tokens) + 1000, str(tiny_model_dir),
                     tmp_path / "c", tmp_path / "wc")
    assert capped["budget_capped"] is True and capped["budget_tokens"] == len(tokens)
    assert capped["budget"] == str(len(tokens) + 1000)


@pytest.mark.engine
def test_asking_for_a_gpu_without_cuda_is_one_line_before_any_work(corpus_dir, tiny_model_dir, tmp_path):
    import torch  # here, not in a skipif: collecting the unit tier loads no torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: GPUs can be asked for")
    import subprocess

    base = ["--corpus", str(corpus_dir), "--budget", "128", "--model", str(tiny_model_dir), "--output",
            str(tmp_path / "m"), "--workdir", str(tmp_path / "w")]
    for extra, key in ((["--gpus", "1", "--config-json", '{"cpt": {"threads": 1}}'], "cpt.resources.gpu is 1"),
                       (["--config-json", '{"cpt": {"precision": "bf16", "threads": 1}}'], "cpt.precision is bf16")):
        r = subprocess.run([sys.executable, "-m", "workflow_scripts.train", *base, *extra], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {key}"), r.stderr
        assert "no CUDA device" in lines[0]
    assert not (tmp_path / "w").exists() and not (tmp_path / "m").exists()  # failed before any work


@pytest.mark.engine
def test_a_model_converted_from_gguf_trains_and_saves(corpus_dir, tiny_model_dir, tmp_path):
    """models.convert_packaged leaves `quantization_config: gguf` in config.json (as results/hf_models/ has it);
    the weights are plain floats, and the trained model must still save and reload."""
    import shutil

    from transformers import AutoModelForCausalLM

    base = tmp_path / "converted"
    shutil.copytree(tiny_model_dir, base)
    conf = json.loads((base / "config.json").read_text())
    conf["quantization_config"] = {"dequantize": False, "gguf_file": "x.gguf", "quant_method": "gguf"}
    (base / "config.json").write_text(json.dumps(conf))
    T.train(tiny_cfg(epochs=1), corpus_dir, 128, str(base), tmp_path / "m", tmp_path / "w")
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(tmp_path / "m")


@pytest.mark.engine
def test_raw_baseline_uses_its_own_epochs(tmp_path, tiny_model_dir):
    arts = tmp_path / "articles.jsonl"
    text = STORY.read_text(encoding="utf-8")[:3000]
    arts.write_text(json.dumps({"uid": "51027", "title": "Jaywalker", "author": "Rocklynne, Ross", "year": 1950,
                                "text": text}) + "\n")
    build_corpus("raw", [arts], str(tiny_model_dir), tmp_path / "raw", validate_config({}))
    s = T.train(tiny_cfg(epochs=1, raw_epochs=3), tmp_path / "raw", "all", str(tiny_model_dir), tmp_path / "m",
                tmp_path / "w")
    assert s["method"] == "raw" and s["epochs"] == 3 and s["sequences_trained"] == 3 * s["blocks"]


@pytest.mark.engine
@pytest.mark.skipif(sys.platform != "linux", reason="gloo process group on Linux")
def test_two_processes_train_like_one(corpus_dir, tiny_model_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo, DDP; FSDP2 has its own test below) gives the single-process result: the
    step's sequences are split over ranks and gradient accumulation is derived from the world size."""
    cfg = {"seed": 11, "cpt": {"block_size": 32, "global_batch": 4, "micro_batch": 1, "lr": 3e-3, "epochs": 1,
                               "threads": 1, "replay": {"rate": 0.0}, "probe": {"max_tokens": 64,
                                                                                  "source": str(PROBE)},
                               "fsdp": {"enabled": False}}}
    single = T.train(validate_config(json.loads(json.dumps(cfg))), corpus_dir, 384, str(tiny_model_dir),
                     tmp_path / "one", tmp_path / "w1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "workflow_scripts.train", "--corpus", str(corpus_dir), "--budget", "384",
                        "--model", str(tiny_model_dir), "--output", str(tmp_path / "two"),
                        "--workdir", str(tmp_path / "w2"), "--config-json", json.dumps(cfg)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert two["world_size"] == 2 and two["grad_accum"] == 2 and single["grad_accum"] == 4
    assert two["steps"] == single["steps"] and two["tokens_seen"] == single["tokens_seen"]
    assert two["final_loss"] == pytest.approx(single["final_loss"], abs=1e-4)
    assert two["forgetting_probe"]["loss_after"] == pytest.approx(single["forgetting_probe"]["loss_after"], abs=1e-4)


FSDP_CFG = {"seed": 11, "cpt": {"block_size": 32, "global_batch": 4, "micro_batch": 1, "lr": 3e-3, "epochs": 4,
                                 "threads": 1, "checkpoint_every": 4, "keep_checkpoints": 2,
                                 "replay": {"rate": 0.25, "source": str(STORY)},
                                 "probe": {"max_tokens": 64, "source": str(PROBE)},
                                 "fsdp": {"enabled": True}}}
# FSDP2 reduce-scatters fp32 gradients of each rank's half of the step and AdamW updates shards: the same sums in
# another order, so per-step losses agree with one process to float rounding, not bit for bit.
FSDP_LOSS_TOLERANCE = 2e-3


def torchrun_train(corpus_dir: Path, model: Path, out: Path, work: Path, cfg: dict) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "workflow_scripts.train", "--corpus", str(corpus_dir), "--budget", "1024", "--model", str(model),
           "--output", str(out), "--workdir", str(work), "--config-json", json.dumps(cfg)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and all its descendants at once, as a node failure would (torchrun's workers run in their
    own process groups, so killing the launcher's group would leave them training). Returns the pids killed."""
    import signal

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


@pytest.mark.engine
@pytest.mark.skipif(sys.platform != "linux", reason="gloo process group on Linux")
def test_fsdp_on_two_cpu_processes_survives_kill_9_and_matches_one_process(corpus_dir, tiny_model_dir, tmp_path):
    """FSDP2 (fully_shard per decoder layer) over 2 gloo processes: sharded training, a checkpoint, kill -9 of the
    whole job, a refused resume under another layout, the resume under the same one with no lost or repeated step,
    a final save that the evaluation stage loads, and a loss curve equal to one process's within the tolerance."""
    import time

    from workflow_scripts.qa_eval import LoglikScorer, load_local_model

    single = T.train(validate_config(json.loads(json.dumps(FSDP_CFG))), corpus_dir, 1024, str(tiny_model_dir),
                     tmp_path / "one", tmp_path / "w1")
    work, out = tmp_path / "w2", tmp_path / "two"
    job = torchrun_train(corpus_dir, tiny_model_dir, out, work, FSDP_CFG)
    deadline = time.time() + 600
    while not list(work.glob("step_*/trainer_state.json")) and job.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert len(kill_tree(job.pid)) >= 3  # the launcher and its two workers
    _, stderr = job.communicate()
    ckpts = sorted(work.glob("step_*"))
    assert ckpts and not out.exists(), "the job ended before its first checkpoint was killed: " + stderr[-3000:]
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert state["layout"] == {"world_size": 2, "fsdp": True}
    assert len(list(ckpts[-1].glob("*.distcp"))) == 2  # one shard file per rank

    with pytest.raises(InputError, match=r"world size 2 and FSDP on, this run has world size 1 and FSDP off"):
        T.train(validate_config(json.loads(json.dumps(FSDP_CFG))), corpus_dir, 1024, str(tiny_model_dir),
                tmp_path / "x", work)
    assert ckpts[-1].exists()  # refused, not deleted

    job = torchrun_train(corpus_dir, tiny_model_dir, out, work, FSDP_CFG)
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]
    two = json.loads((out / "train_summary.json").read_text())
    assert two["world_size"] == 2 and two["fsdp"] is True and two["resumed_from_steps"] == [state["step"]]
    assert 0 < state["step"] < two["steps"] and state["step"] % 4 == 0
    rows1, rows2 = read_log(tmp_path / "one" / "train_log.csv"), read_log(out / "train_log.csv")
    assert [int(r["step"]) for r in rows2] == list(range(1, two["steps"] + 1))  # no lost or repeated step
    assert [r["replay_sequences"] for r in rows2] == [r["replay_sequences"] for r in rows1]
    assert two["tokens_seen"] == single["tokens_seen"] and two["steps"] == single["steps"] == 32
    l1, l2 = [float(r["loss"]) for r in rows1], [float(r["loss"]) for r in rows2]
    assert l2 == pytest.approx(l1, abs=FSDP_LOSS_TOLERANCE), list(zip(l1, l2))
    assert l2[-1] < l2[0] - 1.0

    # the evaluation stage's loader and log-likelihood scorer read the FSDP run's save like any other
    ecfg = validate_config({})["evaluation"]
    scores = []
    for folder in (tmp_path / "one", out):
        model, tok = load_local_model(str(folder), ecfg)
        scores.append(LoglikScorer(model, tok, "Read the story.\n").score(
            [("The man walked into the", [" room.", " sea of stars."])]))
    lp = [[opt["logprob"] for opt in s[0]] for s in scores]
    assert lp[1] == pytest.approx(lp[0], abs=0.05), lp


class _GradSyncSpy:
    """Stands in for an FSDP2 module: records set_requires_gradient_sync calls."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def set_requires_gradient_sync(self, sync: bool) -> None:
        self.calls.append(sync)


@pytest.mark.unit
@pytest.mark.parametrize("opt_in,expected", [(False, []), (True, [False, False, True])])
def test_fsdp_reduce_scatters_every_micro_batch_unless_no_sync_accumulation(opt_in, expected):
    """By default FSDP2 keeps gradient sync on for every micro-batch (the reduce-scatter leaves each rank only its
    fp32 gradient shard, as torchtitan); cpt.fsdp.no_sync_accumulation turns it off for all but the last."""
    rt = T.Runtime(tiny_cfg(fsdp={"no_sync_accumulation": opt_in})["cpt"])
    rt.fsdp = True  # as under torchrun with cpt.fsdp.enabled (the layout is all no_sync reads)
    model = _GradSyncSpy()
    for i in range(3):
        with rt.no_sync(model, sync=i == 2):
            pass
    assert model.calls == expected


@pytest.mark.engine
@pytest.mark.skipif(sys.platform != "linux", reason="gloo process group on Linux")
def test_fsdp_accumulation_modes_give_the_same_losses(corpus_dir, tiny_model_dir, tmp_path):
    """FSDP2 over 2 gloo processes with 2 micro-batches per rank and step: reduce-scattering every micro-batch (the
    default) and only the last (cpt.fsdp.no_sync_accumulation) give the same per-step losses to float rounding.
    The second run also checkpoints by wall time (cpt.checkpoint_minutes, due after every step here): both processes
    agree on it every step, or the sharded save would hang."""
    logs = {}
    for opt_in in (False, True):
        cfg = json.loads(json.dumps(FSDP_CFG))
        cfg["cpt"].update(epochs=1, checkpoint_every=0, replay={"rate": 0.0})
        if opt_in:
            cfg["cpt"].update(checkpoint_minutes=1e-5, keep_checkpoints=1, delete_checkpoints=False)
        cfg["cpt"]["fsdp"]["no_sync_accumulation"] = opt_in
        out = tmp_path / f"m{int(opt_in)}"
        job = torchrun_train(corpus_dir, tiny_model_dir, out, tmp_path / f"w{int(opt_in)}", cfg)
        _, stderr = job.communicate(timeout=600)
        assert job.returncode == 0, stderr[-3000:]
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["fsdp"] is True and summary["grad_accum"] == 2 and summary["steps"] == 8
        assert summary["fsdp_no_sync_accumulation"] is opt_in
        logs[opt_in] = [float(r["loss"]) for r in read_log(out / "train_log.csv")]
    assert [p.name for p in (tmp_path / "w1").glob("step_*")] == ["step_00000007"]  # the last one kept
    assert logs[True] == pytest.approx(logs[False], abs=1e-4), list(zip(logs[False], logs[True]))
    assert logs[False][-1] < logs[False][0]


@pytest.mark.unit
def test_command_lines_have_help():
    for module in ("train", "corpus", "replay"):
        r = subprocess.run([sys.executable, "-m", f"workflow_scripts.{module}", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "usage:" in r.stdout, r.stderr
