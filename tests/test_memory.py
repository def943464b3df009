"""The memory planner (workflow_scripts/memory.py): the arithmetic by hand, the paper's and the single-GPU overlays
fitting their GPUs, the 8B LoRA and full-parameter cases of issue 21, the accumulation modes of issue 18, the
planner's table and the onstart refusal. Estimates against measured peaks: tests/test_memory_validation.py."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from workflow_scripts import memory as M
from workflow_scripts import plan as P
from workflow_scripts.config import load_config

pytestmark = pytest.mark.unit

LLAMA8B = M.KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B"]
GIB = M.GIB


def overlay(*files: str, **over) -> dict:
    cfg = load_config(P.config_files(list(files)), overrides=over or None)
    return cfg


def by_job(cfg: dict) -> dict[str, M.JobMemory]:
    return {j.job.split(" (")[0]: j for j in M.plan_memory(cfg)}


def test_shapes_parameter_counts_match_the_planner_table():
    table = overlay()["planner"]["model_params"]
    assert LLAMA8B.n_params == pytest.approx(table["meta-llama/Meta-Llama-3-8B"], rel=1e-3)
    assert M.KNOWN_SHAPES["smollm2-135m-instruct"].n_params == 134_515_008  # the converted model's count
    assert M.KNOWN_SHAPES["Qwen/Qwen2.5-0.5B"].n_params == pytest.approx(4.94e8, rel=0.01)  # biases not counted
    cfg = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True}
    shape = M.ModelShape.from_hf_config(cfg)
    # per layer: q, o 64x64; k, v 64x32; MLP 3 x 64x128; two norms
    assert shape.layer_params == 2 * 4096 + 2 * 2048 + 3 * 8192 + 128
    assert shape.n_params == 2 * shape.layer_params + 1000 * 64 + 64


def test_one_process_fp32_step_by_hand():
    """The CPU path (fp32, no FSDP): 4 + 4 + 8 bytes per parameter, the layers' saved activations, the logits."""
    shape = M.ModelShape(2, 64, 128, 4, 2, 1000, True)
    t = M.TrainShape(seq_len=16, micro_batch=2, world_size=1, grad_accum=2, param_bytes=4, fsdp=False)
    est = M.estimate_train_memory(shape, t)
    n, tokens = shape.n_params, 32
    assert est.phase == "loss backward"
    assert est.parts["weights"] == 4 * n and est.parts["grads"] == 4 * n and est.parts["optimizer"] == 8 * n
    per_token = 2 * (4 * 64 + 8 * 64) + 4 * (64 + 2 * 32) + 8 * 64 + 16 * 128  # norms, q/k/v, attention, MLP
    assert est.parts["activations"] == 2 * per_token * tokens
    assert est.parts["logits"] == 12 * tokens * 1000
    assert est.total_bytes == sum(est.parts.values())


def test_fsdp_parts_at_8b_and_the_two_accumulation_modes():
    """Paper CPT: FSDP over 8 GPUs. With no_sync_accumulation (and more than one micro-batch) every rank keeps the
    unsharded fp32 gradient: +4 bytes per parameter, about 30 GiB at 8B (issue 18)."""
    t = M.TrainShape(2048, 2, 8, 32)
    sync = M.estimate_train_memory(LLAMA8B, t)
    nosync = M.estimate_train_memory(LLAMA8B, replace(t, no_sync_accumulation=True))
    n = LLAMA8B.n_params
    assert sync.parts["optimizer"] == int(8 * n / 8)
    assert sync.parts["grads"] == int(4 * n / 8)
    assert nosync.parts["grads"] - sync.parts["grads"] == pytest.approx(4 * n, rel=1e-6)
    assert 45 < sync.gib() < 55 and 75 < nosync.gib() < 85
    one_micro = M.estimate_train_memory(LLAMA8B, replace(t, grad_accum=1, no_sync_accumulation=True))
    assert one_micro.parts["grads"] == 0  # nothing to accumulate: the loss backward starts without gradients


