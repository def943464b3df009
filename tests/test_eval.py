"""Closed-book QA evaluation (issue 5): the paper's prompt byte for byte, answer extraction, the loglik scorer
(cache reuse equals a naive forward; the real model prefers obvious answers), CoT plumbing with a fake backend,
interval math, the summary and the accuracy table."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from workflow_scripts import aggregate, qa_eval
from workflow_scripts.backends import Completion
from workflow_scripts.config import validate_config

ROOT = Path(__file__).resolve().parent.parent
PAPER_PROMPTS = Path("/work/shared/reference/paper_prompts.md")
PREFIX_SHA256 = "4af57fda71078eb05a130606dad88641ffd3eac299c5e47fa75b937ab93c252c"

# The five examples of Appendix I.1 as structured data (QuALITY stores authors "Last, First").
PAPER_EXAMPLES = [
    ({"title": "Les Misérables", "author": "Hugo, Victor", "year": 1862},
     "What is the main setting of the novel?", ["London", "Madrid", "Paris", "Rome"]),
    ({"title": "Brave New World", "author": "Huxley, Aldous", "year": 1932},
     "What substance is widely used in the society to control citizens' happiness?", ["Gold", "Soma", "Silver", "Iron"]),
    ({"title": "Romeo and Juliet", "author": "Shakespeare, William", "year": "the early 1590s"},
     "What are the names of the two feuding families?",
     ["Montague and Capulet", "Bennet and Darcy", "Linton and Earnshaw", "Bloom and Dedalus"]),
    ({"title": "1984", "author": "Orwell, George", "year": 1949},
     "What is the name of the totalitarian leader?", ["Big Brother", "O'Brien", "Winston Smith", "Emmanuel Goldstein"]),
    ({"title": "Moby-Dick", "author": "Melville, Herman", "year": 1851},
     "What is the name of the ship's captain obsessed with hunting the titular whale?",
     ["Captain Hook", "Captain Nemo", "Captain Flint", "Captain Ahab"]),
]


def config(**evaluation) -> dict:
    return validate_config({"evaluation": evaluation})


# ----------------------------------------------------------------------------------------------- prompt
@pytest.mark.unit
def test_prefix_is_the_papers_appendix_i1_verbatim():
    prefix = qa_eval.load_prompt_template()
    assert hashlib.sha256(prefix.encode("utf-8")).hexdigest() == PREFIX_SHA256
    assert prefix.startswith('## Example 1\n### Question\nIn the context of "Les Misérables", written by Victor Hugo')
    assert prefix.endswith("Answer: D.\n\n## Example 6\n")
    assert len(re.findall(r"^## Example \d$", prefix, re.M)) == 6
    assert "\nChoices:\nA. Montague and Capulet\n" in prefix  # Example 3's quirk, kept as published
    if PAPER_PROMPTS.exists():  # the team's transcription of the paper, when this checkout sits beside it
        text = PAPER_PROMPTS.read_text(encoding="utf-8")
        section = text[text.index("## Closed-book QA: 5-shot"):text.index("## Summarization prompts")]
        assert re.findall(r"````text\n(.*?)````", section, re.S)[1] == prefix


@pytest.mark.unit
@pytest.mark.parametrize("i", [0, 1, 2, 3, 4])
def test_render_reproduces_the_papers_examples_byte_for_byte(i):
    prefix = qa_eval.load_prompt_template()
    article, question, options = PAPER_EXAMPLES[i]
    section = prefix.split(f"## Example {i + 1}\n")[1]
    expected = section[:section.index("Thought process:") + len("Thought process:")]
    got = qa_eval.render_question({"qid": f"ex{i}", "question": question, "options": options}, article)
    if i == 2:  # the paper's Example 3 writes "Choices:" where every other example has "### Choices"
        expected = expected.replace("\nChoices:\n", "\n### Choices\n")
    assert got == expected


@pytest.mark.unit
def test_render_quality_question_keeps_the_record_verbatim():
    """A real QuALITY record: question and options keep their trailing spaces (as the reference code), only the
    first letter is lowercased, the author is turned to First Last."""
    q = {"qid": "30029_F5N22U40_3", "article_uid": "30029", "gold": 1,
         "question": "How was Korvin able to avoid disclosing the true intent of his mission under the lie detector questioning? ",
         "options": ["While he was strapped down in the lie-detector, Korvin subtly switched the wire that indicated a truth with the one that indicated a lie. ",
                     "Korvin said truths that literally answered the Tr'en's questions but evaded the intent behind their questions. .",
                     "The Tr'en hadn't tested the lie-detector extensively enough and the machine was faulty. ",
                     "Even with the Tr'en's language lessons, Korvin could only to speak in very simple terms and was unable to answer the Ruler's questions at the depth the Ruler was expecting."]}
    article = {"uid": "30029", "title": "Lost in Translation", "author": "Janifer, Laurence M.", "year": 1972}
    assert qa_eval.render_question(q, article) == (
        "### Question\n"
        'In the context of "Lost in Translation", written by Laurence M. Janifer in 1972, how was Korvin able to '
        "avoid disclosing the true intent of his mission under the lie detector questioning?  There is only one "
        "correct choice.\n"
        "### Choices\n"
        "A. While he was strapped down in the lie-detector, Korvin subtly switched the wire that indicated a truth "
        "with the one that indicated a lie. \n"
        "B. Korvin said truths that literally answered the Tr'en's questions but evaded the intent behind their "
        "questions. .\n"
        "C. The Tr'en hadn't tested the lie-detector extensively enough and the machine was faulty. \n"
        "D. Even with the Tr'en's language lessons, Korvin could only to speak in very simple terms and was unable "
        "to answer the Ruler's questions at the depth the Ruler was expecting.\n"
        "### Thought Process and Answer\n"
        "Thought process:")


@pytest.mark.unit
@pytest.mark.parametrize("article,expected", [
    ({"title": "T", "author": "Doe, Jane", "year": 2001}, 'In the context of "T", written by Jane Doe in 2001,'),
    ({"title": "T", "author": "Jane Doe", "year": None}, 'In the context of "T", written by Jane Doe,'),
    ({"title": "T", "author": "", "year": 2001}, 'In the context of "T", written in 2001,'),
    ({"title": "T", "author": None, "year": ""}, 'In the context of "T",'),
    ({"title": "", "author": None, "year": None}, "In the context of the document,"),
])
def test_missing_author_or_year_renders_sensibly(article, expected):
    assert qa_eval.article_context(article) == expected
    text = qa_eval.render_question({"question": "Why?", "options": list("abcd")}, article)
    assert text.startswith(f"### Question\n{expected} why? There is only one correct choice.\n")


# ----------------------------------------------------------------------------------------------- answers
@pytest.mark.unit
@pytest.mark.parametrize("completion,expected", [
    (' "1984" names Big Brother, making A the correct choice.\nAnswer: A.', 0),
    (" Soma keeps them happy.\nAnswer: B.\n\n## Example 7\n### Question", 1),
    (" ...\nanswer: c.", 2),
    (" ...\nANSWER:D.", 3),
    (" ...\nAnswer :  C .", 2),
    (" ...\n**Answer: B.**", 1),
    (" ...\nAnswer: (D)", 3),
    (" ...\nAnswer: C", 2),                         # cut before the period (max tokens), still an answer line
    (" ...\nAnswer: C\n\n## Example 7", 2),
    (" It is A. No, it is C.\nAnswer: B.\nAnswer: D.", 1),  # the first answer line counts (generation stops there)
    (" making C the correct choice.", None),        # no answer line
    (" ...\nAnswer: A lot depends on the reading.", None),
    (" ...\nAnswer: E.", None),
    (" ...\nAnswer: AB.", None),                    # ambiguous (the reference parser would read B)
    (" ...\nanswer: a lot", None),
    ("", None),
    (None, None),
])
def test_extract_answer_on_tricky_completions(completion, expected):
    assert qa_eval.extract_answer(completion) == expected


@pytest.mark.unit
def test_select_answer_conventions():
    rng = random.Random(0)
    assert qa_eval.select_answer([None, 2, 1, 1], "first", rng) == 2
    assert qa_eval.select_answer([None, 2, 1, 1], "majority", rng) == 1
    assert qa_eval.select_answer([3, 2, 2, 3], "majority", rng) == 3  # tie -> the earliest
    assert qa_eval.select_answer([None, None], "first", rng) is None
    picks = {qa_eval.select_answer([0, None, 3], "random", random.Random(s)) for s in range(20)}
    assert picks == {0, 3}


@pytest.mark.unit
def test_cot_stops_keep_the_letter_only_where_the_engine_keeps_stops():
    ccfg = config(cot={"answer_rule": "first_match"})["evaluation"]["cot"]
    assert qa_eval.cot_stops(ccfg, "transformers") == ["Answer: A.", "Answer: B.", "Answer: C.", "Answer: D.",
                                                       "\n## Example"]
    assert qa_eval.cot_stops(ccfg, "openai") == ["\n## Example"]
    # The reference rule sends the reference code's own stops: `Answer: P.\n` for every ordering of 1-4 letters.
    ref = qa_eval.cot_stops(config()["evaluation"]["cot"], "vllm")
    assert len(ref) == 4 + 12 + 24 + 24 + 1 and ref[0] == "Answer: A.\n" and "Answer: DCBA.\n" in ref
    assert ref[-1] == "\n## Example" and qa_eval.cot_stops(config()["evaluation"]["cot"], "openai") == ["\n## Example"]


# Item 1 of issue 12: the reference reads the letter from the `Answer: X.` stop the completion ended on.
@pytest.mark.unit
@pytest.mark.parametrize("completion,reference,first_match", [
    ("The correct answer: A, since ...\nAnswer: D.\n", 3, 0),          # the example
    ("The correct answer: A, since ...\nAnswer: D.", None, 0),         # no newline: reference_eot reads D
    (" Soma keeps them happy.\nAnswer: B.\n\n## Example 7", 1, 1),     # a hosted API: no answer stop sent
    (" It is A. No, it is C.\nAnswer: B.\nAnswer: D.\n", 1, 1),        # generation stops at the first stop
    (" ...\nAnswer: C", None, 2),                                      # cut at max tokens: not attempted
    (" ...\nAnswer: C. Hmm, let me think again about", None, 2),       # no stop (the period is not followed by
    (" ...\nanswer: c.\n", None, 2),                                   #   a newline); wrong case is no stop
    (" ...\n**Answer: B.**", None, 1),
    (" ...\nAnswer: AB.\n", 1, None),                                  # reference: the letter before the period
    (" ...\nAnswer: AA.\n", None, None),                               # not an ordering of distinct letters
    (" making C the correct choice.", None, None),
    ("", None, None),
    (None, None, None),
])
def test_answer_rules_table(completion, reference, first_match):
    assert qa_eval.read_answer(completion, "reference") == reference
    eot = 3 if completion == "The correct answer: A, since ...\nAnswer: D." else reference
    assert qa_eval.read_answer(completion, "reference_eot") == eot
    assert qa_eval.read_answer(completion, "first_match") == first_match


@pytest.mark.unit
def test_cot_run_counts_a_completion_cut_at_max_tokens_as_not_attempted(tmp_path, monkeypatch):
    qp, ap = write_inputs(tmp_path)
    fake = FakeBackend({"q1": ["The correct answer: A, since ...\nAnswer: D.\n"],   # reference D (wrong), first A
                        "q2": [" It was ice, so the answer is C.\nAnswer: C"],       # cut at max tokens
                        "q3": [" Answer: D.\n"]})
    monkeypatch.setattr(qa_eval, "make_backend", lambda cfg, engine, model: fake)
    out = tmp_path / "qa.jsonl", tmp_path / "qa.json"
    ref = qa_eval.run(config(modes=["cot"]), "base", "m", str(qp), str(ap), *out)
    assert ref["modes"]["cot"]["answer_rule"] == "reference"
    assert [r["predicted"] for r in map(json.loads, out[0].read_text().splitlines())] == [3, None, 3]
    assert ref["attempted"] == pytest.approx(2 / 3)
    old = qa_eval.run(config(modes=["cot"], cot={"answer_rule": "first_match"}), "base", "m", str(qp), str(ap), *out)
    assert [r["predicted"] for r in map(json.loads, out[0].read_text().splitlines())] == [0, 2, 3]
    assert old["attempted"] == 1.0


@pytest.mark.unit
def test_samples_per_question_come_from_config_and_the_paper_overlay_sets_64(tmp_path, monkeypatch):
    from workflow_scripts.config import ROOT, load_config

    paper = load_config([ROOT / "config.yaml", ROOT / "experiments" / "paper.yaml"])
    assert paper["evaluation"]["cot"]["n"] == 64 and paper["evaluation"]["cot"]["answer_rule"] == "reference"
    assert validate_config({})["evaluation"]["cot"]["n"] == 1
    qp, ap = write_inputs(tmp_path)
    fake = FakeBackend({q: [" Answer: A.\n"] * 8 for q in ("q1", "q2", "q3")})
    monkeypatch.setattr(qa_eval, "make_backend", lambda cfg, engine, model: fake)
    s = qa_eval.run(config(modes=["cot"], cot={"n": 8}), "base", "m", str(qp), str(ap),
                    tmp_path / "qa.jsonl", tmp_path / "qa.json")
    assert {r.n for r in fake.requests} == {8} and s["modes"]["cot"]["samples_per_question"] == 8


# ----------------------------------------------------------------------------------------------- statistics
@pytest.mark.unit
@pytest.mark.parametrize("k,n,lo,hi", [
    (0, 10, 0.0, 0.2775),     # Wilson (1927); Newcombe (1998) table values
    (5, 10, 0.2366, 0.7634),
    (8, 10, 0.4902, 0.9433),
    (10, 10, 0.7225, 1.0),
    (81, 263, 0.2553, 0.3662),
])
def test_wilson_interval_known_values(k, n, lo, hi):
    got = qa_eval.wilson_interval(k, n, 0.95)
    assert got == pytest.approx((lo, hi), abs=5e-4)


@pytest.mark.unit
def test_bootstrap_interval_is_seeded_and_sane():
    x = [True] * 60 + [False] * 40
    a = qa_eval.bootstrap_interval(x, 2000, 0.95, seed=1)
    assert a == qa_eval.bootstrap_interval(x, 2000, 0.95, seed=1)
    # close to the normal approximation 0.6 +- 1.96 * sqrt(0.24 / 100)
    assert a[0] == pytest.approx(0.504, abs=0.02) and a[1] == pytest.approx(0.696, abs=0.02)
    assert qa_eval.bootstrap_interval([True] * 5, 100) == (1.0, 1.0)


# ----------------------------------------------------------------------------------------------- loglik
def _scorer(model_dir, prefix, **kw):
    import torch

    torch.set_num_threads(2)
    model, tok = qa_eval.load_local_model(str(model_dir), {"device": "cpu", "dtype": "float32"})
    return qa_eval.LoglikScorer(model, tok, prefix, **kw)


@pytest.mark.engine
def test_cached_batched_scores_equal_a_naive_forward(tiny_model_dir):
    """Prefix cache + packed rows (contexts and options under a block mask) give the naive per-option numbers."""
    prefix = "## Example 1\nSome shared few-shot text that every question follows.\n\n## Example 2\n"
    items = [("### Question\nWhat colour is the sky?\nThought process:", [" Blue", " Green, the colour of grass", " Red", " I"]),
             ("### Question\nA much longer context, so that the left padding of the batch is exercised properly, "
              "with several more tokens than the first one.\nThought process:", [" yes", " no", " maybe so", " x y z w"]),
             ("Q?", [" a", " b b", " c c c", " d"])]
    naive = _scorer(tiny_model_dir, prefix, reuse_prefix_cache=False).score(items)
    for bq in (1, 2, 3):
        fast = _scorer(tiny_model_dir, prefix, batch_questions=bq).score(items)
        for f_row, n_row in zip(fast, naive):
            assert [f["tokens"] for f in f_row] == [n["tokens"] for n in n_row]
            assert [f["logprob"] for f in f_row] == pytest.approx([n["logprob"] for n in n_row], abs=1e-4)


@pytest.mark.engine
def test_real_model_prefers_the_obvious_answer(smollm_dir):
    """SmolLM2-135M after the paper's 5-shot prefix: general-knowledge questions with one sensible option."""
    cases = [
        ({"title": "The Adventures of Sherlock Holmes", "author": "Doyle, Arthur Conan", "year": 1892},
         {"qid": "t1", "question": "Who is the detective's friend and the narrator of the stories?",
          "options": ["Captain Nemo", "Dr. John Watson", "Mr. Darcy", "Huckleberry Finn"], "gold": 1}),
        ({"title": "Harry Potter and the Philosopher's Stone", "author": "Rowling, J. K.", "year": 1997},
         {"qid": "t2", "question": "What is the name of the school of witchcraft and wizardry that Harry attends?",
          "options": ["Hogwarts", "Oxford", "Narnia", "Gotham"], "gold": 0}),
    ]
    scorer = _scorer(smollm_dir, qa_eval.load_prompt_template(), batch_questions=2)
    contexts = [qa_eval.render_question(q, a) for a, q in cases]
    lcfg = config()["evaluation"]["loglik"]
    recs = qa_eval.loglik_records(scorer, contexts, [q for _, q in cases], lcfg)
    for rec, (_, q) in zip(recs, cases):
        assert rec["predicted_by"] == {"sum": q["gold"], "per_token": q["gold"], "per_char": q["gold"]}, rec
        assert rec["correct"]


