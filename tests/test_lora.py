"""LoRA CPT (issue 21, item 2; workflow_scripts/lora.py) on the tiny Llama: only the adapter trains and the loss
falls; a killed run resumes to the uninterrupted result and a changed adapter starts afresh; the merged weights
equal the adapter applied by peft; QLoRA and bad target modules are refused in one line. Whatever trains, loads or starts the tiny model (torch)
is the engine tier; the config, layout and job-key checks of the LoRA twins are the unit tier."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_train import corpus_dir, read_log, tiny_cfg  # noqa: F401  (corpus_dir is a fixture)
from workflow_scripts import lora
from workflow_scripts import train as T
from workflow_scripts.corpus import load_corpus
from workflow_scripts.io_utils import InputError

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "v_proj", "down_proj"]


def lora_cfg(epochs: int = 2, **adapter) -> dict:
    """LoRA on three kinds of layer of the tiny model, with an LR that moves a random model in a few steps (its
    frozen random head keeps the loss near log(vocab): LoRA moves it by about 0.1 here, full CPT by several)."""
    return tiny_cfg(epochs=epochs, adapter={"kind": "lora", "rank": 4, "alpha": 8, "target_modules": TARGETS,
                                       "lr": 5e-2, **adapter})


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.engine
def test_only_the_adapter_trains_and_the_loss_falls(corpus_dir, tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    s = T.train(lora_cfg(), corpus_dir, 1024, str(tiny_model_dir), tmp_path / "m", tmp_path / "w")
    losses = [float(r["loss"]) for r in read_log(tmp_path / "m" / "train_log.csv")]
    assert len(losses) == s["steps"] == 16 and np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    tokens, _ = load_corpus(corpus_dir)
    x = torch.from_numpy(np.asarray(tokens[:1024], dtype=np.int64)).view(32, 32)  # the tokens it trained on
    with torch.no_grad():
        before = float(AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=x, labels=x).loss)
        after = float(AutoModelForCausalLM.from_pretrained(tmp_path / "m")(input_ids=x, labels=x).loss)
    assert after < before - 0.05, (before, after)
    assert s["lr"] == 5e-2  # cpt.adapter.lr replaces cpt.lr
    # rank 4 x (in + out) on q (64+64), v (64+32), down (128+64) in 2 layers
    assert s["adapter"]["kind"] == "lora" and s["adapter"]["trainable_parameters"] == 2 * 4 * (128 + 96 + 192)
    base, merged = weights(tiny_model_dir), weights(tmp_path / "m")
    assert set(merged) == set(base)  # the plain model's keys: evaluation reads it as any CPT model
    for key in base:
        changed = not np.array_equal(base[key].numpy(), merged[key].numpy())
        assert changed == any(f"{t}.weight" in key for t in TARGETS), key  # only the targets' merged weights move
    adapter = tmp_path / "m" / "adapter"
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert acfg["r"] == 4 and acfg["lora_alpha"] == 8 and sorted(acfg["target_modules"]) == sorted(TARGETS)
    from safetensors.torch import load_file

    assert all(".lora_A." in k or ".lora_B." in k for k in load_file(adapter / "adapter_model.safetensors"))
    probe = s["forgetting_probe"]
    assert probe["loss_after"] != probe["loss_before"]


@pytest.mark.engine
def test_trained_embeddings_are_tied_and_saved_in_the_adapter(corpus_dir, tiny_model_dir, tmp_path):
    s = T.train(lora_cfg(train_embeddings=True, target_modules=["q_proj"]), corpus_dir, 256, str(tiny_model_dir),
                tmp_path / "m", tmp_path / "w")
    base, merged = weights(tiny_model_dir), weights(tmp_path / "m")
    emb = "model.embed_tokens.weight"
    assert not np.array_equal(base[emb].numpy(), merged[emb].numpy())
    assert s["adapter"]["trainable_parameters"] == base[emb].numel() + 2 * 4 * (64 + 64)  # one tied matrix
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # still tied after the merge
    assert np.array_equal(m.model.embed_tokens.weight.detach().numpy(), merged[emb].numpy())


@pytest.mark.engine
def test_merged_weights_equal_the_adapter_applied_by_peft(corpus_dir, tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    T.train(lora_cfg(epochs=1), corpus_dir, 512, str(tiny_model_dir), tmp_path / "m", tmp_path / "w")
    tokens, _ = load_corpus(corpus_dir)
    x = torch.from_numpy(np.asarray(tokens[:128], dtype=np.int64)).view(4, 32)
    with torch.no_grad():
        applied = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                            tmp_path / "m" / "adapter").eval()(input_ids=x).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()(input_ids=x).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=x).logits
    assert (applied - base).abs().max() > 1e-3  # the adapter does something
    assert torch.allclose(merged, applied, atol=1e-4), (merged - applied).abs().max()


@pytest.mark.engine
def test_merge_state_dict_equals_peft_merge_and_unload(tiny_model_dir):
    """The pure merge (used under every layout, FSDP too) against peft's own, with random B (peft starts B at 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    cpt = lora_cfg(train_head=True)["cpt"]
    torch.manual_seed(3)
    model = lora.prepare(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cpt, "fp32")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ours = lora.merge_state_dict(model.state_dict(), cpt["adapter"]["alpha"] / cpt["adapter"]["rank"])
    theirs = model.merge_and_unload().state_dict()
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.allclose(ours[k].float(), theirs[k].float(), atol=1e-6), k
    with pytest.raises(ValueError, match="without both matrices"):
        lora.merge_state_dict({"base_model.model.x.lora_A.default.weight": torch.zeros(1, 1)}, 1.0)