def test_gpu_table_and_override():
    assert M.gpu_memory_gib("NVIDIA H100 80GB SXM")[0] == pytest.approx(79.6)
    assert M.gpu_memory_gib("NVIDIA H100 NVL")[0] == pytest.approx(93.5)
    assert M.gpu_memory_gib("NVIDIA A100-SXM4-80GB")[0] == 80.0
    assert M.gpu_memory_gib("NVIDIA A100 40GB PCIe")[0] == 40.0
    assert M.gpu_memory_gib("H200")[0] > 140
    assert M.gpu_memory_gib("anything", 12.0) == (12.0, "planner.gpu_memory_gib")
    with pytest.raises(ValueError, match="planner.gpu_memory_gib"):
        M.gpu_memory_gib("Mystery Accelerator 9000")


@pytest.mark.parametrize("files", [["experiments/paper.yaml"], ["experiments/single-gpu.yaml"],
                                   ["experiments/paper.yaml", "experiments/paper-api.yaml"]])
def test_every_gpu_job_of_the_overlays_fits(files):
    cfg = overlay(*files)
    jobs = M.plan_memory(cfg)
    assert jobs, "the overlay has GPU jobs"
    assert all(j.estimate is not None for j in jobs)
    assert [j.job for j in jobs if not j.fits] == []
    assert M.memory_problems(cfg) == []


def test_paper_jobs_include_instruction_tuning_and_every_engine():
    jobs = by_job(overlay("experiments/paper.yaml"))
    assert {"synthesis", "cpt", "instruct tuning", "QA cot", "RAG cot", "summaries"} <= set(jobs)
    assert "judge" not in jobs  # the paper's judge is an API
    ins = jobs["instruct tuning"]
    assert "32 micro-batches per step" in ins.note  # global batch 512 over 8 GPUs x micro-batch 2
    assert jobs["synthesis"].estimate.parts["kv_cache"] > 40 * GIB  # the generator's 128K context fits


def test_instruction_tuning_with_no_sync_accumulation_needs_a_fix():
    """The issue's case: no_sync_accumulation true at paper scale keeps an unsharded fp32 gradient per rank."""
    cfg = overlay("experiments/paper.yaml")
    cfg["instruct"]["train"]["fsdp"] = {"no_sync_accumulation": True}
    job = by_job(cfg)["instruct tuning"]
    assert not job.fits and job.estimate.gib() > 75
    assert job.fix.startswith("instruct.train.gradient_checkpointing: true")
    assert M.fits(job.fixed_estimate.total_bytes, job.gpu_bytes, 1.5, 0.05)
    [line] = M.memory_problems(cfg)
    assert line.startswith("instruct tuning (train, meta-llama/Meta-Llama-3-8B) needs about")
    assert "fix: instruct.train.gradient_checkpointing: true" in line and "planner.memory_check: false" in line
    cfg["planner"]["memory_check"] = False
    assert M.memory_problems(cfg) == []


def eight_b_one_gpu(adapter: dict | None) -> dict:
    over = {"cpt": {"resources": {"gpu": 1}, "micro_batch": 2, "gradient_checkpointing": False},
            "evaluation": {"resources": {"gpu": 0}}, "synthesis": {"resources": {"gpu": 0}},
            "instruct": {"enabled": False}, "planner": {"gpu_type": "NVIDIA A100 80GB"}}
    if adapter is not None:
        over["cpt"]["adapter"] = adapter  # validated: the schema fills the adapter's other keys
    return overlay("experiments/paper.yaml", **over)


