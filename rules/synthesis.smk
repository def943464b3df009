# Stages 3-4: EntiGraph entity extraction and the texts of every synthesis method, one job per shard of
# articles (append-only, resumable per-article caches; per-article record files); a ledger and a corpus report
# per method. Logic: workflow_scripts/synthesis.py, entigraph.py, synth_report.py; prompts in
# workflow_scripts/prompts/; docs/synthesis.md.
# Each step gets only the config keys that shape its output (workflow_scripts/job_keys.py), so that, e.g., a new
# triple cap reruns synthesis but not extraction, and new prices rerun only the report.
from workflow_scripts.synthesis import method_needs_entities

SYNTH = layout.SYNTH
ENTITIES = layout.ENTITIES
SYNTH_RES = config["synthesis"]["resources"]


wildcard_constraints:
    shard=r"\d{4}-[0-9a-f]{8}",


# Extraction and synthesis run one job per shard of synthesis.articles_per_job articles (one engine start per
# job); each job writes its articles' final files into the shard's folder and a local copy rule puts them at the
# per-article paths that the report and corpus rules read. A shard's id hashes its article list, so a changed
# list is a new shard, never a mix (docs/synthesis.md "Shards"). Shard functions: rules/common.smk.


rule extract_entities:
    input:
        articles=ARTICLES,
        model=model_input("generator"),
    output:
        directory(f"{SYNTH}/entigraph/extract_shards/{{shard}}"),
    log:
        f"{LOGS}/synthesis/extract_entities/shard-{{shard}}.log",
    benchmark:
        layout.benchmark("synthesis", "extract_entities/shard-{shard}")
    conda:
        "../envs/synthesis-vllm.yaml"
    threads: SYNTH_RES["threads"]
    resources:
        gpu=SYNTH_RES["gpu"],
        mem_mb=SYNTH_RES["mem_mb"],
        runtime=SYNTH_RES["runtime"],
    params:
        guard=gpu_guard("extract_entities"),
        cfg=job_config("extract_entities"),
        ops=job_ops("extract_entities"),
        uids=lambda wc: " ".join(shard_uids(wc.shard)),
    shell:
        "OMP_NUM_THREADS={threads} {params.guard}python -m workflow_scripts.synthesis extract-shard --articles {input.articles} "
        "--shard {wildcards.shard} --shard-articles {params.uids} --outdir {output} "
        f"--work-dir {SYNTH}/entigraph/work/extraction --config-json {{params.cfg:q}} --ops-json {{params.ops:q}} 2> {{log}}"


rule entities_of_article:
    input:
        lambda wc: f"{SYNTH}/entigraph/extract_shards/{article_shard(wc.article)}",
    output:
        f"{ENTITIES}/{{article}}.json",
    log:
        f"{LOGS}/synthesis/entities_of_article/{{article}}.log",
    localrule: True
    conda:
        "../envs/base.yaml"
    shell:
        "cp {input}/{wildcards.article}.json {output} 2> {log}"


rule synthesize:
    input:
        articles=ARTICLES,
        model=model_input("generator"),
        # methods that read entity lists (entigraph, families with needs_entities) wait for the extraction
        entities=lambda wc: (
            [f"{ENTITIES}/{u}.json" for u in shard_uids(wc.shard)] if method_needs_entities(wc.method, config) else []
        ),
    output:
        directory(f"{SYNTH}/{{method}}/shards/{{shard}}"),
    log:
        f"{LOGS}/synthesis/synthesize/{{method}}/shard-{{shard}}.log",
    benchmark:
        layout.benchmark("synthesis", "synthesize/{method}/shard-{shard}")
    conda:
        "../envs/synthesis-vllm.yaml"
    threads: SYNTH_RES["threads"]
    resources:
        gpu=SYNTH_RES["gpu"],
        mem_mb=SYNTH_RES["mem_mb"],
        runtime=SYNTH_RES["runtime"],
    params:
        guard=gpu_guard("synthesize"),
        cfg=job_config("synthesize", "method"),
        ops=job_ops("synthesize", "method"),
        uids=lambda wc: " ".join(shard_uids(wc.shard)),
        entities=lambda wc, input: f"--entities-dir {ENTITIES}" if input.entities else "",
    shell:
        "OMP_NUM_THREADS={threads} {params.guard}python -m workflow_scripts.synthesis synthesize-shard --method {wildcards.method} "
        "--articles {input.articles} --shard {wildcards.shard} --shard-articles {params.uids} {params.entities} "
        f"--outdir {{output}} --work-dir {SYNTH}/{{wildcards.method}}/work --config-json {{params.cfg:q}} --ops-json {{params.ops:q}} 2> {{log}}"


rule synthesis_of_article:
    input:
        lambda wc: f"{SYNTH}/{wc.method}/shards/{article_shard(wc.article)}",
    output:
        shard=f"{SYNTH}/{{method}}/{{article}}.jsonl",
        stats=f"{SYNTH}/{{method}}/stats/{{article}}.json",
    log:
        f"{LOGS}/synthesis/synthesis_of_article/{{method}}/{{article}}.log",
    localrule: True
    conda:
        "../envs/base.yaml"
    shell:
        "(cp {input}/{wildcards.article}.jsonl {output.shard} && "
        "cp {input}/stats/{wildcards.article}.json {output.stats}) 2> {log}"


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
    conda:
        "../envs/base.yaml"
    params:
        cfg=job_config("synthesis_report"),
        entities=lambda wc, input: f"--entities-dir {ENTITIES}" if input.entities else "",
        synth_dir=lambda wc: f"{SYNTH}/{wc.method}",
    shell:
        "python -m workflow_scripts.synthesis report --method {wildcards.method} --articles {input.articles} "
        "--synth-dir {params.synth_dir} {params.entities} --ledger {output.ledger} "
        "--report {output.report} --table {output.table} --config-json {params.cfg:q} 2> {log}"


ALL_TARGETS.extend(layout.stage_targets(config, "synthesis"))
