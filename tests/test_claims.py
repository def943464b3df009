"""Issue 15: claim parsing, judge-answer parsing (well-formed and malformed), counting, normalisation against known
values, the judge's three-step orchestration, the claims table and figure, and the instruction-data helpers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from workflow_scripts import claims, claims_report, instruct, layout, summaries
from workflow_scripts.backends import Completion
from workflow_scripts.config import load_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------- claim lists
def test_parse_claims_reads_every_list_style_and_ignores_prose():
    text = ("Here are the claims:\n- Korvin is a prisoner of the Tr'en.\n* The Tr'en are efficient.\n"
            "• Korvin escapes.\n4. He reports to Earth.\n5) The story is from 1972.\nThat is all.")
    got, status = claims.parse_claims(text)
    assert status == "ok"
    assert got == ["Korvin is a prisoner of the Tr'en.", "The Tr'en are efficient.", "Korvin escapes.",
                   "He reports to Earth.", "The story is from 1972."]


def test_parse_claims_drops_duplicates_case_insensitively():
    got, status = claims.parse_claims("- A cat sat.\n- a cat sat.\n- A dog ran.")
    assert (got, status) == (["A cat sat.", "A dog ran."], "ok")


@pytest.mark.parametrize("text,status", [(None, "empty"), ("", "empty"), ("  \n ", "empty"),
                                          ("Korvin is a prisoner. He escapes.", "unparseable"),
                                          ("-no space after the dash", "unparseable"),
                                          ("2024 was a year", "unparseable")])
def test_parse_claims_malformed_answers_are_unparseable_not_guessed(text, status):
    assert claims.parse_claims(text) == ([], status)


# -------------------------------------------------------------------------------------------- verdicts
def test_parse_labels_well_formed_and_tolerant_forms():
    text = "1: TRUE\n2. false\nClaim 3 - True\n**4: FALSE**\n(5) TRUE"
    verdicts, problems = claims.parse_labels(text, 5, claims.TRUTH_LABELS)
    assert verdicts == {1: "TRUE", 2: "FALSE", 3: "TRUE", 4: "FALSE", 5: "TRUE"}
    assert problems == []


def test_parse_labels_malformed_answers_are_counted_never_filled_in():
    text = ("1: TRUE\n"
            "2: maybe\n"            # no allowed label
            "3: TRUE or FALSE\n"    # ambiguous
            "4: TRUE\n4: FALSE\n"   # conflicting
            "9: TRUE\n"             # out of range
            "I think the rest are fine.")
    verdicts, problems = claims.parse_labels(text, 5, claims.TRUTH_LABELS)
    assert verdicts == {1: "TRUE"}
    joined = " | ".join(problems)
    assert "claim 2: no label" in joined
    assert "claim 3: ambiguous label" in joined
    assert "claim 4: conflicting labels" in joined
    assert "claim number 9 out of range 1..5" in joined
    assert "no verdict for claim(s) 2, 3, 5" in joined


def test_parse_labels_empty_answer_has_no_verdicts():
    verdicts, problems = claims.parse_labels("", 3, claims.SALIENCE_LABELS)
    assert verdicts == {} and problems == ["no verdict for claim(s) 1, 2, 3"]


def test_parse_labels_repeated_identical_label_is_kept():
    assert claims.parse_labels("1: SALIENT\n1: salient", 1, claims.SALIENCE_LABELS) == ({1: "SALIENT"}, [])


def test_count_verdicts_known_values():
    truth = {1: "TRUE", 2: "FALSE", 3: "TRUE", 5: "TRUE"}     # claim 4: no verdict
    salience = {1: "SALIENT", 3: "COSMETIC"}                   # claim 5 true but not rated
    assert claims.count_verdicts(5, truth, salience) == {
        "claims": 5, "true": 3, "false": 1, "salient": 1, "cosmetic": 1, "truth_unparsed": 1,
        "salience_unparsed": 1}


# ------------------------------------------------------------------------------------------ normalisation
def _rec(uid, prompt, false, salient, status="ok", n=20):
    return {"article_uid": uid, "prompt": prompt, "split_status": status,
            "counts": None if status != "ok" else {"claims": n, "true": n - false, "false": false, "salient": salient,
                                                   "cosmetic": n - false - salient, "truth_unparsed": 0,
                                                   "salience_unparsed": 0}}


def test_per_article_counts_average_human_summaries_and_skip_unparseable():
    recs = [_rec("a", "human", 1, 4), _rec("a", "human", 3, 8), _rec("b", "human", 0, 6),
            _rec("b", "human", 0, 0, status="unparseable"), _rec("a", "short", 9, 9)]
    got = claims.per_article_counts(recs, "human")
    assert got == {"a": {"false": 2.0, "salient": 6.0, "claims": 20.0},
                   "b": {"false": 0.0, "salient": 6.0, "claims": 20.0}}


def test_relative_to_human_known_values():
    model = {"a": {"false": 2, "salient": 3}, "b": {"false": 1, "salient": 9}, "c": {"false": 5, "salient": 5}}
    human = {"a": {"false": 1, "salient": 6}, "b": {"false": 0, "salient": 6}}
    # articles a and b only: false (2+1)/(1+0) = 3.0; salient (3+9)/(6+6) = 1.0
    assert claims.relative_to_human(model, human) == {"articles": 2, "false_rel_human": 3.0, "salient_rel_human": 1.0}


def test_relative_to_human_zero_human_count_is_undefined():
    model = {"a": {"false": 2, "salient": 3}}
    human = {"a": {"false": 0, "salient": 4}}
    assert claims.relative_to_human(model, human) == {"articles": 1, "false_rel_human": None,
                                                      "salient_rel_human": 0.75}
    assert claims.relative_to_human(model, {})["false_rel_human"] is None


# --------------------------------------------------------------------------------- the judge's three steps
class ScriptedJudge:
    """Answers each step with a fixed text chosen from the request (the orchestration under test is ours: which
    requests are sent, and how answers map back to claims); the real engine runs in the CPU overlay."""

    def __init__(self, answers):
        self.answers, self.requests = answers, []

    def generate(self, requests):
        for r in requests:
            self.requests.append(r)
            summary_id, step = r.id.rsplit(":", 1)
            text = self.answers[(summary_id, step)]
            if text is None:
                yield Completion(id=r.id, texts=[], prompt_tokens=0, completion_tokens=0, finish_reasons=[],
                                 model="m", error="boom")
            else:
                yield Completion(id=r.id, texts=[text], prompt_tokens=1, completion_tokens=1, finish_reasons=["stop"],
                                 model="m")


def test_judge_records_maps_answers_back_and_counts_failures():
    cfg = load_config()
    jcfg = cfg["instruct"]["judge"]
    items = [{"id": "s1", "article_uid": "a", "prompt": "short", "summary": "Text one."},
             {"id": "s2", "article_uid": "a", "prompt": "long", "summary": "Text two."},
             {"id": "s3", "article_uid": "a", "prompt": "short", "summary": None},       # generation failed
             {"id": "s4", "article_uid": "a", "prompt": "short", "summary": "Text four."}]
    judge = ScriptedJudge({
        ("s1", "split"): "- C1\n- C2\n- C3",
        ("s1", "truth"): "1: TRUE\n2: FALSE\n3: TRUE",
        ("s1", "salience"): "1: COSMETIC\n2: SALIENT",   # numbers of the TRUE claims' list: claims 1 and 3
        ("s2", "split"): "The summary says things.",      # unparseable claim list
        ("s4", "split"): "- D1\n- D2",
        ("s4", "truth"): "1: TRUE",                       # claim 2 has no verdict
        ("s4", "salience"): None,                         # judge error
    })
    recs = {r["id"]: r for r in claims.judge_records(judge, items, {"a": "ARTICLE"}, jcfg, claims.judge_prompts())}
    assert recs["s1"]["counts"] == {"claims": 3, "true": 2, "false": 1, "salient": 1, "cosmetic": 1,
                                    "truth_unparsed": 0, "salience_unparsed": 0}
    assert [c["salience"] for c in recs["s1"]["claims"]] == ["COSMETIC", None, "SALIENT"]
    assert recs["s2"]["split_status"] == "unparseable" and recs["s2"]["counts"] is None
    assert recs["s3"]["split_status"] == "failed"
    assert recs["s4"]["counts"]["truth_unparsed"] == 1 and recs["s4"]["counts"]["salience_unparsed"] == 1
    assert any("judge error" in p for p in recs["s4"]["problems"])
    # The salience request of s1 lists only its true claims, after the article.
    sal = next(r for r in judge.requests if r.id == "s1:salience")
    assert sal.messages[1]["content"] == "### Article:\nARTICLE\n\n### Claims:\n1. C1\n2. C3"
    assert not any(r.id.startswith("s3:") for r in judge.requests)
    summary = claims.summarize_judged(list(recs.values()))
    assert summary["short"]["summaries"] == 3 and summary["short"]["summaries_failed"] == 1
    assert summary["short"]["summaries_scored"] == 2 and summary["short"]["false_mean"] == 0.5
    assert summary["long"]["summaries_unparseable"] == 1 and summary["long"]["false_mean"] is None


def test_prompt_version_changes_with_a_prompt():
    p = claims.judge_prompts()
    assert set(p) == {claims.SPLIT, claims.TRUTH, claims.SALIENCE}
    assert claims.prompt_version(p) != claims.prompt_version({**p, claims.TRUTH: p[claims.TRUTH] + " "})


# ---------------------------------------------------------------------------------------- table and figure
def test_table_and_figure_relative_to_human(tmp_path):
    model_recs = [_rec("a", "short", 2, 3), _rec("b", "short", 1, 9)]
    human_recs = [_rec("a", "human", 1, 6), _rec("b", "human", 0, 6)]
    paths = []
    for name, recs in (("entigraph-128-instruct", model_recs), ("base-instruct", [_rec("a", "short", 4, 1)])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        summ = {"model": name, "judge": "j", "prompt_version": "v", "by_prompt": claims.summarize_judged(recs)}
        (tmp_path / f"{name}.json").write_text(json.dumps(summ))
        paths.append(tmp_path / f"{name}.json")
    human = tmp_path / "human.jsonl"
    human.write_text("".join(json.dumps(r) + "\n" for r in human_recs))
    rows = claims_report.build_table(paths, human, tmp_path / "t.csv", tmp_path / "f.png")
    by = {r["model"]: r for r in rows}
    assert by["entigraph-128-instruct"]["false_rel_human"] == 3.0
    assert by["entigraph-128-instruct"]["salient_rel_human"] == 1.0
    assert (by["entigraph-128-instruct"]["method"], by["entigraph-128-instruct"]["budget"]) == ("entigraph", 128)
    assert by["base-instruct"]["false_rel_human"] == 4.0 and by["base-instruct"]["method"] == "base"
    with open(tmp_path / "t.csv") as f:
        table = list(csv.DictReader(f))
    assert {r["normalisation"] for r in table} == {"human"} and len(table) == 2
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------- ids, prompts, instruction data
@pytest.mark.parametrize("mid,expected", [("entigraph-384-instruct", ("entigraph-384", "entigraph", 384)),
                                          ("base-instruct", ("base", "base", None)),
                                          ("raw-all-instruct", ("raw-all", "raw", None)),
                                          ("my_method-1000-instruct", ("my_method-1000", "my_method", 1000)),
                                          ("entigraph-384", ("entigraph-384", "entigraph", 384))])
def test_instruct_ids_parse(mid, expected):
    assert instruct.parse_instruct_id(mid) == expected


def test_instruct_folder_is_what_common_smk_model_dir_gives():
    """The rules place an instruct model with layout.model_dir (rules/common.smk, from its id); layout.instruct_dir
    names it from the start model: the two agree, on the folder beside the start model's."""
    cfg = load_config()
    for start in ("base", "raw-all", "entigraph-384"):
        assert layout.model_dir(instruct.instruct_id(start), cfg) == layout.instruct_dir(start)
    assert layout.instruct_dir("entigraph-384") == "results/models/entigraph-384/instruct"


