# After CPT (paper section 4.3): instruction tuning of trained models ({model}-instruct in
# results/models/{model}/instruct), their summaries with the paper's Table 5 prompts, claim-based scoring by a judge
# LLM, the claims table and figure, and a qualitative report per model. Off in the demo (instruct.enabled: false);
# experiments/cpu-instruct.yaml runs it on CPU. Logic: workflow_scripts/instruct.py, summaries.py, claims.py,
# claims_report.py; docs/instruct.md.
# Input and params functions of these rules: rules/common.smk ("instruction stages").


rule instruct_corpus:
    input:
        model=model_input("base"),
        data=INSTRUCT_DATA_INPUT,
    output:
        tokens=f"{layout.INSTRUCT_CORPUS}/tokens.npy",
        manifest=f"{layout.INSTRUCT_CORPUS}/manifest.json",
        chat=f"{layout.INSTRUCT_CORPUS}/chat.jsonl",
    log:
        f"{LOGS}/instruct/corpus.log",
    conda:
        "../envs/train.yaml"
    threads: 1
    params:
        cfg=job_config("instruct_corpus"),
        ops=job_ops("instruct_corpus"),
        model=lambda wc: model_location("base"),
        outdir=lambda wc, output: os.path.dirname(output.tokens),
    shell:
        "python -m workflow_scripts.instruct corpus --model {params.model:q} --outdir {params.outdir} "
        "--config-json {params.cfg:q} --ops-json {params.ops:q} 2> {log}"


rule instruct_tune:
    input:
        tokens=rules.instruct_corpus.output.tokens,
        manifest=rules.instruct_corpus.output.manifest,
        model=instruct_start_input,
    output:
        directory(f"{layout.MODELS}/{{model}}/instruct"),
    log:
        f"{LOGS}/instruct/tune/{{model}}.log",
    benchmark:
        layout.benchmark("instruct", "tune/{model}")
    conda:
        "../envs/train.yaml"
    threads: training_threads(INSTRUCT["resources"])
    resources:
        gpu=INSTRUCT["resources"]["gpu"],
        mem_mb=INSTRUCT["resources"]["mem_mb"],
        runtime=INSTRUCT["resources"]["runtime"],
    params:
        guard=gpu_guard("instruct_tune"),
        cfg=job_config("instruct_tune"),
        ops=job_ops("instruct_tune"),
        corpus=lambda wc, input: os.path.dirname(input.tokens),
        init_model=lambda wc: model_location("base") if wc.model == "base" else model_dir(wc.model),
        workdir=lambda wc: layout.instruct_checkpoints(wc.model),
        launch=training_launch(INSTRUCT["resources"]),
        omp=lambda wc, resources: config["cpt"]["threads"],  # operational, untracked (job_ops)
    shell:
        "OMP_NUM_THREADS={params.omp} {params.guard}{params.launch} -m workflow_scripts.instruct tune --corpus {params.corpus} "
        "--init-model {params.init_model:q} --output {output} --workdir {params.workdir} --config-json {params.cfg:q} "
        "--ops-json {params.ops:q} 2> {log}"


rule summarize:
    input:
        articles=ARTICLES,
        prompts=expand(
            f"{WORKFLOW_ROOT}/workflow_scripts/prompts/summary_{{kind}}.txt", kind=INSTRUCT["summaries"]["prompts"]
        ),
        model=lambda wc: model_dir(wc.model),
    output:
        f"{layout.SUMMARIES_DIR}/{{model}}.jsonl",
    log:
        f"{LOGS}/instruct/summarize/{{model}}.log",
    conda:
        SUMMARY_ENV
    threads: INSTRUCT["summaries"]["threads"]
    resources:
        gpu=INSTRUCT_RES["gpu"],
        mem_mb=INSTRUCT_RES["mem_mb"],
        runtime=INSTRUCT_RES["runtime"],
    params:
        guard=gpu_guard("summarize"),
        cfg=job_config("summarize"),
        ops=job_ops("summarize"),
    shell:
        "OMP_NUM_THREADS={threads} {params.guard}python -m workflow_scripts.summaries summarize --model-id {wildcards.model} "
        "--model-path {input.model:q} --articles {input.articles} --output {output} "
        "--config-json {params.cfg:q} --ops-json {params.ops:q} 2> {log}"