# ----------------------------------------------------------------------------------------------- runs
ARTICLES = [{"uid": "a1", "title": "The Glass Orchard", "author": "Vance, Mira", "year": 1958, "text": "..."},
            {"uid": "a2", "title": "Notes", "author": None, "year": None, "text": "..."}]
QUESTIONS = [
    {"qid": "q1", "article_uid": "a1", "question": "Who planted the orchard?", "options": ["Mira", "Tom", "Ann", "Bo"],
     "gold": 0, "difficult": 1},
    {"qid": "q2", "article_uid": "a1", "question": "What was it made of?", "options": ["Wood", "Glass", "Ice", "Stone"],
     "gold": 1, "difficult": 0},
    {"qid": "q3", "article_uid": "a2", "question": "Which year?", "options": ["1901", "1950", "1999", "2020"],
     "gold": 3, "difficult": None},
]


def write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    qp, ap = tmp_path / "questions.jsonl", tmp_path / "articles.jsonl"
    qp.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    ap.write_text("".join(json.dumps(a) + "\n" for a in ARTICLES))
    return qp, ap


class FakeBackend:
    """Scripted completions per question id; records the requests it was given."""

    def __init__(self, scripts: dict[str, list[str]]) -> None:
        self.scripts, self.requests, self.model, self.name = scripts, [], "fake", "fake"

    def generate(self, requests):
        for r in requests:
            self.requests.append(r)
            texts = self.scripts[r.id][: r.n]
            yield Completion(id=r.id, texts=texts, prompt_tokens=10, completion_tokens=5 * len(texts),
                             finish_reasons=["stop"] * len(texts), model=self.model)

    def close(self):
        pass