def test_8b_lora_fits_one_80gb_gpu_and_full_parameters_do_not():
    lora = by_job(eight_b_one_gpu({"kind": "lora", "rank": 16, "alpha": 32}))["cpt"]
    assert lora.fits, lora.estimate.parts
    assert lora.estimate.parts["weights"] == pytest.approx(2 * LLAMA8B.n_params, rel=0.02)  # frozen bf16 base
    assert lora.estimate.parts["optimizer"] < 0.5 * GIB
    full = by_job(eight_b_one_gpu(None))["cpt"]
    assert not full.fits and full.estimate.gib() > 100  # fp32 weights + bf16 copies + grads + AdamW
    # checkpointing, micro-batch 1 and CPU offload (not available to one process) do not help: more GPUs do
    assert full.fix.startswith("cpt.resources.gpu: ")
    gpus = int(full.fix.split(": ")[1].split(",")[0])
    assert 2 <= gpus <= 8
    assert M.fits(full.fixed_estimate.total_bytes, full.gpu_bytes, 1.5, 0.05)
    qlora = by_job(eight_b_one_gpu({"kind": "qlora", "rank": 16}))["cpt"]
    assert qlora.estimate.parts["weights"] < 0.5 * lora.estimate.parts["weights"]


def test_the_single_gpu_8b_lora_overlay_fits_one_80gb_gpu():
    """experiments/single-gpu-8b-lora.yaml after paper.yaml: every GPU job on one GPU, the LoRA CPT runs within an
    H100's 79.6 GiB (the run's onstart check passes), and the same run with full parameters would not."""
    cfg = overlay("experiments/paper.yaml", "experiments/single-gpu-8b-lora.yaml")
    assert cfg["models"]["base"]["name"] == "meta-llama/Meta-Llama-3-8B" and cfg["cpt"]["adapter"]["kind"] == "lora"
    jobs = by_job(cfg)
    assert {j.job.split(" (")[0] for j in M.plan_memory(cfg)} >= {"cpt", "synthesis", "QA cot"}
    assert all(j.gpus == 1 for j in M.plan_memory(cfg) if j.gpus), [(j.job, j.gpus) for j in M.plan_memory(cfg)]
    cpt = jobs["cpt"]
    assert cpt.fits and M.memory_problems(cfg) == []
    assert 40 * GIB < cpt.estimate.total_bytes < 70 * GIB  # the activations of 2 x 2048 tokens dominate
    assert cpt.estimate.parts["weights"] == pytest.approx(2 * LLAMA8B.n_params, rel=0.02)
    assert cpt.estimate.parts["grads"] + cpt.estimate.parts["optimizer"] < 1 * GIB
    trainable = LLAMA8B.lora_params(cfg["cpt"]["adapter"])
    assert trainable == 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336)) == 41_943_040
    cfg["cpt"]["adapter"]["kind"] = "none"
    assert not by_job(cfg)["cpt"].fits


def test_lora_branches_add_their_saved_inputs_to_the_activations():
    adapter = {"kind": "lora", "rank": 16, "dropout": 0.05, "target_modules": ["q_proj", "down_proj"],
               "train_embeddings": False, "train_head": False}
    t = M.TrainShape(2048, 1, 1, 1, fsdp=False, adapter=adapter)
    # per token: q_proj's input (h) and down_proj's (I), each in bf16 + a 1-byte dropout mask, + 2 x r bf16 values
    per_token = 3 * (4096 + 14336) + 2 * 2 * 16
    assert M.lora_activation_bytes(LLAMA8B, adapter, 2048, 2) == 2048 * per_token
    layer = M.layer_activation_bytes(LLAMA8B, 2048, 2) + 2048 * per_token
    est = M.estimate_train_memory(LLAMA8B, t)  # the peak phase holds every layer's (+ one layer's backward)
    assert est.parts["activations"] == layer * (32 if est.phase == "loss backward" else 33), est.phase
    assert M.lora_activation_bytes(LLAMA8B, {**adapter, "dropout": 0.0}, 1, 2) == 2 * (4096 + 14336) + 2 * 2 * 16