rule judge_summaries:
    input:
        summaries=f"{layout.SUMMARIES_DIR}/{{model}}.jsonl",
        articles=ARTICLES,
        prompts=JUDGE_PROMPTS,
        judge=judge_model_input(),
    output:
        jsonl=f"{layout.CLAIMS_DIR}/{{model}}.jsonl",
        json=f"{layout.CLAIMS_DIR}/{{model}}.json",
    log:
        f"{LOGS}/instruct/judge/{{model}}.log",
    conda:
        JUDGE_ENV
    threads: INSTRUCT["summaries"]["threads"]
    resources:
        gpu=JUDGE_GPU,
        mem_mb=INSTRUCT_RES["mem_mb"],
        runtime=INSTRUCT_RES["runtime"],
    params:
        guard=gpu_guard("judge_summaries"),
        cfg=job_config("judge_summaries"),
        ops=job_ops("judge_summaries"),
    shell:
        "OMP_NUM_THREADS={threads} {params.guard}python -m workflow_scripts.claims judge --summaries {input.summaries} "
        "--articles {input.articles} --output-jsonl {output.jsonl} --output-json {output.json} "
        "--config-json {params.cfg:q} --ops-json {params.ops:q} 2> {log}"


rule judge_human_summaries:
    input:
        human=INSTRUCT["judge"]["human_summaries"] or [],
        articles=ARTICLES,
        prompts=JUDGE_PROMPTS,
        judge=judge_model_input(),
    output:
        jsonl=f"{layout.HUMAN_DIR}/claims.jsonl",
        json=f"{layout.HUMAN_DIR}/claims.json",
    log:
        f"{LOGS}/instruct/judge/human.log",
    conda:
        JUDGE_ENV
    threads: INSTRUCT["summaries"]["threads"]
    resources:
        gpu=JUDGE_GPU,
        mem_mb=INSTRUCT_RES["mem_mb"],
        runtime=INSTRUCT_RES["runtime"],
    params:
        guard=gpu_guard("judge_human_summaries"),
        cfg=job_config("judge_human_summaries"),
        ops=job_ops("judge_human_summaries"),
    shell:
        "OMP_NUM_THREADS={threads} {params.guard}python -m workflow_scripts.claims judge --human {input.human} "
        "--articles {input.articles} --output-jsonl {output.jsonl} --output-json {output.json} "
        "--config-json {params.cfg:q} --ops-json {params.ops:q} 2> {log}"


rule claims_table:
    input:
        claims=expand(f"{layout.CLAIMS_DIR}/{{model}}.json", model=instruct_models()),
        claims_jsonl=expand(f"{layout.CLAIMS_DIR}/{{model}}.jsonl", model=instruct_models()),
        human=[HUMAN_CLAIMS] if HUMAN_CLAIMS else [],
    output:
        table=report(layout.CLAIMS_TABLE, caption="../report/summary_claims.rst", category="Summaries"),
        figure=report(layout.CLAIMS_FIGURE, caption="../report/summary_claims.rst", category="Summaries"),
    log:
        f"{LOGS}/instruct/claims_table.log",
    localrule: True
    conda:
        "../envs/base.yaml"
    params:
        human=f"--human {HUMAN_CLAIMS}" if HUMAN_CLAIMS else "",
        title=f"{config['run_name']}: claims of the instruct models' summaries",
    shell:
        "python -m workflow_scripts.claims_report --claims {input.claims} {params.human} --table {output.table} "
        "--figure {output.figure} --title {params.title:q} 2> {log}"


rule instruct_examples:
    input:
        articles=ARTICLES,
        questions=QUESTIONS,
        model=lambda wc: model_dir(wc.model),
    output:
        jsonl=f"{layout.EXAMPLES_DIR}/{{model}}.jsonl",
        html=report(
            f"{layout.EXAMPLES_DIR}/{{model}}.html",
            caption="../report/instruct_examples.rst",
            category="Instruction following",
            subcategory="{model}",
        ),
    log:
        f"{LOGS}/instruct/examples/{{model}}.log",
    conda:
        SUMMARY_ENV
    threads: INSTRUCT["summaries"]["threads"]
    resources:
        gpu=INSTRUCT_RES["gpu"],
        mem_mb=INSTRUCT_RES["mem_mb"],
        runtime=INSTRUCT_RES["runtime"],
    params:
        guard=gpu_guard("instruct_examples"),
        cfg=job_config("instruct_examples"),
        ops=job_ops("instruct_examples"),
    shell:
        "OMP_NUM_THREADS={threads} {params.guard}python -m workflow_scripts.summaries examples --model-id {wildcards.model} "
        "--model-path {input.model:q} --articles {input.articles} --questions {input.questions} "
        "--output-jsonl {output.jsonl} --output-html {output.html} --config-json {params.cfg:q} "
        "--ops-json {params.ops:q} 2> {log}"


ALL_TARGETS.extend(layout.stage_targets(config, "instruct"))