@pytest.mark.unit
def test_cot_run_reports_both_conventions(tmp_path, monkeypatch):
    qp, ap = write_inputs(tmp_path)
    fake = FakeBackend({"q1": [" Mira did.\nAnswer: A.\n", " Answer: B.\n"],     # first valid: A (correct)
                        "q2": [" It was ice.\nAnswer: C.\n", " Answer: B.\n"],   # first valid: C (wrong)
                        "q3": [" I cannot tell.", " Not sure at all"]})          # no answer: unparseable
    monkeypatch.setattr(qa_eval, "make_backend", lambda cfg, engine, model: fake)
    cfg = config(modes=["cot"], cot={"n": 2, "temperature": 0.1, "max_new_tokens": 300})
    s = qa_eval.run(cfg, "base", "some/model", str(qp), str(ap), tmp_path / "qa.jsonl", tmp_path / "qa.json")
    cot = s["modes"]["cot"]
    assert (s["n"], cot["n_attempted"]) == (3, 2)
    assert s["accuracy"] == pytest.approx(1 / 3)               # unparseable counted wrong
    assert cot["accuracy_attempted"] == pytest.approx(1 / 2)   # the reference code's convention
    assert cot["attempted"] == pytest.approx(2 / 3)
    assert set(cot["by_difficulty"]) == {"difficult", "not_difficult"}
    prefix = qa_eval.load_prompt_template()
    req = {r.id: r for r in fake.requests}
    assert req["q1"].messages is None and req["q1"].n == 2 and req["q1"].temperature == 0.1
    assert req["q1"].max_new_tokens == 300 and "Answer: A.\n" in req["q1"].stop
    assert req["q1"].prompt == prefix + qa_eval.render_question(QUESTIONS[0], ARTICLES[0])
    recs = [json.loads(line) for line in (tmp_path / "qa.jsonl").read_text().splitlines()]
    assert [r["predicted"] for r in recs] == [0, 2, None]
    assert [r["correct"] for r in recs] == [True, False, False]
    assert recs[0]["cot"]["completions"] == fake.scripts["q1"] and recs[0]["prompt_id"]
    assert json.loads((tmp_path / "qa.json").read_text())["modes"]["cot"]["accuracy_attempted"] == 0.5


