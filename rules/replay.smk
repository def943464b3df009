# The run's replay pool (cpt.replay), built once on a CPU: the shuffled general-text documents tokenized like the
# corpora (tokens.bin), the held-out probe tokens (heldout.bin) and meta.json. Every CPT process memory-maps it
# (train.py --replay-pool) instead of tokenizing the source itself. Logic: workflow_scripts/replay.py; docs/cpt.md.
REPLAY_POOL_FILES = layout.replay_pool_files(config)


rule replay_pool:
    input:
        # a local file or folder (a missing one stops a real run in one line: rules/common.smk GENERAL_TEXT)
        source=[GENERAL_TEXT[k] for k in ["cpt.replay.source"] if k in GENERAL_TEXT],
        model=model_input("base"),
    output:
        tokens=f"{layout.REPLAY_POOL}/{layout.POOL_TOKENS}",
        heldout=f"{layout.REPLAY_POOL}/{layout.POOL_HELDOUT}",
        meta=f"{layout.REPLAY_POOL}/{layout.POOL_META}",
    log:
        f"{LOGS}/replay/pool.log",
    benchmark:
        layout.benchmark("replay", "pool")
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=config["cpt"]["resources"]["mem_mb"],
        runtime=config["cpt"]["resources"]["runtime"],
    params:
        cfg=job_config("replay_pool"),
        model=lambda wc: model_location("base"),  # a folder, or a hub id (no input file)
        outdir=lambda wc, output: os.path.dirname(output.meta),
    shell:
        "python -m workflow_scripts.replay pool --model {params.model:q} --outdir {params.outdir} "
        "--config-json {params.cfg:q} 2> {log}"
