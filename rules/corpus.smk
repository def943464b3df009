# Stage 5: one token corpus per method (raw = the articles): tokenized with the CPT base model's tokenizer,
# shuffled with the seed, concatenated into a memory-mapped array; budgets are prefixes of it.
# Logic: workflow_scripts/corpus.py; docs/cpt.md.
CORPUS = layout.CORPUS


rule build_corpus:
    input:
        # raw: the articles; a synthesis method: its shard of every article; a filtered variant or an imported
        # corpus: its records.jsonl (common.smk method_records)
        records=lambda wc: method_records(wc.method),
        articles=ARTICLES,  # titles of corpus.document_format (SPA-style "{title}\n{text}")
        model=model_input("base"),
    output:
        tokens=f"{CORPUS}/{{method}}/tokens.npy",
        manifest=f"{CORPUS}/{{method}}/manifest.json",
    log:
        f"{LOGS}/corpus/{{method}}.log",
    conda:
        "../envs/train.yaml"
    threads: 1
    params:
        cfg=job_config("build_corpus", "method"),
        ops=job_ops("build_corpus", "method"),
        model=lambda wc: model_location("base"),  # a folder, or a hub id (no input file)
        outdir=lambda wc, output: os.path.dirname(output.tokens),
    shell:
        "python -m workflow_scripts.corpus build --method {wildcards.method} "
        "--model {params.model:q} --inputs {input.records} --articles {input.articles} --outdir {params.outdir} "
        "--config-json {params.cfg:q} --ops-json {params.ops:q} 2> {log}"
