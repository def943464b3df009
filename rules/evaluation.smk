# Stages 7-8: closed-book QA of every model (base, Raw CPT, each method x budget, API references), the optional
# open-book (RAG) baseline, and the accuracy table. Logic: workflow_scripts/qa_eval.py, rag.py, aggregate.py;
# docs/evaluation.md.
# Input and params functions of these rules: rules/common.smk.


rule eval_qa:
    input:
        questions=QUESTIONS,
        articles=ARTICLES,
        model=eval_model_input,
        prefix=eval_prefix_input(),
    output:
        jsonl=f"{QA_DIR}/{{model}}.jsonl",
        json=f"{QA_DIR}/{{model}}.json",
    log:
        f"{LOGS}/evaluation/eval_qa/{{model}}.log",
    benchmark:
        layout.benchmark("evaluation", "eval_qa/{model}")
    conda:
        EVAL_ENV
    threads: EVAL["threads"]
    resources:
        gpu=EVAL_RES["gpu"],
        mem_mb=EVAL_RES["mem_mb"],
        runtime=EVAL_RES["runtime"],
    params:
        guard=gpu_guard("eval_qa"),
        cfg=job_config("eval_qa", "model"),
        ops=job_ops("eval_qa", "model"),
        model_path=eval_model_path,
    shell:
        "{params.guard}python -m workflow_scripts.qa_eval --model-id {wildcards.model} --model-path {params.model_path:q} "
        "--questions {input.questions} --articles {input.articles} --output-jsonl {output.jsonl} "
        "--output-json {output.json} --threads {threads} --config-json {params.cfg:q} --ops-json {params.ops:q} 2> {log}"


rule eval_rag:
    input:
        questions=QUESTIONS,
        articles=ARTICLES,
        model=eval_model_input,
        prefix=eval_prefix_input(),
    output:
        jsonl=f"{RAG_DIR}/{{model}}.jsonl",
        json=f"{RAG_DIR}/{{model}}.json",
    log:
        f"{LOGS}/evaluation/eval_rag/{{model}}.log",
    benchmark:
        layout.benchmark("evaluation", "eval_rag/{model}")
    conda:
        EVAL_ENV
    threads: EVAL["threads"]
    resources:
        gpu=EVAL_RES["gpu"],
        mem_mb=EVAL_RES["mem_mb"],
        runtime=EVAL_RES["runtime"],
    params:
        guard=gpu_guard("eval_rag"),
        cfg=job_config("eval_rag", "model"),
        ops=job_ops("eval_rag", "model"),
        model_path=eval_model_path,
    shell:
        "{params.guard}python -m workflow_scripts.rag --model-id {wildcards.model} --model-path {params.model_path:q} "
        "--questions {input.questions} --articles {input.articles} --output-jsonl {output.jsonl} "
        "--output-json {output.json} --threads {threads} --config-json {params.cfg:q} --ops-json {params.ops:q} 2> {log}"


rule aggregate:
    input:
        summaries=expand(f"{QA_DIR}/{{model}}.json", model=eval_models()),
        # the train summaries (tokens trained on) that --models-dir points to
        models=cpt_dirs(eval_models()),
    output:
        table=report(layout.QA_TABLE, caption="../report/qa_accuracy.rst", category="QA accuracy"),
        headline=report(layout.QA_HEADLINE, caption="../report/qa_headline.rst", category="QA accuracy"),
    log:
        f"{LOGS}/evaluation/aggregate.log",
    localrule: True
    conda:
        "../envs/eval.yaml"
    params:
        split=EVAL["report"]["split"],  # which accuracy the headline rows hold (evaluation.report)
        convention=EVAL["report"]["convention"],
        models_dir=lambda wc, input: layout.MODELS,  # where the train summaries (input.models) live
    shell:
        "python -m workflow_scripts.aggregate qa --summaries {input.summaries} --models-dir {params.models_dir} "
        "--output {output.table} --headline {output.headline} --report-split {params.split} "
        "--report-convention {params.convention} 2> {log}"


rule aggregate_rag:
    input:
        summaries=expand(f"{RAG_DIR}/{{model}}.json", model=rag_models()),
        models=cpt_dirs(rag_models()),
    output:
        report(layout.RAG_TABLE, caption="../report/rag_accuracy.rst", category="QA accuracy"),
    log:
        f"{LOGS}/evaluation/aggregate_rag.log",
    localrule: True
    conda:
        "../envs/eval.yaml"
    params:
        split=EVAL["report"]["split"],  # which accuracy the headline rows hold (evaluation.report)
        convention=EVAL["report"]["convention"],
        models_dir=lambda wc, input: layout.MODELS,  # where the train summaries (input.models) live
    shell:
        "python -m workflow_scripts.aggregate rag --summaries {input.summaries} --models-dir {params.models_dir} "
        "--output {output} --report-split {params.split} --report-convention {params.convention} 2> {log}"


ALL_TARGETS.extend(layout.stage_targets(config, "evaluation"))
