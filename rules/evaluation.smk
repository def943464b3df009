# Stages 7-8: closed-book QA of every model (base, Raw CPT, each method x budget, API references), the optional
# open-book (RAG) baseline, and the accuracy table. Logic: workflow_scripts/qa_eval.py, rag.py, aggregate.py;
# docs/evaluation.md.
EVAL = config["evaluation"]
EVAL_RES = EVAL["resources"]
QA_DIR = "results/eval/qa"
RAG_DIR = "results/eval/rag"
# vLLM cannot share an environment with the CPU pins (envs/eval.yaml explains): CoT on vllm uses its env.
EVAL_ENV = ("../envs/synthesis-vllm.yaml" if "cot" in EVAL["modes"] and EVAL["cot"]["engine"] == "vllm"
            else "../envs/eval.yaml")


def eval_models():
    """Model ids of closed-book QA: the base model, Raw CPT, every method x budget, then the API references."""
    return (["base"] + [model_id(m, b) for m, b in cpt_models()]
            + [f"api-{a['name']}" for a in EVAL["api_models"]])


def rag_models():
    """Model ids of the RAG baseline (evaluation.rag.models; default: base and the largest budget of the first
    synthesis method, or Raw CPT when no method is configured)."""
    if EVAL["rag"]["models"] is not None:
        return list(EVAL["rag"]["models"])
    methods, bs = synth_methods(), budgets()
    return ["base", model_id(methods[0], max(bs)) if methods and bs else "raw-all"]


def eval_model_input(wildcards):
    """The model folder an evaluation reads: none for API models or hub ids."""
    mid = wildcards.model
    if mid.startswith("api-"):
        return []
    if mid == "base":
        return model_input("base")
    return [model_dir(mid)]


def eval_model_path(wildcards):
    return "" if wildcards.model.startswith("api-") else model_dir(wildcards.model)


def eval_params(wildcards, rag=False):
    """--config-json of one evaluation: the evaluation keys that change its numbers (not resources; rag only for
    RAG jobs), plus the backend settings when the model is sampled (cot)."""
    ev = {k: v for k, v in EVAL.items() if k not in ("resources", "rag")}
    if rag:
        ev["rag"] = EVAL["rag"]
    api = next((a for a in EVAL["api_models"] if f"api-{a['name']}" == wildcards.model), None)
    if api is not None:
        ev["api_models"] = [api]
        modes, engine = api["modes"], api["engine"]
    else:
        ev["api_models"] = []
        modes = (EVAL["rag"]["modes"] or EVAL["modes"]) if rag else EVAL["modes"]
        engine = EVAL["cot"]["engine"]
    cfg = {"seed": config["seed"], "evaluation": ev}
    if "cot" in modes:
        cfg["backends"] = {engine: config["backends"].get(engine) or {}}
    return json.dumps(cfg, sort_keys=True)


rule eval_qa:
    input:
        questions=QUESTIONS,
        articles=ARTICLES,
        model=eval_model_input,
    output:
        jsonl=f"{QA_DIR}/{{model}}.jsonl",
        json=f"{QA_DIR}/{{model}}.json",
    log:
        f"{LOGS}/evaluation/eval_qa/{{model}}.log",
    benchmark:
        "results/benchmarks/evaluation/eval_qa/{model}.tsv"
    params:
        cfg=eval_params,
        model_path=eval_model_path,
    threads: EVAL["threads"]
    resources:
        gpu=EVAL_RES["gpu"],
        mem_mb=EVAL_RES["mem_mb"],
        runtime=EVAL_RES["runtime"],
    conda:
        EVAL_ENV
    shell:
        "python -m workflow_scripts.qa_eval --model-id {wildcards.model} --model-path {params.model_path:q} "
        "--questions {input.questions} --articles {input.articles} --output-jsonl {output.jsonl} "
        "--output-json {output.json} --threads {threads} --config-json {params.cfg:q} 2> {log}"


rule eval_rag:
    input:
        questions=QUESTIONS,
        articles=ARTICLES,
        model=eval_model_input,
    output:
        jsonl=f"{RAG_DIR}/{{model}}.jsonl",
        json=f"{RAG_DIR}/{{model}}.json",
    log:
        f"{LOGS}/evaluation/eval_rag/{{model}}.log",
    benchmark:
        "results/benchmarks/evaluation/eval_rag/{model}.tsv"
    params:
        cfg=lambda wildcards: eval_params(wildcards, rag=True),
        model_path=eval_model_path,
    threads: EVAL["threads"]
    resources:
        gpu=EVAL_RES["gpu"],
        mem_mb=EVAL_RES["mem_mb"],
        runtime=EVAL_RES["runtime"],
    conda:
        EVAL_ENV
    shell:
        "python -m workflow_scripts.rag --model-id {wildcards.model} --model-path {params.model_path:q} "
        "--questions {input.questions} --articles {input.articles} --output-jsonl {output.jsonl} "
        "--output-json {output.json} --threads {threads} --config-json {params.cfg:q} 2> {log}"


rule aggregate:
    input:
        summaries=expand(f"{QA_DIR}/{{model}}.json", model=eval_models()),
    output:
        report("results/tables/qa_accuracy.csv", caption="../report/qa_accuracy.rst", category="QA accuracy"),
    log:
        f"{LOGS}/evaluation/aggregate.log",
    conda:
        "../envs/eval.yaml"
    shell:
        "python -m workflow_scripts.aggregate qa --summaries {input.summaries} --models-dir results/models "
        "--output {output} 2> {log}"


rule aggregate_rag:
    input:
        summaries=expand(f"{RAG_DIR}/{{model}}.json", model=rag_models()),
    output:
        report("results/tables/rag_accuracy.csv", caption="../report/rag_accuracy.rst", category="QA accuracy"),
    log:
        f"{LOGS}/evaluation/aggregate_rag.log",
    conda:
        "../envs/eval.yaml"
    shell:
        "python -m workflow_scripts.aggregate rag --summaries {input.summaries} --models-dir results/models "
        "--output {output} 2> {log}"


ALL_TARGETS.extend([*rules.aggregate.output, *(rules.aggregate_rag.output if EVAL["rag"]["enabled"] else [])])
