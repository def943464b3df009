"""The planner (issue 7): its figures for a small config equal a hand calculation; the paper's configuration
lands on the order of the 60K USD the authors reported; prepared data are used only when they match."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from workflow_scripts import plan as P
from workflow_scripts.config import load_config, validate_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fixed_system_prompts(monkeypatch):
    """Every system prompt counts 60 tokens (+ 40 of chat template and headers = 100), for hand calculation."""
    monkeypatch.setattr(P, "system_tokens", lambda cfg, template: 60.0)


def small_config(**synthesis) -> dict:
    """Two assumed articles of 1,000 tokens, E = 4, an API generator and a vLLM evaluation: small enough to
    price by hand."""
    cfg = {
        "run_name": "hand",
        "data": {"quality": {"url": "resources/quality/QuALITY.v1.0.1.zip"}},
        "models": {"base": {"source": "hf", "name": "org/tiny"}, "generator": {"source": "hf", "name": "gpt-4-turbo"}},
        "synthesis": {"methods": ["entigraph", "rephrase"], "backend": "openai",
                      "entigraph": {"max_new_tokens": 50, "extraction_max_new_tokens": 50, "max_triples": 2},
                      "rephrase": {"styles": ["easy", "medium", "hard"], "repeats": 2, "max_new_tokens": 80},
                      **synthesis},
        "cpt": {"budgets": [1000, 2000], "epochs": 2, "raw_epochs": 4},
        "evaluation": {"modes": ["cot"], "cot": {"n": 4, "max_new_tokens": 100, "engine": "vllm"},
                       "prompt_prefix": "no-such-file.txt"},
        "planner": {
            "peak_flops": 1e15, "utilisation": 0.5,
            "model_params": {"org/tiny": 1e8},
            "throughputs": {"evaluation": {"vllm": {"prefill_tokens_per_s": 1000, "decode_tokens_per_s": 100}}},
            "assume": {"articles": 2, "tokens_per_article": 1000, "entities_per_article": 4, "tokens_per_entity": 5,
                       "prompt_overhead_tokens": 40, "questions": 10, "qa_fewshot_tokens": 500,
                       "qa_question_tokens": 100},
        },
    }
    return validate_config(cfg)


def by_item(plan: P.Plan) -> dict[str, P.Line]:
    return {x.item: x for x in plan.lines}


def test_small_config_equals_hand_calculation(tmp_path, fixed_system_prompts):
    plan = P.make_plan(small_config(), root=tmp_path)  # tmp_path: nothing prepared, so planner.assume is used
    lines = by_item(plan)
    assert plan.sources["articles"].startswith("planner.assume: 2 articles x 1,000 tokens")

    # entity extraction: 1 request per article, prompt = 60 system + 40 overhead + 1000 article, 50 new tokens
    ent = lines["entigraph: entities + summary"]
    assert (ent.requests, ent.prompt_tokens, ent.completion_tokens) == (2, 2 * 1100, 2 * 50)
    # pairs: C(4,2) = 6 per article; prompt = 1100 + 2 entities x 5 tokens
    pairs = lines["entigraph: relations, entity pairs"]
    assert (pairs.requests, pairs.prompt_tokens, pairs.completion_tokens) == (12, 12 * 1110, 12 * 50)
    # triples: min(C(4,3) = 4, max_triples 2) = 2 per article
    tri = lines["entigraph: relations, entity triples"]
    assert (tri.requests, tri.prompt_tokens, tri.completion_tokens) == (4, 4 * 1115, 4 * 50)
    # rephrase: 3 styles x 2 repeats per article
    reph = lines["rephrase: rewrites"]
    assert (reph.requests, reph.prompt_tokens, reph.completion_tokens) == (12, 12 * 1100, 12 * 80)

    # gpt-4-turbo bills every prompt token at $10/M and completions at $30/M (no cached-input price)
    assert all(x.cached_prompt_tokens == 0 for x in (ent, pairs, tri, reph))
    prompt = 2200 + 13320 + 4460 + 13200
    completion = 100 + 600 + 200 + 960
    assert plan.total("usd", "synthesis") == pytest.approx(prompt * 10 / 1e6 + completion * 30 / 1e6)
    assert plan.total("usd", "synthesis") == pytest.approx(0.3876)

    # CPT: raw 2,000 tokens x 4 epochs, then each method x budget x 2 epochs; 6 x 1e8 FLOPs per token
    cpt = [x for x in plan.lines if x.stage == "cpt"]
    assert [x.item for x in cpt] == ["raw-all", "entigraph-1000", "entigraph-2000", "rephrase-1000",
                                     "rephrase-2000"]
    train = 8000 + 2 * (2000 + 4000)
    assert plan.total("train_tokens", "cpt") == train
    assert plan.total("gpu_hours", "cpt") == pytest.approx(train * 6 * 1e8 / (1e15 * 0.5) / 3600)

    # evaluation: 6 models (base + 5 CPT) x 10 questions; prompt = 500 few-shot + 100 question; the few-shot
    # prefix is computed once per model; 4 samples x 100 tokens per question
    (ev,) = [x for x in plan.lines if x.stage == "evaluation"]
    assert (ev.requests, ev.prompt_tokens, ev.cached_prompt_tokens, ev.completion_tokens) == \
        (60, 6 * 10 * 600, 6 * 9 * 500, 6 * 10 * 4 * 100)
    assert ev.gpu_hours == pytest.approx(((36000 - 27000) / 1000 + 24000 / 100) / 3600)


def test_local_engine_prices_uncached_prompt_and_completion(tmp_path, fixed_system_prompts):
    cfg = small_config(backend="vllm")
    cfg["planner"]["throughputs"]["synthesis"]["vllm"] = {"prefill_tokens_per_s": 2000, "decode_tokens_per_s": 50}
    plan = P.make_plan(cfg, root=tmp_path)
    pairs = by_item(plan)["entigraph: relations, entity pairs"]
    # each article's 1,100-token prefix is computed once; the 10 entity tokens of each request are not cached
    assert pairs.cached_prompt_tokens == 12 * 1110 - (2 * 1100 + 12 * 10)
    assert pairs.gpu_hours == pytest.approx(((2 * 1100 + 12 * 10) / 2000 + 600 / 50) / 3600)
    reph = by_item(plan)["rephrase: rewrites"]
    assert reph.cached_prompt_tokens == 3 * 2 * 1100  # the second repeat of each style and article is cached
    cfg["planner"]["prefix_caching"] = False
    nocache = by_item(P.make_plan(cfg, root=tmp_path))["entigraph: relations, entity pairs"]
    assert nocache.gpu_hours == pytest.approx((12 * 1110 / 2000 + 600 / 50) / 3600)
    # job start-up: one extraction + one job per method for each shard of synthesis.articles_per_job articles,
    # 60 s on 1 GPU each: the 2 articles fit one shard at the default 32 (3 jobs); one article per job makes 6
    assert not [k for k in by_item(plan) if k.startswith("job start-up")]  # synthesis.resources.gpu = 0
    cfg["synthesis"]["resources"]["gpu"] = 1
    assert by_item(P.make_plan(cfg, root=tmp_path))["job start-up x 3 jobs"].gpu_hours == pytest.approx(3 * 60 / 3600)
    cfg["synthesis"]["articles_per_job"] = 1
    assert by_item(P.make_plan(cfg, root=tmp_path))["job start-up x 6 jobs"].gpu_hours == pytest.approx(6 * 60 / 3600)


def test_tuple_counts_and_model_sizes():
    assert P.n_tuples(25, 2, None) == 300 and P.n_tuples(25, 3, None) == 2300
    assert P.n_tuples(25, 3, 1000) == 1000 and P.n_tuples(2, 3, None) == 0
    assert P.model_params("meta-llama/Meta-Llama-3-8B", {}) == (8e9, "model name")
    assert P.model_params("Qwen/Qwen2.5-0.5B", {})[0] == 0.5e9
    assert P.model_params("HuggingFaceTB/SmolLM2-135M-Instruct", {})[0] == 135e6
    assert P.model_params("x/y", {"x/y": 3.0})[0] == 3.0
    with pytest.raises(P.InputError, match="planner.model_params"):
        P.model_params("org/mystery-model", {})


def write_prepared(root: Path, n_articles: int, chars: int, selection: dict, **stats) -> None:
    data = root / "results" / "data"
    data.mkdir(parents=True)
    with open(data / "articles.jsonl", "w") as f:
        for i in range(n_articles):
            f.write(json.dumps({"uid": f"a{i}", "text": "x" * chars, "n_chars": chars}) + "\n")
    with open(data / "questions.jsonl", "w") as f:
        for i in range(3 * n_articles):
            f.write(json.dumps({"qid": f"q{i}"}) + "\n")
    (data / "prepare_stats.json").write_text(json.dumps(
        {"source": "quality", "articles": stats.get("articles", n_articles), "selected_articles": n_articles,
         "selection": selection, **stats}))


def test_prepared_articles_are_used_only_when_they_match_the_config(tmp_path):
    # a demo-like preparation: 3 articles cut to 2,500 characters
    write_prepared(tmp_path, 3, 2500, {"max_article_chars": 2500, "truncated_articles": 3}, articles=15)
    demo_like = small_config()
    demo_like["data"].update(max_articles=3, max_article_chars=2500)
    tokens, src = P.article_tokens(demo_like, tmp_path)
    assert tokens == [625.0] * 3 and "articles.jsonl (3 articles" in src
    assert P.question_count(demo_like, tmp_path, True, 3) == (9, "results/data/questions.jsonl")
    # the paper's selection (all articles, no truncation) must not be priced from the demo's three snippets
    paper_like = small_config()
    tokens, src = P.article_tokens(paper_like, tmp_path)
    assert tokens == [1000.0, 1000.0] and "max_article_chars=2500" in src
    # nor from a sample when the config names the official release (whose preparation checks 265 articles)
    official = small_config()
    official["data"].update(max_articles=3, max_article_chars=2500)
    official["data"]["quality"]["url"] = "https://github.com/nyu-mll/quality/raw/main/data/v1.0.1/QuALITY.v1.0.1.zip"
    assert "not it" in P.article_tokens(official, tmp_path)[1]
    # an explicit --articles file is taken as given
    tokens, _ = P.article_tokens(paper_like, tmp_path, str(tmp_path / "results/data/articles.jsonl"))
    assert len(tokens) == 3


def test_synthesis_prices_take_precedence_and_system_prompts_are_measured(tmp_path, fixed_system_prompts):
    cfg = small_config(prices={"input_per_mtok": 1.0, "output_per_mtok": 2.0})
    plan = P.make_plan(cfg, root=tmp_path)
    assert plan.total("usd", "synthesis") == pytest.approx((2200 + 13320 + 4460 + 13200) / 1e6 + 1860 * 2 / 1e6)
    assert "synthesis.prices" in plan.sources["generator"]


def test_system_prompt_tokens_come_from_the_template_files():
    cfg = small_config()
    text = (ROOT / "workflow_scripts" / "prompts" / "entigraph_pair.txt").read_text(encoding="utf-8")
    assert P.system_tokens(cfg, "entigraph_pair") == pytest.approx(len(text.rstrip("\n")) / 4.0)
    assert P.system_tokens(cfg, "no_such_template") == 300  # planner.assume.system_prompt_tokens


def test_measured_entity_lists_replace_the_assumption(tmp_path):
    write_prepared(tmp_path, 2, 4000, {})
    ents = tmp_path / P.ENTITIES
    ents.mkdir(parents=True)
    (ents / "a0.json").write_text(json.dumps({"status": "ok", "summary": "s", "entities": ["x", "y", "z"]}))
    plan = P.make_plan(small_config(), root=tmp_path)
    pairs = by_item(plan)["entigraph: relations, entity pairs"]
    assert pairs.requests == math.comb(3, 2) + math.comb(4, 2)  # a0 measured (3), a1 assumed (4)
    assert "1 entity files" in plan.sources["entities"]


PAPER = ROOT / "experiments" / "paper.yaml"
PAPER_API = ROOT / "experiments" / "paper-api.yaml"


def test_paper_config_api_cost_is_the_reported_order_of_magnitude():
    """The authors reported about 60K USD, dominated by input tokens. With gpt-4-turbo as generator
    (experiments/paper-api.yaml) the planner computes, from the assumed article lengths and entity counts, a bill
    of that order for the paper's all-pairs + triples volume."""
    cfg = load_config(P.config_files([PAPER, PAPER_API]))
    plan = P.make_plan(cfg, root=Path("/nonexistent"))  # nothing prepared: planner.assume
    eg = [x for x in plan.lines if x.stage == "synthesis" and x.item.startswith("entigraph")]
    assert all(x.engine == "openai" for x in eg)
    usd = sum(x.usd for x in eg)
    assert 20_000 < usd < 120_000, usd
    prompt = sum(x.prompt_tokens for x in eg)
    assert prompt * 10 / 1e6 > 0.6 * usd  # dominated by input: every relation call resends the article
    # the corpus it writes is the paper's size (the assumed mean completion is derived from it)
    assert 400e6 < sum(x.completion_tokens for x in eg) < 520e6
    # the open generator on vLLM: no USD, GPU-hours, and prefix caching avoids nearly all prompt tokens
    local = P.make_plan(load_config(P.config_files([PAPER])), root=Path("/nonexistent"))
    syn = [x for x in local.lines if x.stage == "synthesis"]
    assert all(x.usd is None and x.gpu_hours > 0 for x in syn)
    assert local.total("cached_prompt_tokens", "synthesis") > 0.95 * local.total("prompt_tokens", "synthesis")
    # 37 EntiGraph budgets + 11 Rephrase budgets (cpt.method_budgets: its corpus is ~38M tokens) + Raw CPT, and
    # every model (those 49 + the base model) is evaluated with 64 CoT samples
    assert len([x for x in local.lines if x.stage == "cpt" and x.engine == "train"]) == 37 + 11 + 1
    (qa,) = [x for x in local.lines if x.item == "QA cot: 50 local models"]
    assert qa.completion_tokens == 50 * 4609 * 64 * 300


def test_cli_prints_the_paper_plan(capsys):
    assert P.main(["--configfile", str(ROOT / "experiments" / "paper.yaml")]) == 0
    out = capsys.readouterr().out
    assert "TOTAL" in out and "Prefix caching avoids" in out and "meta-llama/Meta-Llama-3-8B" in out
    assert P.main(["--configfile", str(ROOT / "experiments" / "paper.yaml"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["all"]["gpu_hours"] > 0 and data["totals"]["cpt"]["train_tokens"] > 1e9


def test_cli_reports_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("planner: {utilisation: 2}\n")
    assert P.main(["--configfile", str(bad)]) == 2
    assert "planner.utilisation" in capsys.readouterr().err
