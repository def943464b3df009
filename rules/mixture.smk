# Training mixtures (mixtures.NAME): whole blocks of the source corpora interleaved so that every budget holds each
# source's configured share within one block, and the optional perplexity curriculum (per-block base-model loss,
# computed once per corpus). The result is a corpus like rules/corpus.smk's, trained by rules/cpt.smk.
# Logic: workflow_scripts/mixture.py; docs/cpt.md "Mixtures and curriculum".
MIXTURES = mixtures(config)
MIX_CPT = config["cpt"]


# A mixture's corpus has the path of any corpus: this rule wins for mixture names, build_corpus for the others.
ruleorder: build_mixture > build_corpus


rule build_mixture:
    input:
        manifests=lambda wc: [f"{d}/manifest.json" for d in mixture_corpora(wc.method).values()],
        tokens=lambda wc: [f"{d}/tokens.npy" for d in mixture_corpora(wc.method).values()],
        model=model_input("base"),
        replay=lambda wc: (
            [GENERAL_TEXT["cpt.replay.source"]]
            if "replay" in MIXTURES[wc.method]["sources"] and "cpt.replay.source" in GENERAL_TEXT
            else []
        ),
    output:
        tokens=f"{CORPUS}/{{method}}/tokens.npy",
        manifest=f"{CORPUS}/{{method}}/manifest.json",
        sources=f"{CORPUS}/{{method}}/block_sources.npy",
    log:
        f"{LOGS}/corpus/mixture_{{method}}.log",
    wildcard_constraints:
        method="|".join(MIXTURES) or "(?!x)x",
    conda:
        "../envs/train.yaml"
    params:
        cfg=job_config("build_mixture", "method"),
        corpora=lambda wc: " ".join(f"{s}={d}" for s, d in mixture_corpora(wc.method).items()),
        model=lambda wc: model_location("base"),
        outdir=lambda wc, output: os.path.dirname(output.tokens),
    shell:
        "python -m workflow_scripts.mixture build --name {wildcards.method} --corpora {params.corpora} "
        "--model {params.model:q} --outdir {params.outdir} --config-json {params.cfg:q} 2> {log}"


rule corpus_difficulty:
    input:
        tokens=f"{CORPUS}/{{method}}/tokens.npy",
        manifest=f"{CORPUS}/{{method}}/manifest.json",
        model=model_input("base"),
    output:
        f"{CORPUS}/{{method}}/block_loss.npy",
    log:
        f"{LOGS}/corpus/difficulty_{{method}}.log",
    benchmark:
        layout.benchmark("corpus", "difficulty_{method}")
    conda:
        "../envs/train.yaml"
    threads: MIX_CPT["threads"]
    resources:
        gpu=min(1, MIX_CPT["resources"]["gpu"]),
        mem_mb=MIX_CPT["resources"]["mem_mb"],
        runtime=MIX_CPT["resources"]["runtime"],
    params:
        guard=gpu_guard("corpus_difficulty"),
        model=lambda wc: model_location("base"),
        corpus=lambda wc, input: os.path.dirname(input.tokens),
        micro_batch=MIX_CPT["micro_batch"],
    shell:
        "OMP_NUM_THREADS={threads} {params.guard}python -m workflow_scripts.mixture difficulty --corpus {params.corpus} "
        "--model {params.model:q} --micro-batch {params.micro_batch} 2> {log}"
