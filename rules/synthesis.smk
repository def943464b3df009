# Stages 3-4: EntiGraph entity extraction per article; the texts of every synthesis method per article
# (append-only, resumable shards); a ledger and a corpus report per method. Logic: workflow_scripts/synthesis.py,
# entigraph.py, synth_report.py; prompts in workflow_scripts/prompts/; docs/synthesis.md.
# Each step gets only the config keys that shape its output (workflow_scripts/job_keys.py), so that, e.g., a new
# triple cap reruns synthesis but not extraction, and new prices rerun only the report.
from workflow_scripts.synthesis import method_needs_entities

SYNTH = layout.SYNTH
ENTITIES = layout.ENTITIES
SYNTH_RES = config["synthesis"]["resources"]


rule extract_entities:
    input:
        articles=ARTICLES,
        model=model_input("generator"),
    output:
        f"{ENTITIES}/{{article}}.json",
    log:
        f"{LOGS}/synthesis/extract_entities/{{article}}.log",
    benchmark:
        "results/benchmarks/synthesis/extract_entities/{article}.tsv"
    params:
        cfg=job_config("extract_entities"),
        ops=job_ops("extract_entities"),
    threads: SYNTH_RES["threads"]
    resources:
        gpu=SYNTH_RES["gpu"],
        mem_mb=SYNTH_RES["mem_mb"],
        runtime=SYNTH_RES["runtime"],
    conda:
        "../envs/synthesis-vllm.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m workflow_scripts.synthesis extract --articles {input.articles} "
        "--article {wildcards.article} --output {output} --config-json {params.cfg:q} --ops-json {params.ops:q} 2> {log}"


rule synthesize:
    input:
        articles=ARTICLES,
        model=model_input("generator"),
        # methods that read entity lists (entigraph, families with needs_entities) wait for the extraction
        entities=lambda wc: (
            [f"{ENTITIES}/{wc.article}.json"] if method_needs_entities(wc.method, config) else []
        ),
    output:
        shard=f"{SYNTH}/{{method}}/{{article}}.jsonl",
        stats=f"{SYNTH}/{{method}}/stats/{{article}}.json",
    log:
        f"{LOGS}/synthesis/synthesize/{{method}}/{{article}}.log",
    benchmark:
        "results/benchmarks/synthesis/synthesize/{method}/{article}.tsv"
    params:
        cfg=job_config("synthesize", "method"),
        ops=job_ops("synthesize", "method"),
        entities=lambda wc, input: f"--entities {input.entities}" if input.entities else "",
    threads: SYNTH_RES["threads"]
    resources:
        gpu=SYNTH_RES["gpu"],
        mem_mb=SYNTH_RES["mem_mb"],
        runtime=SYNTH_RES["runtime"],
    conda:
        "../envs/synthesis-vllm.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m workflow_scripts.synthesis synthesize --method {wildcards.method} "
        "--articles {input.articles} --article {wildcards.article} {params.entities} --output {output.shard} "
        "--stats {output.stats} --config-json {params.cfg:q} --ops-json {params.ops:q} 2> {log}"


rule synthesis_report:
    input:
        articles=ARTICLES,
        shards=lambda wc: [f"{SYNTH}/{wc.method}/{u}.jsonl" for u in article_uids()],
        stats=lambda wc: [f"{SYNTH}/{wc.method}/stats/{u}.json" for u in article_uids()],
        # entity coverage: every method is measured against the EntiGraph entity lists when they are built
        entities=lambda wc: (
            [f"{ENTITIES}/{u}.json" for u in article_uids()]
            if "entigraph" in synth_methods() or method_needs_entities(wc.method, config)
            else []
        ),
    output:
        ledger=f"{SYNTH}/{{method}}/ledger.json",
        report=f"{SYNTH}/{{method}}/report.json",
        table=report(
            f"{SYNTH}/{{method}}/report.csv",
            caption="../report/synthesis.rst",
            category="Synthetic data",
            subcategory="{method}",
        ),
    log:
        f"{LOGS}/synthesis/synthesis_report/{{method}}.log",
    params:
        cfg=job_config("synthesis_report"),
        entities=lambda wc, input: f"--entities-dir {ENTITIES}" if input.entities else "",
        synth_dir=lambda wc: f"{SYNTH}/{wc.method}",
    conda:
        "../envs/base.yaml"
    shell:
        "python -m workflow_scripts.synthesis report --method {wildcards.method} --articles {input.articles} "
        "--synth-dir {params.synth_dir} {params.entities} --ledger {output.ledger} "
        "--report {output.report} --table {output.table} --config-json {params.cfg:q} 2> {log}"


ALL_TARGETS.extend(layout.stage_targets(config, "synthesis"))