class FlakyBackend(FakeBackend):
    """Fails for good on the ids in `fail` (as an engine reports a request that exhausted its retries)."""

    def __init__(self, scripts, fail=()):
        super().__init__(scripts)
        self.fail = set(fail)

    def generate(self, requests):
        for r in requests:
            self.requests.append(r)
            if r.id in self.fail:
                yield Completion(id=r.id, texts=[], prompt_tokens=0, completion_tokens=0, finish_reasons=[],
                                 model=self.model, error="HTTP 500 after 5 retries")
            else:
                yield Completion(id=r.id, texts=self.scripts[r.id][: r.n], prompt_tokens=1, completion_tokens=1,
                                 finish_reasons=["stop"] * r.n, model=self.model)


@pytest.mark.unit
def test_cot_failures_stop_the_job_and_a_rerun_resumes(tmp_path, monkeypatch):
    qp, ap = write_inputs(tmp_path)
    scripts = {"q1": [" Answer: A.\n"], "q2": [" Answer: B.\n"], "q3": [" Answer: D.\n"]}  # stop kept
    cfg = config(modes=["cot"])
    out = (tmp_path / "qa.jsonl", tmp_path / "qa.json")
    first = FlakyBackend(scripts, fail={"q3"})
    monkeypatch.setattr(qa_eval, "make_backend", lambda cfg, engine, model: first)
    with pytest.raises(qa_eval.InputError, match="1 of 3 CoT requests failed"):
        qa_eval.run(cfg, "base", "m", str(qp), str(ap), *out)
    assert not out[1].exists()
    second = FlakyBackend(scripts)
    monkeypatch.setattr(qa_eval, "make_backend", lambda cfg, engine, model: second)
    s = qa_eval.run(cfg, "base", "m", str(qp), str(ap), *out)
    assert [r.id for r in second.requests] == ["q3"]  # q1, q2 came from the partial file
    assert s["accuracy"] == 1.0 and s["modes"]["cot"]["failed_requests"] == 0
    # Tolerated failures count as unanswered.
    third = FlakyBackend(scripts, fail={"q3"})
    monkeypatch.setattr(qa_eval, "make_backend", lambda cfg, engine, model: third)
    s = qa_eval.run(config(modes=["cot"], cot={"max_failed_fraction": 0.5}), "base", "m", str(qp), str(ap), *out)
    assert s["modes"]["cot"]["failed_requests"] == 1 and s["accuracy"] == pytest.approx(2 / 3)
    assert s["accuracy_attempted"] == 1.0