def test_fix_order_checkpointing_then_micro_batch_then_offload():
    check = lambda limit: (lambda e: e.total_bytes <= limit)  # noqa: E731
    t = M.TrainShape(2048, 4, 8, 1)
    base = M.estimate_train_memory(LLAMA8B, t).total_bytes
    ckpt = M.estimate_train_memory(LLAMA8B, replace(t, activation_checkpointing=True)).total_bytes
    fix, _ = M.train_fix(LLAMA8B, t, check(ckpt))
    assert fix == "cpt.gradient_checkpointing: true" and ckpt < base
    mb2 = M.estimate_train_memory(LLAMA8B, replace(t, activation_checkpointing=True, micro_batch=2)).total_bytes
    assert M.train_fix(LLAMA8B, t, check(mb2))[0] == "cpt.gradient_checkpointing: true, cpt.micro_batch: 2"
    off = M.estimate_train_memory(LLAMA8B, replace(t, activation_checkpointing=True, micro_batch=1,
                                                   cpu_offload=True)).total_bytes
    assert M.train_fix(LLAMA8B, t, check(off))[0] == ("cpt.gradient_checkpointing: true, cpt.micro_batch: 1, "
                                                       "cpt.fsdp.cpu_offload: true")
    assert M.train_fix(LLAMA8B, t, check(0)) == (None, None)


def test_vllm_kv_cache_check_and_its_fixes():
    gpu = M.gpu_memory_gib("NVIDIA A10G")[0] * GIB
    generator = M.KNOWN_SHAPES["meta-llama/Meta-Llama-3.1-8B-Instruct"]
    est, holds, need = M.estimate_vllm_memory(generator, gpu, M.VllmSettings(0.9, 1, None))
    assert est.total_bytes == pytest.approx(0.9 * gpu, rel=1e-6)
    # 15 GiB of weights leave under 3 GiB of KV cache at 128 KiB per token: not one 128K-token sequence
    assert need == 131072 and 10_000 < holds < need
    cfg = overlay("experiments/paper.yaml", planner={"gpu_type": "NVIDIA A10G"})
    jobs = by_job(cfg)
    assert not jobs["synthesis"].fits
    assert jobs["synthesis"].fix == f"backends.vllm.max_model_len: {holds // 256 * 256}"
    assert jobs["QA cot"].fits  # Llama 3 8B's own 8K context fits
    low = overlay("experiments/paper.yaml", planner={"gpu_type": "NVIDIA L4"},
                  backends={"vllm": {"gpu_memory_utilization": 0.5}})
    assert by_job(low)["QA cot"].fix == "backends.vllm.gpu_memory_utilization: 0.95"
    small = overlay("experiments/paper.yaml", planner={"gpu_type": "Tesla T4"})  # 15 GiB < the 8B weights
    assert by_job(small)["QA cot"].fix.startswith("backends.vllm.tensor_parallel_size: 2")


def test_planner_prints_the_memory_table(capsys):
    assert P.main(["--configfile", "experiments/paper.yaml"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("Memory per GPU"):]
    for job in ("synthesis", "cpt (49 runs)", "instruct tuning", "QA cot", "RAG cot", "summaries"):
        assert f"\n  {job} " in table
    assert "weights" in table and "optim" in table and "NO" not in table
    assert P.main(["--configfile", "experiments/single-gpu.yaml", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    jobs = {m["job"]: m for m in doc["memory"]}
    assert jobs["QA loglik"]["fits"] is True and jobs["QA loglik"]["parts"]["weights"] > 0
    assert P.main([]) == 0  # the CPU demo: no GPU jobs
    assert "Memory: no GPU jobs" in capsys.readouterr().out


def test_unknown_model_is_not_checked_but_said(tmp_path):
    cfg = overlay("experiments/single-gpu.yaml")
    cfg["models"]["base"] = {"source": "hf", "name": "someone/unknown-model"}
    job = by_job(cfg)["cpt"]
    assert job.fits is None and job.estimate is None and "config.json" in job.note
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "vocab_size": 1000}))
    cfg["models"]["base"] = {"source": "path", "name": str(folder)}
    assert by_job(cfg)["cpt"].fits is True
