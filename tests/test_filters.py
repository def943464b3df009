"""Quality filters (issue 14): each filter on records built to trip it, the judge through a real engine (the
offline SmolLM2 on transformers) with its scores cached and reused, a variant run end to end on records files, and
the variant naming rules (wildcard [a-z0-9_]+, model ids METHOD-BUDGET)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workflow_scripts.config import load_config
from workflow_scripts.derived import check_methods, method_kind, trained_methods
from workflow_scripts.filters import (apply_dedup, apply_heuristics, dup_ngram_char_fraction, filter_records,
                                      heuristic_reason, judge_prompt_version, judge_system, main, parse_scores,
                                      run_variant, top_ngram_char_fraction)
from workflow_scripts.io_utils import InputError, read_jsonl, write_jsonl_atomic

TEXT = ("Korvin was held in a cell by the Tr'en, an efficient people who never lie, and he escaped by asking "
        "questions that their rulers could not answer without contradicting themselves.")
OTHER = ("Captain Chaos flew the damaged freighter past the moon while the crew argued about the cargo of "
         "frozen seeds that would feed a colony for a decade.")
ARTICLES = [{"uid": "30029", "title": "Lost in Translation", "author": "Janifer, Laurence M.", "year": 1972,
             "text": "Korvin was a prisoner of the Tr'en. " * 20}]


def rec(rid: str, text: str, **kw) -> dict:
    return {"id": rid, "text": text, "article_uid": "30029", "method": "entigraph", "kind": "pair",
            "completion_tokens": len(text.split()), "prompt_tokens": 10, "finish_reason": "stop", **kw}


@pytest.fixture()
def cfg():
    return load_config(overrides={"filters": {"variants": {"entigraph_judge": {"source": "entigraph"}}}})


@pytest.mark.unit
def test_repetition_measures_follow_their_definitions():
    words = "a b a b a b c".split()
    # most frequent 2-gram (a b) occurs 3 times, 6 of 7 characters
    assert top_ngram_char_fraction(words, 2) == pytest.approx(6 / 7)
    assert top_ngram_char_fraction("a b c d".split(), 2) == 0.0
    assert dup_ngram_char_fraction("x y z x y z".split(), 3) == 1.0
    assert dup_ngram_char_fraction("x y z w".split(), 3) == 0.0


@pytest.mark.unit
def test_heuristics_remove_short_long_repetitive_and_truncated_texts_with_reasons(cfg):
    hc = dict(cfg["filters"]["heuristics"])
    assert heuristic_reason(rec("ok", TEXT), hc) is None
    assert heuristic_reason(rec("s", "Too short."), hc).startswith("too_short")
    assert heuristic_reason(rec("r", "the cat sat on the mat " * 8), hc).startswith("top_2gram")
    assert heuristic_reason(rec("l", TEXT + "\n" + TEXT + "\n" + TEXT), hc).startswith(("dup_", "top_", "repeated"))
    assert heuristic_reason(rec("t", TEXT, finish_reason="length"), hc) is None
    assert heuristic_reason(rec("t", TEXT, finish_reason="length"), hc | {"drop_truncated": True}).startswith("trunc")
    assert heuristic_reason(rec("x", TEXT), hc | {"max_words": 5}).startswith("too_long")
    kept, removed = apply_heuristics([rec("ok", TEXT), rec("s", "Too short.")], hc)
    assert [r["id"] for r in kept] == ["ok"] and removed[0][0]["id"] == "s"


@pytest.mark.unit
def test_dedup_removes_exact_and_near_duplicates_and_keeps_the_first_id(cfg):
    dc = cfg["filters"]["dedup"]
    recs = [rec("f", OTHER.replace("decade", "century")), rec("b", "  " + TEXT.upper()), rec("a", TEXT),
            rec("d", OTHER), rec("e", TEXT + " Then he slept.")]
    kept, removed = apply_dedup(recs, dc, seed=1)
    assert [r["id"] for r in kept] == ["a", "d"]
    why = {r["id"]: w for r, w in removed}
    assert why["b"] == "exact_duplicate of a"
    assert why["e"].startswith("near_duplicate of a") and why["f"].startswith("near_duplicate of d")
    # with near-duplicate removal off, only the exact copy goes
    kept, _ = apply_dedup(recs, dc | {"near": False}, seed=1)
    assert [r["id"] for r in kept] == ["a", "d", "e", "f"]


@pytest.mark.unit
def test_judge_scores_are_parsed_and_the_prompt_is_versioned():
    assert parse_scores("Faithfulness: 4\nInformativeness: 2") == {"faithfulness": 4, "informativeness": 2}
    assert parse_scores("faithfulness - 5, informativeness: 3.") == {"faithfulness": 5, "informativeness": 3}
    assert parse_scores("I think it is good.") is None
    assert parse_scores("Faithfulness: 9\nInformativeness: 2") is None
    system = judge_system()
    assert "Faithfulness" in system and len(judge_prompt_version(system)) == 12
    assert judge_prompt_version(system) != judge_prompt_version(system + " ")


class ScriptedEngine:
    """An engine that answers from a table keyed by a marker in the user message, recording what it was asked.
    (Used only for the threshold logic; test_judge_runs_on_the_real_offline_model runs the real engine.)"""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers, self.asked = answers, []

    def generate(self, requests):
        from workflow_scripts.backends import Completion

        for r in requests:
            self.asked.append(r.id)
            text = next(a for k, a in self.answers.items() if k in r.messages[1]["content"])
            yield Completion(id=r.id, texts=[text], prompt_tokens=1, completion_tokens=1, finish_reasons=["stop"],
                             model="scripted")

    def close(self):
        pass


@pytest.mark.unit
def test_judge_threshold_unparseable_policy_and_score_cache(cfg, tmp_path):
    recs = [rec("a", TEXT), rec("b", OTHER), rec("c", TEXT + " Then he went home.")]
    engine = ScriptedEngine({"home": "no idea", "Captain": "Faithfulness: 1\nInformativeness: 3",
                             "escaped": "Faithfulness: 5\nInformativeness: 4"})
    arts = {a["uid"]: a for a in ARTICLES}
    out = filter_records(recs, arts, cfg, ["judge"], tmp_path, lambda: engine)
    assert [r["id"] for r in out["kept"]] == ["a", "c"]  # c unparseable: kept by default, counted
    assert out["judge"]["unparseable"] == 1 and out["judge"]["scored"] == 3
    assert {r["id"]: (f, w.split(" ")[0]) for r, f, w in out["removed"]} == {"b": ("judge", "judge_below_threshold")}
    assert {s["record_id"]: s["mean"] for s in out["scores"]} == {"a": 4.5, "b": 2.0, "c": None}
    # a re-run reuses every cached score: the engine is not called again
    again = ScriptedEngine({})
    cfg["filters"]["judge"]["on_unparseable"] = "drop"
    cfg["filters"]["judge"]["threshold"] = 5
    out = filter_records(recs, arts, cfg, ["judge"], tmp_path, lambda: again)
    assert again.asked == [] and out["kept"] == []
    reasons = sorted(w.split(" ")[0] for _, _, w in out["removed"])
    assert reasons == ["judge_below_threshold"] * 2 + ["judge_unparseable"]


@pytest.mark.engine
def test_judge_runs_on_the_real_offline_model(cfg, tmp_path, smollm_dir):
    cfg["models"]["generator"] = {"source": "path", "name": str(smollm_dir)}
    cfg["backends"]["transformers"] = {"device": "cpu", "progress": False, "batch_size": 2}
    cfg["filters"]["judge"].update(max_new_tokens=12, max_article_chars=400)
    recs = [rec("a", TEXT), rec("b", OTHER)]
    out = filter_records(recs, {a["uid"]: a for a in ARTICLES}, cfg, ["judge"], tmp_path)
    assert len(out["scores"]) == 2 and all(s["completion"] for s in out["scores"])
    assert all(s["model"] == Path(smollm_dir).name or s["model"] == str(smollm_dir) for s in out["scores"])
    assert len(out["kept"]) + len(out["removed"]) == 2
    cached = read_jsonl(tmp_path / "judge_scores.jsonl")
    assert len(cached) == 2 and all(c["prompt_version"] == out["judge"]["prompt_version"] for c in cached)


@pytest.mark.unit
def test_a_variant_writes_kept_removed_scores_and_report(cfg, tmp_path, capsys):
    arts = tmp_path / "articles.jsonl"
    write_jsonl_atomic(arts, ARTICLES)
    shard = tmp_path / "synth" / "30029.jsonl"
    write_jsonl_atomic(shard, [rec("a", TEXT), rec("b", TEXT.upper()), rec("c", "Too short."), rec("d", OTHER),
                               rec("e", " ")])
    cfg["filters"]["variants"]["entigraph_judge"]["steps"] = ["heuristics", "dedup"]
    out = tmp_path / "filtered" / "entigraph_judge"
    rep = run_variant(cfg, "entigraph_judge", arts, [str(shard)], out)
    kept = read_jsonl(out / "records.jsonl")
    assert [r["id"] for r in kept] == ["a", "d"]
    assert all(r["method"] == "entigraph_judge" and r["source_method"] == "entigraph" for r in kept)
    removed = {r["id"]: r for r in read_jsonl(out / "removed.jsonl")}
    assert {k: v["filter"] for k, v in removed.items()} == {"b": "dedup", "c": "heuristics", "e": "empty"}
    f = rep["filters"]
    assert f["input_records"] == 5 and f["kept_records"] == 2 and f["empty_removed"] == 1
    assert f["by_step"]["heuristics"] | {"seconds": 0, "records_per_second": 0} == {
        "in": 4, "kept": 3, "removed": 1, "by_reason": {"too_short": 1}, "seconds": 0, "records_per_second": 0}
    assert f["by_step"]["dedup"]["by_reason"] == {"exact_duplicate": 1}
    assert rep["records"] == 2 and rep["compression_ratio"] > 1 and rep["distinct_1"] > 0
    table = (out / "report.csv").read_text()
    assert "heuristics,too_short,,1" in table and "dedup,exact_duplicate,,1" in table
    # the command line: a filter that removes everything is one clear line and exit 2
    variant = {"source": "entigraph", "steps": ["heuristics"]}
    cfg_json = json.dumps({"filters": {"variants": {"entigraph_judge": variant},
                                       "heuristics": {"min_words": 1000}}})
    code = main(["run", "--variant", "entigraph_judge", "--articles", str(arts), "--inputs", str(shard),
                 "--outdir", str(tmp_path / "x"), "--config-json", cfg_json])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "removed all 5 records" in err[0] and "too_short" in err[0]


@pytest.mark.unit
def test_variant_names_fit_the_wildcard_and_model_ids():
    cfg = load_config(overrides={"filters": {"variants": {"entigraph_judge": {"source": "entigraph"}}}})
    assert trained_methods(cfg) == ["entigraph", "rephrase", "entigraph_judge"]
    assert method_kind(cfg, "entigraph_judge") == "filtered" and method_kind(cfg, "entigraph") == "synthesis"
    assert "entigraph_judge-128".rsplit("-", 1) == ["entigraph_judge", "128"]
    with pytest.raises(ValueError, match="propertyNames|does not match"):
        load_config(overrides={"filters": {"variants": {"entigraph+judge": {"source": "entigraph"}}}})
    bad = load_config(overrides={"filters": {"variants": {"qa_judge": {"source": "qa"}}}})
    with pytest.raises(InputError, match="neither in synthesis.methods nor in imports"):
        check_methods(bad)
    clash = load_config(overrides={"filters": {"variants": {"rephrase": {"source": "entigraph"}}}})
    with pytest.raises(InputError, match="declared in both"):
        check_methods(clash)


class FailingEngine(ScriptedEngine):
    """Fails every request whose record mentions `fail_on` (as an engine does after its own retries)."""

    def __init__(self, answers, fail_on):
        super().__init__(answers)
        self.fail_on = fail_on

    def generate(self, requests):
        from workflow_scripts.backends import Completion

        for r in requests:
            if self.fail_on in r.messages[1]["content"]:
                self.asked.append(r.id)
                yield Completion(id=r.id, texts=[], prompt_tokens=0, completion_tokens=0, finish_reasons=[],
                                 model="scripted", error="HTTP 503 after 5 retries")
            else:
                yield from super().generate([r])


@pytest.mark.unit
def test_failed_judge_requests_are_retried_not_cached(cfg, tmp_path):
    recs = [rec("a", TEXT), rec("b", OTHER)]
    arts = {a["uid"]: a for a in ARTICLES}
    ok = "Faithfulness: 4\nInformativeness: 4"
    with pytest.raises(InputError, match="1 judge requests failed, e.g. HTTP 503"):
        filter_records(recs, arts, cfg, ["judge"], tmp_path, lambda: FailingEngine({"": ok}, "Captain"))
    assert [c["record_id"] for c in read_jsonl(tmp_path / "judge_scores.jsonl")] == ["a"]
    retry = ScriptedEngine({"": ok})
    out = filter_records(recs, arts, cfg, ["judge"], tmp_path, lambda: retry)
    assert len(retry.asked) == 1 and [r["id"] for r in out["kept"]] == ["a", "b"]