@pytest.mark.engine
def test_both_modes_run_with_the_real_engine(tmp_path, tiny_model_dir):
    """loglik (primary) and cot through the real transformers backend (a random tiny model: its samples are
    noise, so only the plumbing and the bookkeeping are checked)."""
    qp, ap = write_inputs(tmp_path)
    cfg = validate_config({"evaluation": {"modes": ["loglik", "cot"], "device": "cpu", "ci": {"bootstrap": 200},
                                          "cot": {"n": 2, "max_new_tokens": 4}},
                           "backends": {"transformers": {"device": "cpu", "progress": False}}})
    s = qa_eval.run(cfg, "entigraph-4000", str(tiny_model_dir), str(qp), str(ap),
                    tmp_path / "m.jsonl", tmp_path / "m.json")
    recs = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["qid"] for r in recs] == ["q1", "q2", "q3"]
    for r in recs:
        assert len(r["loglik"]["option_logprob"]) == 4 and r["predicted"] in range(4) and r["mode"] == "loglik"
        assert r["correct"] == (r["predicted"] == r["gold"]) and len(r["prompt_id"]) == 12
        assert len(r["cot"]["completions"]) == 2 and len(r["cot"]["answers"]) == 2
        assert r["cot"]["attempted"] == (r["cot"]["predicted"] is not None)
    block = s["modes"]["loglik"]
    assert s["n"] == 3 and s["attempted"] == 1.0 and 0 <= s["ci_low"] <= s["accuracy"] <= s["ci_high"] <= 1
    assert {"accuracy_sum", "accuracy_per_token", "accuracy_per_char", "bootstrap_ci"} <= set(block)
    assert s["modes"]["cot"]["n"] == 3 and s["run"]["cot"]["engine"] == "transformers"
    assert s["prefix_version"] == qa_eval.prompt_version(qa_eval.load_prompt_template())
    assert not Path(str(tmp_path / "m.jsonl") + ".cot-partial").exists()  # the resume file is removed at the end