def test_summary_prompts_are_the_papers_table_5_verbatim():
    art = {"uid": "1", "title": "Defining Decay Down", "author": "Plotz, David"}
    assert summaries.summary_prompt("short", art) == "Summarize the article Defining Decay Down by David Plotz for me."
    assert summaries.summary_prompt("long", art) == ("Write an extremely long and detailed article regarding the book "
                                                     "Defining Decay Down by David Plotz.")


def test_example_prompts_cover_the_three_kinds():
    arts = [{"uid": "1", "title": "A", "author": "Doe, Jane"}, {"uid": "2", "title": "B", "author": "Roe, Richard"}]
    qs = [{"article_uid": "1", "question": "Why did the crew leave?"}]
    got = summaries.example_prompts(arts, qs)
    assert [g["kind"] for g in got] == ["explicit reference", "implicit reference", "cross-article"]
    assert "\"A\" by Jane Doe" in got[0]["prompt"]
    assert got[1]["prompt"] == "Why did the crew leave?"  # names no article
    assert "\"A\" by Jane Doe" in got[2]["prompt"] and "\"B\" by Richard Roe" in got[2]["prompt"]


def test_gutenberg_examples_are_attributed_and_answers_come_from_the_text():
    ex = instruct.gutenberg_examples()
    assert len(ex) > 100
    stories = json.loads((ROOT / "resources/instruct/gutenberg.json").read_text())["stories"]
    texts = {s["ebook"]: " ".join((ROOT / "resources/instruct" / s["path"]).read_text().split()) for s in stories}
    for e in ex:
        ebook = int(e["id"].split("-")[1])
        assert e["source"] == f"Project Gutenberg ebook #{ebook}"
        user, answer = e["messages"][0]["content"], e["messages"][1]["content"]
        if e["id"].endswith("continue"):
            assert answer in texts[ebook]
        if e["id"].endswith("source"):
            assert user.split("\n\n", 1)[1] in texts[ebook]
    assert len({e["id"] for e in ex}) == len(ex)


