# After CPT (paper section 4.3): instruction tuning of trained models ({model}-instruct in
# results/models/{model}/instruct), their summaries with the paper's Table 5 prompts, claim-based scoring by a judge
# LLM, the claims table and figure, and a qualitative report per model. Off in the demo (instruct.enabled: false);
# experiments/cpu-instruct.yaml runs it on CPU. Logic: workflow_scripts/instruct.py, summaries.py, claims.py;
# docs/instruct.md.
INSTRUCT = config["instruct"]
INSTRUCT_DIR = "results/instruct"
INSTRUCT_CORPUS = f"{INSTRUCT_DIR}/corpus"
CLAIMS_TABLE = "results/tables/summary_claims.csv"
CLAIMS_FIGURE = f"{FIGURES}/summary_claims.png"
HUMAN_CLAIMS = f"{INSTRUCT_DIR}/human/claims.jsonl" if INSTRUCT["judge"]["human_summaries"] else None
_NOT_INHERITED = ("budgets", "method_budgets", "resources", "allow_budget_cap")  # as workflow_scripts/instruct.py


def instruct_models():
    """Instruct model ids ({model}-instruct) of instruct.models, or of every trained model."""
    starts = INSTRUCT["models"] if INSTRUCT["models"] is not None else ["base"] + [model_id(m, b) for m, b in cpt_models()]
    return [f"{m}-instruct" for m in starts]


def instruct_start_input(wildcards):
    return model_input("base") if wildcards.model == "base" else [model_dir(wildcards.model)]


def instruct_json(*parts):
    """--config-json of an instruction stage: the instruct sub-sections it uses (+ top-level sections)."""
    sub = {k: INSTRUCT[k] for k in parts if k in INSTRUCT}
    top = {k: config[k] for k in parts if k not in INSTRUCT}
    return json.dumps({"seed": config["seed"], **top, "instruct": sub}, sort_keys=True)


def engine_json(engine, *parts):
    """instruct_json plus the engine's backend settings (the model is passed separately)."""
    cfg = json.loads(instruct_json(*parts))
    cfg["backends"] = {engine: config["backends"].get(engine) or {}}
    return json.dumps(cfg, sort_keys=True)


def judge_json():
    cfg = json.loads(engine_json(INSTRUCT["judge"]["engine"], "judge"))
    cfg["models"] = {"generator": config["models"]["generator"]}  # the judge's default model
    return json.dumps(cfg, sort_keys=True)


def judge_model_input():
    """The judge model folder when it is local (a packaged or path model)."""
    spec = INSTRUCT["judge"]["model"] or config["models"]["generator"]
    if INSTRUCT["judge"]["engine"] == "openai" or spec["source"] == "hf":
        return []
    return [f"results/hf_models/{spec['name']}" if spec["source"] == "package" else spec["name"]]


INSTRUCT_DATA_INPUT = [INSTRUCT["data"]["source"]] if os.path.exists(INSTRUCT["data"]["source"]) else []
INSTRUCT_TUNE_CFG = json.dumps({"seed": config["seed"],
                                "cpt": {k: v for k, v in config["cpt"].items() if k not in _NOT_INHERITED},
                                "instruct": {"train": INSTRUCT["train"],
                                             "chat_template_from": INSTRUCT["chat_template_from"]}}, sort_keys=True)
INSTRUCT_RES = INSTRUCT["summaries"]["resources"]


rule instruct_corpus:
    input:
        model=model_input("base"),
        data=INSTRUCT_DATA_INPUT,
    output:
        tokens=f"{INSTRUCT_CORPUS}/tokens.npy",
        manifest=f"{INSTRUCT_CORPUS}/manifest.json",
        chat=f"{INSTRUCT_CORPUS}/chat.jsonl",
    log:
        f"{LOGS}/instruct/corpus.log",
    params:
        cfg=instruct_json("data", "chat_template_from", "corpus"),
        model=lambda wc: model_location("base"),
    threads: 1
    conda:
        "../envs/train.yaml"
    shell:
        "python -m workflow_scripts.instruct corpus --model {params.model:q} --outdir {INSTRUCT_CORPUS} "
        "--config-json {params.cfg:q} 2> {log}"


rule instruct_tune:
    input:
        tokens=rules.instruct_corpus.output.tokens,
        manifest=rules.instruct_corpus.output.manifest,
        model=instruct_start_input,
    output:
        directory("results/models/{model}/instruct"),
    log:
        f"{LOGS}/instruct/tune/{{model}}.log",
    benchmark:
        "results/benchmarks/instruct/tune/{model}.tsv"
    params:
        cfg=INSTRUCT_TUNE_CFG,
        start=lambda wc: model_location("base") if wc.model == "base" else model_dir(wc.model),
        workdir=lambda wc: f"results/checkpoints/instruct/{wc.model}",
        launch=lambda wc, resources: (f"python -m torch.distributed.run --standalone --nproc_per_node {resources.gpu}"
                                      if int(resources.gpu) > 1 else "python"),
    threads: config["cpt"]["threads"]
    resources:
        gpu=INSTRUCT["resources"]["gpu"],
        mem_mb=INSTRUCT["resources"]["mem_mb"],
        runtime=INSTRUCT["resources"]["runtime"],
    conda:
        "../envs/train.yaml"
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} -m workflow_scripts.instruct tune --corpus {INSTRUCT_CORPUS} "
        "--start {params.start:q} --output {output} --workdir {params.workdir} --config-json {params.cfg:q} 2> {log}"


