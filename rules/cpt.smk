# Stage 6: continued pretraining, one job per method x budget plus the Raw baseline (results/models/raw/all/).
# One process on CPU or one GPU; torchrun with one process per GPU (FSDP) when cpt.resources.gpu > 1, or with
# cpt.resources.cpu_processes CPU processes over gloo on a machine without GPUs.
# Logic: workflow_scripts/train.py; docs/cpt.md.
CPT = config["cpt"]
# The local general-text files it reads (forgetting probe; replay source when it replays): rules/common.smk.
CPT_GENERAL = [
    GENERAL_TEXT[k]
    for k in ["cpt.probe.source"] + ["cpt.replay.source"] * (CPT["replay"]["rate"] > 0)
    if k in GENERAL_TEXT
]


rule cpt:
    input:
        corpus=f"{CORPUS}/{{method}}/tokens.npy",
        manifest=f"{CORPUS}/{{method}}/manifest.json",
        model=model_input("base"),
        general=CPT_GENERAL,
        replay_pool=REPLAY_POOL_FILES,  # built once per run (rules/replay.smk), memory-mapped by every rank
        articles=ARTICLES,  # the forgetting probe is checked against them (workflow_scripts/replay.py)
        # a mixture trained easy to hard reads the per-block losses of its corpus (rules/mixture.smk)
        difficulty=lambda wc: (
            [f"{CORPUS}/{wc.method}/block_loss.npy"]
            if MIXTURES.get(wc.method, {}).get("order") == "perplexity"
            else []
        ),
    output:
        directory(f"{layout.MODELS}/{{method}}/{{budget}}"),
    log:
        f"{LOGS}/cpt/{{method}}/{{budget}}.log",
    benchmark:
        layout.benchmark("cpt", "{method}/{budget}")
    conda:
        "../envs/train.yaml"
    threads: training_threads(CPT["resources"])
    resources:
        gpu=CPT["resources"]["gpu"],
        mem_mb=CPT["resources"]["mem_mb"],
        runtime=CPT["resources"]["runtime"],
    params:
        guard=gpu_guard("cpt"),
        cfg=job_config("cpt"),
        ops=job_ops("cpt"),
        model=lambda wc: model_location("base"),  # a folder, or a hub id (no input file)
        corpus=lambda wc, input: os.path.dirname(input.corpus),
        workdir=lambda wc: layout.cpt_checkpoints(wc.method, wc.budget),
        pool=lambda wc, input: f"--replay-pool {os.path.dirname(input.replay_pool[0])} " if input.replay_pool else "",
        # one process, or torchrun with one worker per GPU, or per CPU process (cpt.resources.cpu_processes)
        launch=training_launch(CPT["resources"]),
        omp=lambda wc, resources: CPT["threads"],  # operational: a function of resources is not tracked (job_ops)
    shell:
        "OMP_NUM_THREADS={params.omp} TOKENIZERS_PARALLELISM=false {params.guard}{params.launch} -m workflow_scripts.train "
        "--corpus {params.corpus} --method {wildcards.method} --budget {wildcards.budget} --model {params.model:q} "
        "--output {output} --workdir {params.workdir} --articles {input.articles} --gpus {resources.gpu} {params.pool}"
        "--config-json {params.cfg:q} --ops-json {params.ops:q} 2> {log}"


# LoRA twins of the method x budget models, trained on the same tokens with cpt.adapter as kind lora
# (cpt.compare_adapter; model id METHOD-BUDGET-lora; workflow_scripts/lora.py, docs/cpt.md "LoRA CPT").
use rule cpt as cpt_lora with:
    output:
        directory(f"{layout.MODELS}/{{method}}/{{budget}}{layout.LORA_SUFFIX}"),
    log:
        f"{LOGS}/cpt/{{method}}/{{budget}}{layout.LORA_SUFFIX}.log",
    benchmark:
        layout.benchmark("cpt", f"{{method}}/{{budget}}{layout.LORA_SUFFIX}")
    params:
        cfg=job_config("cpt_lora"),
        ops=job_ops("cpt_lora"),
        workdir=lambda wc: layout.cpt_checkpoints(wc.method, f"{wc.budget}{layout.LORA_SUFFIX}"),


ALL_TARGETS.extend(layout.stage_targets(config, "cpt"))