@pytest.mark.engine
def test_the_scorer_model_is_freed_before_the_generation_engine_starts(tmp_path, tiny_model_dir, monkeypatch):
    """loglik then cot in one process: when the generation engine is built, the scorer's model is gone (a weakref
    to it is dead, even with a reference cycle that only gc.collect frees) and, where CUDA is, torch's cached
    blocks have been handed back (empty_cache), so vLLM sizes its KV cache from the memory really free."""
    import torch
    import weakref

    qp, ap = write_inputs(tmp_path)
    cfg = validate_config({"evaluation": {"modes": ["loglik", "cot"], "device": "cpu", "ci": {"bootstrap": 20},
                                          "cot": {"n": 1, "max_new_tokens": 4}},
                           "backends": {"transformers": {"device": "cpu", "progress": False}}})
    seen, emptied = {}, []
    real_load = qa_eval.load_local_model

    def load(path, ecfg):
        model, tok = real_load(path, ecfg)
        model._cycle = [model]  # a cycle, as models and their hooks can hold: refcounting alone frees nothing
        seen["model"] = weakref.ref(model)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU node, from here on
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(seen["model"]() is None))
        return model, tok

    class Built(Exception):
        pass

    def backend(cfg, engine, model):
        seen["alive_at_engine_start"] = seen["model"]() is not None
        raise Built

    monkeypatch.setattr(qa_eval, "load_local_model", load)
    monkeypatch.setattr(qa_eval, "make_backend", backend)
    with pytest.raises(Built):
        qa_eval.run(cfg, "entigraph-4000", str(tiny_model_dir), str(qp), str(ap), tmp_path / "m.jsonl",
                    tmp_path / "m.json")
    assert seen["alive_at_engine_start"] is False
    assert emptied == [True]  # once, after the model was collected