@pytest.mark.engine
def test_a_killed_run_resumes_to_the_uninterrupted_result(corpus_dir, tiny_model_dir, tmp_path):
    import torch.distributed.checkpoint as dcp

    cfg = lora_cfg(dropout=0.2)  # dropout draws: the RNG state must be restored too
    cfg["cpt"].update(checkpoint_every=3, keep_checkpoints=2)
    full = T.train(cfg, corpus_dir, 512, str(tiny_model_dir), tmp_path / "full", tmp_path / "wf")
    with pytest.raises(T.Interrupted):
        T.train(cfg, corpus_dir, 512, str(tiny_model_dir), tmp_path / "res", tmp_path / "wr", stop_after_steps=5)
    ckpts = sorted((tmp_path / "wr").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_00000003", "step_00000005"]
    # a checkpoint holds the adapter and its AdamW state, not the frozen base
    keys = list(dcp.FileSystemReader(str(ckpts[0])).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.")]
    others = [k for k in model_keys if ".lora_A." not in k and ".lora_B." not in k]
    # torch's state dict keeps a tied weight under the head's name even when it is frozen: 1 of the 2 + 18 tensors
    assert len(model_keys) == 2 * 3 * 2 + len(others) and others == ["model.base_model.model.lm_head.weight"]
    assert any(k.startswith("optim.state.") and k.endswith("exp_avg_sq") for k in keys)
    shutil.rmtree(ckpts[-1])  # resume from the regular step-3 checkpoint, as after a kill
    resumed = T.train(cfg, corpus_dir, 512, str(tiny_model_dir), tmp_path / "res", tmp_path / "wr")
    assert resumed["resumed_from_steps"] == [3] and full["resumed_from_steps"] == []
    a, b = read_log(tmp_path / "full" / "train_log.csv"), read_log(tmp_path / "res" / "train_log.csv")
    assert [float(r["loss"]) for r in b] == pytest.approx([float(r["loss"]) for r in a], abs=1e-6)
    wa, wb = weights(tmp_path / "full"), weights(tmp_path / "res")
    for k in wa:
        assert np.allclose(wa[k].numpy(), wb[k].numpy(), atol=1e-6), k


@pytest.mark.engine
def test_a_changed_adapter_does_not_resume(corpus_dir, tiny_model_dir, tmp_path):
    """cpt.adapter is in the resume fingerprint: a checkpoint of another rank (or of full CPT) is not resumed."""
    for first in (lora_cfg(), tiny_cfg(epochs=2)):
        first["cpt"].update(checkpoint_every=2)
        work = tmp_path / ("w-" + first["cpt"]["adapter"]["kind"])
        with pytest.raises(T.Interrupted):
            T.train(first, corpus_dir, 512, str(tiny_model_dir), tmp_path / "m", work, stop_after_steps=2)
        second = lora_cfg(rank=8)
        second["cpt"].update(checkpoint_every=2)
        s = T.train(second, corpus_dir, 512, str(tiny_model_dir), tmp_path / "m", work)
        assert s["resumed_from_steps"] == [] and len(read_log(tmp_path / "m" / "train_log.csv")) == s["steps"]
        assert s["adapter"]["rank"] == 8


@pytest.mark.unit
def test_resolve_keeps_cpt_lr_when_the_adapter_has_none():
    cfg = lora_cfg(lr=None)
    assert lora.resolve(cfg) is cfg and cfg["cpt"]["lr"] == 3e-3
    cfg = lora_cfg()
    out = lora.resolve(cfg)
    assert out["cpt"]["lr"] == 5e-2 and cfg["cpt"]["lr"] == 3e-3  # the input is left as it was
    full = tiny_cfg()
    assert full["cpt"]["adapter"]["kind"] == "none" and lora.resolve(full) is full and not lora.enabled(full["cpt"])


@pytest.mark.engine
def test_a_target_that_is_not_a_linear_layer_is_one_clear_error(corpus_dir, tiny_model_dir, tmp_path):
    with pytest.raises(InputError, match=r"cpt.adapter.target_modules: embed_tokens is not a linear layer"):
        T.train(lora_cfg(target_modules=["q_proj", "embed_tokens"]), corpus_dir, 256, str(tiny_model_dir),
                tmp_path / "m", tmp_path / "w")
    assert not (tmp_path / "m").exists()


@pytest.mark.engine
def test_qlora_without_cuda_is_one_line_before_any_work(corpus_dir, tiny_model_dir, tmp_path):
    import torch  # here, not in a skipif: collecting the unit tier loads no torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: QLoRA may run")
    cfg = {"seed": 1, "cpt": {"block_size": 32, "global_batch": 4, "threads": 1, "adapter": {"kind": "qlora"}}}
    r = subprocess.run([sys.executable, "-m", "workflow_scripts.train", "--corpus", str(corpus_dir), "--budget", "128",
                        "--model", str(tiny_model_dir), "--output", str(tmp_path / "m"), "--workdir",
                        str(tmp_path / "w"), "--config-json", json.dumps(cfg)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: cpt.adapter.kind is qlora") and "no CUDA device" in lines[0]
    assert "untested" in lines[0]
    assert not (tmp_path / "w").exists() and not (tmp_path / "m").exists()


# ------------------------------------------------------------------------ LoRA twins (cpt.compare_adapter)
@pytest.mark.unit
def test_twin_ids_folders_and_their_place_among_the_models():
    from workflow_scripts import layout
    from workflow_scripts.config import load_config

    assert layout.parse_model_id("entigraph-128-lora") == ("entigraph-lora", 128)
    assert layout.budget_of("entigraph-r0.001-lora") == "r0.001"
    assert layout.model_subdir("entigraph-128-lora") == "entigraph/128-lora"
    assert layout.train_summary_path("entigraph-128-lora") == "results/models/entigraph/128-lora/train_summary.json"
    demo = load_config()
    assert layout.lora_twins(demo) == [] and not any(m.endswith("-lora") for m in layout.eval_models(demo))
    cfg = load_config([ROOT / "config.yaml", ROOT / "experiments" / "cpu-lora.yaml"])
    twins = layout.lora_twins(cfg)
    full = [layout.model_id(m, b) for m, b in layout.cpt_models(cfg) if m != "raw"]
    assert twins == [layout.lora_id(m) for m in full] and len(twins) == 6  # 2 methods x 3 budgets, no Raw twin
    assert set(twins) <= set(layout.eval_models(cfg))
    assert layout.model_dir("entigraph-128-lora", cfg) in layout.stage_targets(cfg, "cpt")


@pytest.mark.unit
def test_a_twin_reads_the_cpt_keys_with_a_lora_adapter():
    from workflow_scripts import job_keys
    from workflow_scripts.config import load_config

    cfg = load_config([ROOT / "config.yaml", ROOT / "experiments" / "cpu-lora.yaml"])
    full, twin = job_keys.shaping(cfg, "cpt"), job_keys.shaping(cfg, "cpt_lora")
    # full CPT reads only the adapter's kind (tuning the twins retrains no full model); the twin reads its own LR
    assert full["cpt"].pop("adapter") == {"kind": "none"} and full["cpt"].pop("lr") == 1e-4
    assert twin["cpt"].pop("adapter") == {**cfg["cpt"]["adapter"], "kind": "lora"} and "lr" not in twin["cpt"]
    assert twin == full  # otherwise the same recipe, at the same tokens
    assert "compare_adapter" not in full["cpt"]  # it decides which jobs exist: no job reruns when it changes
    assert job_keys.operational(cfg, "cpt_lora") == job_keys.operational(cfg, "cpt")
    changed = {**cfg, "cpt": {**cfg["cpt"], "adapter": {**cfg["cpt"]["adapter"], "rank": 4}}}
    assert job_keys.shaping(changed, "cpt") == job_keys.shaping(cfg, "cpt")
    assert job_keys.shaping(changed, "cpt_lora") != job_keys.shaping(cfg, "cpt_lora")


@pytest.mark.unit
def test_compare_adapter_with_an_adapter_on_the_main_models_is_one_line():
    from workflow_scripts.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match=r"^cpt.compare_adapter adds LoRA twins .* cpt.adapter.kind is lora: set "
                                          r"cpt.adapter.kind: none"):
        validate_config({"cpt": {"compare_adapter": True, "adapter": {"kind": "lora"}}})


@pytest.mark.unit
def test_aggregate_reads_a_twins_train_summary_and_the_figure_names_its_series(tmp_path):
    from workflow_scripts import aggregate, figures

    folder = tmp_path / "models" / "entigraph" / "128-lora"
    folder.mkdir(parents=True)
    (folder / "train_summary.json").write_text(json.dumps({"tokens_seen": 128, "epochs": 1, "budget_tokens": 128,
                                                           "corpus_total_tokens": 512}))
    ts = aggregate.train_summary(tmp_path / "models", "entigraph-lora", "entigraph-128-lora")
    assert ts["tokens_seen"] == 128
    assert figures.method_label("entigraph-lora") == "EntiGraph CPT (LoRA)"
