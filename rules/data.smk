# Stages 1-2: the QuALITY zip (or a user's corpus) -> articles.jsonl + questions.jsonl; the packaged model.
# Input and params functions of these rules: rules/common.smk.


rule download_quality:
    output:
        layout.QUALITY_ZIP,
    log:
        f"{LOGS}/download_quality.log",
    localrule: True
    conda:
        "../envs/base.yaml"
    params:
        url=config["data"]["quality"]["url"],
        sha256=f"--sha256 {config['data']['quality']['sha256']}" if config["data"]["quality"]["sha256"] else "",
    shell:
        "python -m workflow_scripts.quality download --url {params.url:q} {params.sha256} " "--output {output} 2> {log}"


checkpoint prepare_articles:
    input:
        unpack(prepare_inputs),
    output:
        articles=ARTICLES,
        questions=QUESTIONS,
        stats=layout.PREPARE_STATS,
    log:
        f"{LOGS}/prepare_articles.log",
    conda:
        "../envs/base.yaml"
    params:
        cfg=job_config("prepare_articles"),
        zip=lambda wc, input: f"--zip {input.zip}" if "zip" in input.keys() else "",
        outdir=lambda wc, output: os.path.dirname(output.articles),
    shell:
        "python -m workflow_scripts.quality prepare --config-json {params.cfg:q} {params.zip} "
        "--outdir {params.outdir} 2> {log}"


rule convert_packaged_model:
    output:
        directory(layout.converted_model("{name}")),
    log:
        f"{LOGS}/convert_packaged_model/{{name}}.log",
    conda:
        "../envs/train.yaml"
    shell:
        "python -m workflow_scripts.models convert --name {wildcards.name} --output {output} 2> {log}"


ALL_TARGETS.extend(layout.stage_targets(config, "data"))