@pytest.mark.unit
def test_aggregate_table(tmp_path):
    def summary(model, acc, mode="loglik", **extra):
        block = {"n": 37, "accuracy": acc, "ci_low": acc - 0.1, "ci_high": acc + 0.1, "attempted": 1.0,
                 "accuracy_attempted": acc, "by_difficulty": {"difficult": {"n": 12, "accuracy": 0.25}}, **extra}
        path = tmp_path / f"{model}.json"
        path.write_text(json.dumps({"model": model, "modes": {mode: block}, "prefix_version": "p", "config_hash": "c"}))
        return path

    paths = [summary("entigraph-8000", 0.4), summary("base", 0.3), summary("raw-all", 0.31),
             summary("api-gpt4", 0.5, mode="cot", accuracy_attempted=0.55)]
    (tmp_path / "models" / "raw" / "all").mkdir(parents=True)
    (tmp_path / "models" / "raw" / "all" / "train_summary.json").write_text(
        json.dumps({"budget_tokens": 1778, "tokens_seen": 7112, "epochs": 4}))
    out = tmp_path / "qa_accuracy.csv"
    # per model: all/wrong accuracy, attempted, the difficult split; the cot model also all/dropped
    assert aggregate.aggregate(paths, out, tmp_path / "models") == 4 * 3 + 1
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == aggregate.QA_COLUMNS
    head = {r["model"]: r for r in rows if r["headline"] == "True"}
    assert [r["model"] for r in rows if r["headline"] == "True"] == ["base", "raw-all", "entigraph-8000", "api-gpt4"]
    assert (head["base"]["method"], head["base"]["budget_tokens"], head["base"]["kind"]) == ("base", "", "base")
    assert (head["raw-all"]["method"], head["raw-all"]["budget"], head["raw-all"]["budget_tokens"],
            head["raw-all"]["train_tokens_seen"]) == ("raw", "all", "1778", "7112")
    assert (head["entigraph-8000"]["method"], head["entigraph-8000"]["budget_tokens"]) == ("entigraph", "8000")
    assert (head["base"]["value"], head["base"]["n"], head["base"]["ci_low"]) == ("0.3", "37", str(0.3 - 0.1))
    # an old summary's cot block: accuracy_attempted is the dropped convention's number
    api = {(r["split"], r["convention"]): r for r in rows if r["model"] == "api-gpt4"}
    assert api["all", "dropped"]["value"] == "0.55" and api["all", "wrong"]["value"] == "0.5"
    diff = next(r for r in rows if r["model"] == "base" and r["split"] == "difficult")
    assert (diff["value"], diff["n"], diff["headline"]) == ("0.25", "12", "False")
    # no column is empty in every row of this table
    assert [c for c in aggregate.QA_COLUMNS if not any(r[c] for r in rows)] == ["budget_fraction", "budget_capped",
                                                                                  "note"]