def test_load_examples_local_jsonl_and_bad_rows(tmp_path):
    good = tmp_path / "chat.jsonl"
    good.write_text(json.dumps({"prompt_id": "x", "messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}) + "\n")
    dcfg = {"source": str(good), "split": "train_sft", "messages_field": "messages", "max_examples": None}
    assert instruct.load_examples(dcfg, 0)[0]["id"] == "x"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no messages"}) + "\n")
    with pytest.raises(instruct.InputError, match="no 'messages' list"):
        instruct.load_examples({**dcfg, "source": str(bad)}, 0)


def test_train_config_inherits_cpt_and_applies_overrides():
    cfg = load_config(overrides={"cpt": {"epochs": 2}, "instruct": {"train": {"lr": 3e-5}}})
    t = instruct.train_config(cfg)["cpt"]
    assert t["lr"] == 3e-5 and t["replay"]["rate"] == 0.0 and t["epochs"] == 1 and t["probe"]["source"] is None
    assert t["block_size"] == cfg["cpt"]["block_size"] and t["threads"] == cfg["cpt"]["threads"]
    assert t["replay"]["source"] == cfg["cpt"]["replay"]["source"]  # merged, not replaced
    assert t["budgets"] != cfg["cpt"]["budgets"] and t["allow_budget_cap"] is False  # scaling-curve keys: not inherited


def test_instruct_stages_are_off_in_the_demo():
    assert load_config()["instruct"]["enabled"] is False


@pytest.mark.parametrize("mid,expected", [("entigraph-128-instruct", ("entigraph-instruct", 128)),
                                          ("base-instruct", ("base-instruct", None)),
                                          ("raw-all-instruct", ("raw-instruct", None))])
def test_aggregate_parses_instruct_ids_as_their_own_series(mid, expected):
    from workflow_scripts.aggregate import parse_model_id

    assert parse_model_id(mid) == expected


@pytest.mark.parametrize("text,label", [("TRUE", "TRUE"), ("1: false.", "FALSE"), ("The claim is true.", "TRUE"),
                                        ("true or false", None), ("untrue", None), ("", None), (None, None),
                                        ("TRUE, TRUE", "TRUE")])
def test_parse_single_label(text, label):
    assert claims.parse_single_label(text, claims.TRUTH_LABELS) == label


class ById:
    def __init__(self, answers):
        self.answers, self.ids = answers, []

    def generate(self, requests):
        for r in requests:
            self.ids.append(r.id)
            yield Completion(id=r.id, texts=[self.answers[r.id]], prompt_tokens=1, completion_tokens=1,
                             finish_reasons=["stop"], model="m")


def test_per_claim_judging_sends_one_request_per_claim():
    jcfg = {**load_config()["instruct"]["judge"], "per_claim": True}
    items = [{"id": "s1", "article_uid": "a", "prompt": "short", "summary": "Text."}]
    judge = ById({"s1:split": "- C1\n- C2\n- C3", "s1:truth:1": "TRUE", "s1:truth:2": "It is FALSE.",
                  "s1:truth:3": "I am not sure.", "s1:salience:1": "SALIENT"})
    rec = claims.judge_records(judge, items, {"a": "ART"}, jcfg, claims.judge_prompts())[0]
    assert judge.ids == ["s1:split", "s1:truth:1", "s1:truth:2", "s1:truth:3", "s1:salience:1"]
    assert rec["counts"] == {"claims": 3, "true": 1, "false": 1, "salient": 1, "cosmetic": 0, "truth_unparsed": 1,
                             "salience_unparsed": 0}
    assert any("claim 3: no single label" in p for p in rec["problems"])


def test_load_items_human_summaries(tmp_path, capsys):
    arts = {"a": {"uid": "a"}, "b": {"uid": "b"}}
    human = tmp_path / "h.jsonl"
    human.write_text("".join(json.dumps(r) + "\n" for r in [
        {"article_uid": "a", "summary": "One."}, {"article_uid": "a", "summary": "Two."},
        {"article_uid": "zzz", "summary": "Not in this run."}, {"article_uid": "b", "summary": "Three."}]))
    items = claims.load_items(None, human, arts)
    assert [i["id"] for i in items] == ["human:a:1", "human:a:2", "human:b:1"]
    assert {i["prompt"] for i in items} == {"human"} and {i["model"] for i in items} == {"human"}
    assert "1 human summaries of articles outside this run skipped" in capsys.readouterr().err
    human.write_text(json.dumps({"article_uid": "a", "text": "wrong field"}) + "\n")
    with pytest.raises(claims.InputError, match=r"h.jsonl:1: a human summary needs"):
        claims.load_items(None, human, arts)