rule summarize:
    input:
        articles=ARTICLES,
        model=lambda wc: model_dir(wc.model),
    output:
        f"{INSTRUCT_DIR}/summaries/{{model}}.jsonl",
    log:
        f"{LOGS}/instruct/summarize/{{model}}.log",
    params:
        cfg=engine_json(INSTRUCT["summaries"]["engine"], "summaries"),
    threads: INSTRUCT["summaries"]["threads"]
    resources:
        gpu=INSTRUCT_RES["gpu"],
        mem_mb=INSTRUCT_RES["mem_mb"],
        runtime=INSTRUCT_RES["runtime"],
    conda:
        "../envs/eval.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m workflow_scripts.summaries summarize --model-id {wildcards.model} "
        "--model-path {input.model:q} --articles {input.articles} --output {output} --config-json {params.cfg:q} 2> {log}"


rule judge_summaries:
    input:
        summaries=f"{INSTRUCT_DIR}/summaries/{{model}}.jsonl",
        articles=ARTICLES,
        judge=judge_model_input(),
    output:
        jsonl=f"{INSTRUCT_DIR}/claims/{{model}}.jsonl",
        json=f"{INSTRUCT_DIR}/claims/{{model}}.json",
    log:
        f"{LOGS}/instruct/judge/{{model}}.log",
    params:
        cfg=judge_json(),
    threads: INSTRUCT["summaries"]["threads"]
    resources:
        gpu=INSTRUCT_RES["gpu"],
        mem_mb=INSTRUCT_RES["mem_mb"],
        runtime=INSTRUCT_RES["runtime"],
    conda:
        "../envs/eval.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m workflow_scripts.claims judge --summaries {input.summaries} "
        "--articles {input.articles} --output-jsonl {output.jsonl} --output-json {output.json} "
        "--config-json {params.cfg:q} 2> {log}"


rule judge_human_summaries:
    input:
        human=INSTRUCT["judge"]["human_summaries"] or [],
        articles=ARTICLES,
        judge=judge_model_input(),
    output:
        jsonl=f"{INSTRUCT_DIR}/human/claims.jsonl",
        json=f"{INSTRUCT_DIR}/human/claims.json",
    log:
        f"{LOGS}/instruct/judge/human.log",
    params:
        cfg=judge_json(),
    threads: INSTRUCT["summaries"]["threads"]
    resources:
        gpu=INSTRUCT_RES["gpu"],
        mem_mb=INSTRUCT_RES["mem_mb"],
        runtime=INSTRUCT_RES["runtime"],
    conda:
        "../envs/eval.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m workflow_scripts.claims judge --human {input.human} "
        "--articles {input.articles} --output-jsonl {output.jsonl} --output-json {output.json} "
        "--config-json {params.cfg:q} 2> {log}"


rule claims_table:
    input:
        claims=expand(f"{INSTRUCT_DIR}/claims/{{model}}.json", model=instruct_models()),
        claims_jsonl=expand(f"{INSTRUCT_DIR}/claims/{{model}}.jsonl", model=instruct_models()),
        human=[HUMAN_CLAIMS] if HUMAN_CLAIMS else [],
    output:
        table=report(CLAIMS_TABLE, caption="../report/summary_claims.rst", category="Summaries"),
        figure=report(CLAIMS_FIGURE, caption="../report/summary_claims.rst", category="Summaries"),
    log:
        f"{LOGS}/instruct/claims_table.log",
    params:
        human=f"--human {HUMAN_CLAIMS}" if HUMAN_CLAIMS else "",
        title=f"{config['run_name']}: claims of the instruct models' summaries",
    conda:
        "../envs/base.yaml"
    shell:
        "python -m workflow_scripts.claims table --claims {input.claims} {params.human} --table {output.table} "
        "--figure {output.figure} --title {params.title:q} 2> {log}"


rule instruct_examples:
    input:
        articles=ARTICLES,
        questions=QUESTIONS,
        model=lambda wc: model_dir(wc.model),
    output:
        jsonl=f"{INSTRUCT_DIR}/examples/{{model}}.jsonl",
        html=report(f"{INSTRUCT_DIR}/examples/{{model}}.html", caption="../report/instruct_examples.rst",
                    category="Instruction following", subcategory="{model}"),
    log:
        f"{LOGS}/instruct/examples/{{model}}.log",
    params:
        cfg=engine_json(INSTRUCT["summaries"]["engine"], "summaries", "examples"),
    threads: INSTRUCT["summaries"]["threads"]
    resources:
        gpu=INSTRUCT_RES["gpu"],
        mem_mb=INSTRUCT_RES["mem_mb"],
        runtime=INSTRUCT_RES["runtime"],
    conda:
        "../envs/eval.yaml"
    shell:
        "OMP_NUM_THREADS={threads} python -m workflow_scripts.summaries examples --model-id {wildcards.model} "
        "--model-path {input.model:q} --articles {input.articles} --questions {input.questions} "
        "--output-jsonl {output.jsonl} --output-html {output.html} --config-json {params.cfg:q} 2> {log}"


if INSTRUCT["enabled"]:
    ALL_TARGETS.extend([CLAIMS_TABLE, CLAIMS_FIGURE]
                       + [f"{INSTRUCT_DIR}/examples/{m}.html" for m in instruct_models()])