@pytest.mark.unit
def test_aggregate_rag_table_is_long_with_recall_rows(tmp_path):
    part = {"n": 10, "accuracy": 0.4, "ci_low": 0.2, "ci_high": 0.6}
    block = {**part, "reported": {"all": {"questions": 10, "attempted": 1.0, "wrong": part, "dropped": part}}}
    path = tmp_path / "base.json"
    path.write_text(json.dumps({"model": "base", "n": 10, "modes": {"loglik": block}, "retrieval": {
        "retriever": "hybrid", "top_k": 8, "recall_at_k": {"bm25": 0.5, "hybrid": 0.7}}}))
    out = tmp_path / "rag_accuracy.csv"
    assert aggregate.main(["rag", "--summaries", str(path), "--output", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == aggregate.RAG_COLUMNS and {(r["retriever"], r["top_k"]) for r in rows} == {("hybrid", "8")}
    recall = {r["metric"]: (r["mode"], r["value"], r["n"]) for r in rows if r["metric"].startswith("recall")}
    assert recall == {"recall_at_k_bm25": ("retrieval", "0.5", "10"), "recall_at_k_hybrid": ("retrieval", "0.7", "10")}
    assert [r["convention"] for r in rows if r["headline"] == "True"] == ["wrong"]


@pytest.mark.unit
@pytest.mark.parametrize("module", ["qa_eval", "rag", "aggregate"])
def test_command_line_help(module):
    r = subprocess.run([sys.executable, "-m", f"workflow_scripts.{module}", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout


@pytest.mark.engine
def test_missing_model_folder_is_a_clear_error(tmp_path):
    qp, ap = write_inputs(tmp_path)
    r = subprocess.run([sys.executable, "-m", "workflow_scripts.qa_eval", "--model-id", "rephrase-4000",
                        "--model-path", "results/models/rephrase/999999999", "--questions", str(qp), "--articles",
                        str(ap), "--output-jsonl", str(tmp_path / "x.jsonl"), "--output-json", str(tmp_path / "x.json"),
                        "--config-json", "{}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "model folder not found" in r.stderr
    assert not (tmp_path / "x.json").exists()
