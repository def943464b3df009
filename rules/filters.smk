# Between synthesis and the corpora: filtered variants of a method (length/repetition heuristics, MinHash dedup,
# an LLM judge) and imported synthetic corpora. Each is a method of its own: rules/corpus.smk tokenizes its
# records.jsonl like a synthesis method's shards. Logic: workflow_scripts/filters.py, import_corpus.py;
# docs/synthesis.md "Filters" and "Imported corpora".
FILTERED = layout.FILTERED
IMPORTED = layout.IMPORTED
FILTER_RES = config["filters"]["resources"]


rule filter_variant:
    input:
        articles=ARTICLES,
        records=lambda wc: method_records(filter_variants(config)[wc.method]["source"]),
        model=lambda wc: filter_judge_model_input(wc.method),
    output:
        records=f"{FILTERED}/{{method}}/records.jsonl",
        removed=f"{FILTERED}/{{method}}/removed.jsonl",
        scores=f"{FILTERED}/{{method}}/judge_scores.jsonl",
        report=f"{FILTERED}/{{method}}/report.json",
        table=report(
            f"{FILTERED}/{{method}}/report.csv",
            caption="../report/filters.rst",
            category="Synthetic data",
            subcategory="{method}",
        ),
    log:
        f"{LOGS}/filters/{{method}}.log",
    benchmark:
        layout.benchmark("filters", "{method}")
    conda:
        "../envs/synthesis-vllm.yaml"
    threads: FILTER_RES["threads"]
    resources:
        gpu=FILTER_RES["gpu"],
        mem_mb=FILTER_RES["mem_mb"],
        runtime=FILTER_RES["runtime"],
    params:
        guard=gpu_guard("filter_variant"),
        cfg=job_config("filter_variant", "method"),
        ops=job_ops("filter_variant", "method"),
        outdir=lambda wc: f"{FILTERED}/{wc.method}",
    shell:
        "OMP_NUM_THREADS={threads} {params.guard}python -m workflow_scripts.filters run --variant {wildcards.method} "
        "--articles {input.articles} --inputs {input.records} --outdir {params.outdir} "
        "--config-json {params.cfg:q} --ops-json {params.ops:q} 2> {log}"


rule import_corpus:
    input:
        articles=ARTICLES,
        source=lambda wc: imported(config)[wc.method]["path"],
    output:
        records=f"{IMPORTED}/{{method}}/records.jsonl",
        report=report(
            f"{IMPORTED}/{{method}}/report.json",
            caption="../report/import.rst",
            category="Synthetic data",
            subcategory="{method}",
        ),
    log:
        f"{LOGS}/imports/{{method}}.log",
    conda:
        "../envs/base.yaml"
    params:
        cfg=job_config("import_corpus", "method"),
    shell:
        "python -m workflow_scripts.import_corpus --name {wildcards.method} --articles {input.articles} "
        "--output {output.records} --report {output.report} --config-json {params.cfg:q} 2> {log}"


ALL_TARGETS.extend(layout.stage_targets(config, "filters"))
