"""Evaluation faithful to the authors' protocol (issue 12): reported numbers over all questions and the reference
code's 20/80 article split under both conventions, and the authors' RAG prompt byte for byte."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from workflow_scripts import aggregate, paper_reference, qa_eval, rag
from workflow_scripts.backends import Completion
from workflow_scripts.config import section_defaults, validate_config
from workflow_scripts.io_utils import parse_jsonl

ROOT = Path(__file__).resolve().parent.parent
SHARED_ICL = Path("/work/shared/reference/quality_retrieval_icl.txt")


# ----------------------------------------------------------------------------------------------- item 2: split
@pytest.mark.unit
def test_article_split_follows_the_reference_order():
    # The reference sorts train + dev by raw title (stable) and takes int(0.2 * n) articles as val.
    arts = [{"uid": f"u{i}", "title": t} for i, t in enumerate(["Mars", "Alpha", "Zed", "beta", "Alpha", "Kite",
                                                                    "Delta", "Echo", "Gamma", "Hotel"])]
    arts[2]["title_raw"] = " Zed"  # QuALITY keeps a leading space in some raw titles: it sorts first
    order = [a["uid"] for a in qa_eval.split_order(arts)]
    assert order == ["u2", "u1", "u4", "u6", "u7", "u8", "u9", "u5", "u0", "u3"]
    split = qa_eval.article_split(arts, 0.2)
    assert [u for u in order if split[u] == "val"] == ["u2", "u1"]
    assert sum(v == "test" for v in split.values()) == 8
    assert sum(v == "val" for v in qa_eval.article_split([{"uid": str(i), "title": str(i)} for i in range(265)],
                                                         0.2).values()) == 53


class Scripted:
    def __init__(self, scripts):
        self.scripts, self.model, self.name = scripts, "fake", "fake"

    def generate(self, requests):
        for r in requests:
            texts = self.scripts[r.id]
            yield Completion(id=r.id, texts=texts, prompt_tokens=1, completion_tokens=1,
                             finish_reasons=["stop"] * len(texts), model="fake")

    def close(self):
        pass


def write_split_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """Five articles (val = the first one by title), two questions each."""
    arts = [{"uid": f"a{i}", "title": t, "author": None, "year": None, "text": "..."}
            for i, t in enumerate(["B", "A", "C", "D", "E"])]
    qs = [{"qid": f"q{i}{j}", "article_uid": f"a{i}", "question": "Which?", "options": list("wxyz"), "gold": 0}
          for i in range(5) for j in range(2)]
    qp, ap = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    qp.write_text("".join(json.dumps(q) + "\n" for q in qs))
    ap.write_text("".join(json.dumps(a) + "\n" for a in arts))
    return qp, ap


@pytest.mark.unit
def test_summary_reports_all_val_test_under_both_conventions(tmp_path, monkeypatch):
    qp, ap = write_split_inputs(tmp_path)
    # val = article a1 ("A"): one right, one unparseable. test: a0 right + wrong, a2-a4 all right.
    scripts = {"q10": [" Answer: A.\n"], "q11": [" I cannot tell"], "q00": [" Answer: A.\n"], "q01": [" Answer: B.\n"]}
    scripts.update({f"q{i}{j}": [" Answer: A.\n"] for i in (2, 3, 4) for j in (0, 1)})
    monkeypatch.setattr(qa_eval, "make_backend", lambda cfg, engine, model: Scripted(scripts))
    cfg = validate_config({"evaluation": {"modes": ["cot"], "ci": {"bootstrap": 0}}})
    s = qa_eval.run(cfg, "base", "m", str(qp), str(ap), tmp_path / "o.jsonl", tmp_path / "o.json")
    rep = s["modes"]["cot"]["reported"]
    assert s["split"]["val_articles"] == 1 and s["split"]["test_articles"] == 4
    assert (rep["all"]["wrong"]["n"], rep["all"]["wrong"]["correct"]) == (10, 8)
    assert (rep["all"]["dropped"]["n"], rep["all"]["dropped"]["correct"]) == (9, 8)
    assert rep["val"]["wrong"]["accuracy"] == 0.5 and rep["val"]["dropped"]["accuracy"] == 1.0
    assert rep["val"]["attempted"] == 0.5
    assert rep["test"]["wrong"]["n"] == 8 and rep["test"]["wrong"]["accuracy"] == pytest.approx(7 / 8)
    for split in ("all", "val", "test"):
        for conv in ("wrong", "dropped"):
            b = rep[split][conv]
            assert 0 <= b["ci_low"] <= b["accuracy"] <= b["ci_high"] <= 1  # each number has its n and interval
            assert (b["ci_low"], b["ci_high"]) == pytest.approx(qa_eval.wilson_interval(b["correct"], b["n"]))

    # The long table: every number its own row with n and interval; `headline` marks the configured one.
    out, head = tmp_path / "t.csv", tmp_path / "h.csv"
    aggregate.aggregate([tmp_path / "o.json"], out, None, split="test", convention="dropped", headline=head)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == aggregate.QA_COLUMNS
    by = {(r["split"], r["convention"], r["metric"]): r for r in rows}
    assert len(by) == len(rows)  # one row per split x convention x metric
    (hl,) = [r for r in rows if r["headline"] == "True"]
    assert (hl["split"], hl["convention"], hl["metric"]) == ("test", "dropped", "accuracy")
    assert float(hl["value"]) == pytest.approx(7 / 8) and int(hl["n"]) == 8  # all test questions attempted
    assert float(by["all", "wrong", "accuracy"]["value"]) == 0.8 and int(by["val", "dropped", "accuracy"]["n"]) == 1
    assert float(by["val", "", "attempted"]["value"]) == 0.5 and by["val", "", "attempted"]["n"] == "2"
    assert by["val", "dropped", "accuracy"]["split_label"] == "val split (first 20% of articles)"
    assert float(by["test", "wrong", "accuracy"]["ci_low"]) == pytest.approx(qa_eval.wilson_interval(7, 8)[0])
    assert by["test", "wrong", "accuracy"]["interval"] == "wilson 95%"
    # The headline table: that number per model and mode, in words.
    (h,) = list(csv.DictReader(head.open()))
    assert list(h) == aggregate.HEADLINE_COLUMNS
    assert h["plotted"] == "test split (last 80% of articles), unparseable dropped" and h["value"] == hl["value"]
    aggregate.aggregate([tmp_path / "o.json"], out, None, headline=head)
    (h,) = list(csv.DictReader(head.open()))
    assert float(h["value"]) == 0.8 and h["plotted"] == "all questions, unparseable counted wrong"
    # Pivoted by the README's own line: one column per split x convention.
    import pandas as pd

    (line,) = [t for t in (ROOT / "README.md").read_text().splitlines()
               if t.startswith('pd.read_csv("results/tables/qa_accuracy.csv")')]
    wide = eval(line.replace("results/tables/qa_accuracy.csv", str(out)), {"pd": pd})
    assert wide.loc[("base", "cot"), ("test", "dropped")] == pytest.approx(7 / 8)
    assert wide.loc[("base", "cot"), ("val", "wrong")] == 0.5


@pytest.mark.unit
def test_a_model_without_attempted_answers_is_kept_marked_and_skipped_by_the_fit(tmp_path, monkeypatch, capsys):
    """Issue 19's rehearsal: one model answered nothing readable on the test split (n = 0 under the dropped
    convention). It stays in both tables with an empty value and the note, the figure marks it, and the fit
    skips it (saying so) instead of refusing the whole table."""
    from workflow_scripts import figures, fit_scaling

    qp, ap = write_split_inputs(tmp_path)
    monkeypatch.setattr(qa_eval, "make_backend", lambda cfg, engine, model: Scripted(
        {f"q{i}{j}": [" Answer: A.\n"] for i in range(5) for j in range(2)}))
    cfg = validate_config({"evaluation": {"modes": ["cot"], "ci": {"bootstrap": 0}}})
    good = [qa_eval.run(cfg, m, "m", str(qp), str(ap), tmp_path / f"{m}.jsonl", tmp_path / f"{m}.json")
            for m in ("base", "entigraph-100", "entigraph-300", "entigraph-1000")]
    monkeypatch.setattr(qa_eval, "make_backend", lambda cfg, engine, model: Scripted(
        {f"q{i}{j}": [" I cannot tell"] for i in range(5) for j in range(2)}))
    qa_eval.run(cfg, "entigraph-200", "m", str(qp), str(ap), tmp_path / "entigraph-200.jsonl",
                tmp_path / "entigraph-200.json")
    assert len(good) == 4
    table, head = tmp_path / "qa_accuracy.csv", tmp_path / "qa_headline.csv"
    summaries = [tmp_path / f"{m}.json" for m in ("base", "entigraph-100", "entigraph-200", "entigraph-300",
                                                   "entigraph-1000")]
    aggregate.aggregate(summaries, table, None, split="test", convention="dropped", headline=head)
    hl = {r["model"]: r for r in csv.DictReader(head.open())}
    assert set(hl) == {"base", "entigraph-100", "entigraph-200", "entigraph-300", "entigraph-1000"}
    bad = hl["entigraph-200"]
    assert (bad["value"], bad["n"], bad["ci_low"], bad["note"]) == ("", "0", "", "no attempted answers")
    assert hl["entigraph-100"]["value"] == "1.0" and hl["entigraph-100"]["note"] == ""
    wrong = next(r for r in csv.DictReader(table.open()) if r["model"] == "entigraph-200"
                 and (r["split"], r["convention"], r["metric"]) == ("test", "wrong", "accuracy"))
    assert (wrong["value"], wrong["n"]) == ("0.0", "8")  # counted wrong, the same model has a number

    fit_json = tmp_path / "scaling_fit.json"
    assert fit_scaling.main(["--table", str(table), "--config-json", json.dumps({"figures": {"fit": {"n_starts": 2}}}),
                             "--output", str(fit_json)]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 model(s) without a value: entigraph-200/cot (no attempted answers)" in err
    fit = json.loads(fit_json.read_text())
    (f,) = fit["fits"]
    assert f["method"] == "entigraph" and f["n_points"] == 3  # 100, 300, 1000: the empty one left out
    assert fit["skipped"] == [{"model": "entigraph-200", "mode": "cot", "note": "no attempted answers"}]
    assert "skipped 1 model(s)" in fit["note"]
    drawn = figures.plot_scaling(table, fit_json, {"figures": {"dpi": 50}}, [tmp_path / "s.png"])
    assert drawn["missing"] == fit["skipped"] and drawn["series"][0]["points"] == 3
    assert drawn["plotted"] == "test split (last 80% of articles), unparseable dropped"
    # A value that is there but not a number is still a one-line error naming the line.
    text = table.read_text().splitlines()
    line = next(i for i, t in enumerate(text) if t.startswith("entigraph-100,") and ",True," in t)
    text[line] = text[line].replace(",1.0,", ",abc,", 1)
    table.write_text("\n".join(text) + "\n")
    with pytest.raises(fit_scaling.InputError, match=rf"qa_accuracy.csv:{line + 1}: value is not a number"):
        fit_scaling.read_accuracy_table(table)


@pytest.mark.unit
def test_old_summaries_without_a_split_still_aggregate_for_all_questions(tmp_path):
    path = tmp_path / "base.json"
    path.write_text(json.dumps({"model": "base", "modes": {"loglik": {"accuracy": 0.5, "ci_low": 0.1,
                                                                      "ci_high": 0.9, "n": 4}}}))
    aggregate.aggregate([path], tmp_path / "t.csv", None)
    (row,) = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert (row["value"], row["n"], row["split"], row["convention"], row["headline"]) == ("0.5", "4", "all", "wrong",
                                                                                         "True")
    with pytest.raises(aggregate.InputError, match="re-run its evaluation"):
        aggregate.aggregate([path], tmp_path / "t.csv", None, split="test")


@pytest.mark.unit
def test_the_figure_says_which_number_is_plotted_and_the_reference_convention(tmp_path):
    from workflow_scripts import figures

    table = tmp_path / "t.csv"
    common = {"mode": "cot", "metric": "accuracy", "split": "test", "convention": "dropped",
              "split_label": "test split (last 80% of articles)", "headline": True}
    rows = [{"model": "base", "method": "base", "budget_tokens": "", "value": 0.3, "ci_low": 0.2, "ci_high": 0.4,
             "n": 10, **common},
            {"model": "base", "method": "base", "budget_tokens": "", "value": 0.1, "ci_low": 0.0, "ci_high": 0.4,
             "n": 10, **common, "split": "all", "split_label": "all questions", "headline": False},
            {"model": "entigraph-100", "method": "entigraph", "budget_tokens": 100, "value": 0.4, "ci_low": 0.3,
             "ci_high": 0.5, "n": 10, **common}]
    with table.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    drawn = figures.plot_scaling(table, None, {"figures": {}}, [tmp_path / "s.png"])
    assert drawn["plotted"] == "test split (last 80% of articles), unparseable dropped"
    assert drawn["levels"] == ["base"] and drawn["missing"] == []
    assert paper_reference.CONVENTION == "dropped" and "unverified" in paper_reference.CONVENTION_SHORT


# ----------------------------------------------------------------------------------------------- item 4: RAG
@pytest.mark.unit
def test_the_authors_rag_template_is_their_file_verbatim():
    ours = (ROOT / "workflow_scripts" / "prompts" / "quality_retrieval_icl.txt").read_bytes()
    if SHARED_ICL.exists():
        assert ours == SHARED_ICL.read_bytes()
    assert ours.count(b"## Example ") == 6 and ours.endswith(b"{contexts}{formatted_question_and_choices}")
    assert "quality_retrieval_icl.txt" in (ROOT / "workflow_scripts" / "prompts" / "README.md").read_text()


@pytest.mark.unit
def test_rag_prompt_matches_the_reference_format_byte_for_byte():
    template = qa_eval.load_prompt_template("quality_retrieval_icl.txt")
    article = {"uid": "a", "title": "The Glass Orchard", "author": "Vance, Mira", "year": 1958}
    question = {"qid": "q", "question": "Who planted the orchard? ", "options": ["Mira", "Tom ", "Ann", "Bo"]}
    best_first = ["Title: The Glass Orchard\nAuthor: Mira Vance\nYear Written: 1958\n\nMira planted it.",
                  "Title: The Glass Orchard\nAuthor: Mira Vance\nYear Written: 1958\n\nTom watered it."]
    got = rag.render_authors_prompt(template, best_first, question, article)
    # Written out by hand from inference/retrieval.py and tasks/quality.py of the authors' repository: chunk i as
    # `*Context i*\n{chunk}\n\n`, most relevant last; the question block with sep_after_question = "\n\n".
    tail = ("## Example 6\n\n### Instructions\nAnswer the following question using the 2 supporting contexts below."
            "\n\n*Context 1*\nTitle: The Glass Orchard\nAuthor: Mira Vance\nYear Written: 1958\n\nTom watered it.\n\n"
            "*Context 2*\nTitle: The Glass Orchard\nAuthor: Mira Vance\nYear Written: 1958\n\nMira planted it.\n\n"
            "### Question\nIn the context of \"The Glass Orchard\", written by Mira Vance in 1958, who planted the "
            "orchard?  There is only one correct choice.\n\n### Choices\nA. Mira\nB. Tom \nC. Ann\nD. Bo\n\n"
            "### Thought Process and Answer\nThought process:")
    head = template[:template.index("## Example 6\n")]
    assert got == head + tail
    assert got.startswith(rag.template_head(template)) and rag.template_head(template).endswith("using the ")


@pytest.mark.unit
def test_rag_top_k_and_temperature_per_model():
    ecfg = validate_config({"evaluation": {"cot": {"temperature": 0.1}, "rag": {
        "top_k": 8, "per_model": {"base": {"top_k": 16}, "entigraph": {"temperature": 0.5}}}}})["evaluation"]
    assert rag.rag_settings(ecfg["rag"], ecfg, "base") == (16, 0.1)
    assert rag.rag_settings(ecfg["rag"], ecfg, "entigraph-455000000") == (8, 0.5)
    assert rag.rag_settings(ecfg["rag"], ecfg, "raw-all") == (8, 0.1)


@pytest.mark.unit
def test_rag_run_uses_the_authors_prompt_and_per_model_settings(tmp_path, monkeypatch):
    arts = [{"uid": "a", "title": "Orchard", "author": "Vance, Mira", "year": 1958,
             "text": "Mira planted the glass orchard.\n\nTom watered it every day."},
            {"uid": "b", "title": "Race", "author": None, "year": None, "text": "Luca won the race at Monza."}]
    qs = [{"qid": "q1", "article_uid": "a", "question": "Who planted the orchard?", "options": list("MTAB"),
           "gold": 0}]
    qp, ap = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    qp.write_text("".join(json.dumps(q) + "\n" for q in qs))
    ap.write_text("".join(json.dumps(a) + "\n" for a in arts))
    seen = []

    class Recorder(Scripted):
        def generate(self, requests):
            seen.extend(requests)
            yield from super().generate(requests)

    monkeypatch.setattr(qa_eval, "make_backend", lambda cfg, engine, model: Recorder({"q1": [" Answer: A.\n"]}))
    cfg = validate_config({"evaluation": {"modes": ["cot"], "ci": {"bootstrap": 0}, "rag": {
        "enabled": True, "chunk_size": 40, "top_k": 1, "retrievers": ["bm25"], "retriever": "bm25",
        "per_model": {"base": {"top_k": 2, "temperature": 0.7}}}}})
    s = rag.run(cfg, "base", "m", str(qp), str(ap), tmp_path / "r.jsonl", tmp_path / "r.json")
    assert s["retrieval"]["top_k"] == 2 and s["temperature"] == 0.7 and s["prompt_layout"] == "authors_icl"
    assert seen[0].temperature == 0.7
    assert "using the 2 supporting contexts below.\n\n*Context 1*\n" in seen[0].prompt
    assert seen[0].prompt.endswith("D. B\n\n### Thought Process and Answer\nThought process:")
    assert s["accuracy"] == 1.0 and s["modes"]["cot"]["reported"]["all"]["wrong"]["n"] == 1


# ----------------------------------------------------------------------------------------------- item 5: replay
@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from workflow_scripts.corpus import load_tokenizer, special_tokens

    t = load_tokenizer(str(tiny_model_dir))
    return t, special_tokens(t, section_defaults("corpus"))


def write_docs(folder: Path, n: int = 40) -> list[str]:
    """n distinct documents as JSONL (with a BOM), parquet and text files in one folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"Document {i} tells of the harbour town number {i} and its {i * 7} boats. " * 6 for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"text": d, "meta": {}}) + "\n"
                                                            for d in docs[:20]).encode())
    pq.write_table(pa.table({"text": docs[20:35]}), folder / "b.parquet")
    for i, d in enumerate(docs[35:]):
        (folder / "c" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (folder / "c" / f"{i}.txt").write_text(d, encoding="utf-8")
    return docs


@pytest.mark.unit
def test_replay_reads_jsonl_parquet_and_text_folders(tmp_path):
    from workflow_scripts import replay

    docs = write_docs(tmp_path / "src")
    assert replay.load_documents(tmp_path / "src") == docs  # path order: a.jsonl, b.parquet, c/0.txt ...
    with pytest.raises(replay.InputError, match="Hub datasets are not read directly"):
        replay.source_files("togethercomputer/RedPajama-Data-1T-Sample")


@pytest.mark.engine
def test_replay_shuffles_holds_out_and_draws_random_blocks_of_a_pool(tmp_path, tok):
    from workflow_scripts import replay

    t, specials = tok
    docs = write_docs(tmp_path / "src")
    order, held = replay.shuffle_split(len(docs), 42, 0.1)
    assert len(held) == 4 and sorted(order.tolist() + held.tolist()) == list(range(40))
    assert order.tolist() != sorted(order.tolist())                          # shuffled with the seed
    assert replay.shuffle_split(len(docs), 42, 0.1)[1].tolist() == held.tolist()
    assert len(replay.shuffle_split(1, 42, 0.01)[1]) == 0                    # one document is never held out
    rp = {"source": str(tmp_path / "src"), "text_field": "text", "heldout_fraction": 0.1, "max_tokens": 10_000,
          "cache_dir": str(tmp_path / "cache")}
    pool = replay.replay_pool(rp, t, specials, seed=42)
    first = t(docs[order[0]], add_special_tokens=False)["input_ids"]
    assert list(pool[: len(first)]) == first or list(pool[1: len(first) + 1]) == first  # [BOS] text of a shuffled doc
    held_text = t(docs[held[0]], add_special_tokens=False)["input_ids"][:20]
    assert replay.overlap_fraction(np.asarray(held_text), [pool], n=20) == 0.0  # held-out text is not in the pool
    assert list((tmp_path / "cache").glob("pool-*.npy"))                    # tokenized once, reused
    assert np.array_equal(replay.replay_pool(rp, t, specials, seed=42), pool)
    blocks = replay.replay_blocks(rp, t, specials, 16, 200, seed=42)  # the same seed: the same pool
    pool_blocks = {tuple(b) for b in replay.to_blocks(np.asarray(pool), 16).tolist()}
    assert blocks.shape == (200, 16) and all(tuple(b) in pool_blocks for b in blocks.tolist())
    drawn = {tuple(b) for b in blocks.tolist()}
    assert len(drawn) > 0.5 * min(200, len(pool_blocks))                   # spread over the pool,
    assert tuple(blocks[0]) != tuple(pool[:16]) or tuple(blocks[1]) != tuple(pool[16:32])  # not its first tokens


@pytest.mark.unit
def test_replay_prepare_turns_a_downloaded_sample_into_local_jsonl(tmp_path):
    from workflow_scripts import replay

    sample = tmp_path / "RedPajama-Data-1T-Sample"
    sample.mkdir()
    recs = [{"text": "\ufeffA wiki page about owls.", "meta": {"url": "x"}}, {"text": "  ", "meta": {}},
            {"text": "An arXiv abstract on tides.", "meta": {}}]
    (sample / "wikipedia_sample.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))
    (sample / "arxiv_sample.jsonl").write_text(json.dumps(recs[2]) + "\n")
    out = tmp_path / "prepared"
    r = subprocess_run([sys.executable, "-m", "workflow_scripts.replay", "prepare", "--input", str(sample),
                        "--output", str(out), "--shard-documents", "1"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["documents"] == 2
    assert replay.load_documents(out) == ["An arXiv abstract on tides.", "A wiki page about owls."]
    assert json.loads((out / "manifest.json").read_text())["empty_skipped"] == 1


@pytest.mark.unit
def test_no_overlay_reads_a_hub_dataset():
    from workflow_scripts.config import load_config

    for overlay in ("paper", "single-gpu", "paper-api"):
        files = [ROOT / "config.yaml", ROOT / "experiments" / "paper.yaml"] if overlay == "paper-api" else []
        cfg = load_config((files or [ROOT / "config.yaml"]) + [ROOT / "experiments" / f"{overlay}.yaml"])
        for src in (cfg["cpt"]["replay"]["source"], cfg["cpt"]["probe"]["source"]):
            assert src == "replay:heldout" or not src.startswith("togethercomputer/"), (overlay, src)


# ----------------------------------------------------------------------------------------------- item 6: probe
@pytest.mark.engine
def test_probe_overlapping_training_data_or_articles_is_refused(tmp_path, tok):
    from workflow_scripts import replay

    t, specials = tok
    story = (ROOT / "resources" / "replay" / "reluctant_heroes.txt").read_text(encoding="utf-8")
    other = (ROOT / "resources" / "replay" / "jaywalker.txt").read_text(encoding="utf-8")
    enc = lambda s: np.asarray(t(s, add_special_tokens=False)["input_ids"], np.int32)  # noqa: E731
    cpt = validate_config({"cpt": {"probe": {"source": str(ROOT / "resources/replay/reluctant_heroes.txt"),
                                             "max_tokens": 256}}})["cpt"]
    arts = tmp_path / "articles.jsonl"
    arts.write_text(json.dumps({"uid": "x", "text": other}) + "\n")
    blocks, found = replay.probe_blocks(cpt, t, specials, 64, 0, [enc(other)], arts)
    assert blocks.shape == (4, 64) and found == {"training": 0.0, "articles": 0.0}
    with pytest.raises(replay.InputError, match=r"occur in the tokens this run trains on"):
        replay.probe_blocks(cpt, t, specials, 64, 0, [enc(other), enc(story[:3000])], None)
    arts.write_text(json.dumps({"uid": "x", "text": story}) + "\n")
    with pytest.raises(replay.InputError, match=r"occur in the prepared articles"):
        replay.probe_blocks(cpt, t, specials, 64, 0, [enc(other)], arts)


@pytest.mark.engine
def test_the_held_out_probe_is_disjoint_from_replay(tmp_path, tok):
    from workflow_scripts import replay

    t, specials = tok
    write_docs(tmp_path / "src")
    cpt = validate_config({"cpt": {"replay": {"source": str(tmp_path / "src"), "heldout_fraction": 0.1},
                                   "probe": {"source": "replay:heldout", "max_tokens": 64}}})["cpt"]
    rb = replay.replay_blocks(cpt["replay"], t, specials, 16, 50, seed=3)
    blocks, found = replay.probe_blocks(cpt, t, specials, 16, 3, [rb], None)
    assert blocks.shape == (4, 16) and found["training"] == 0.0


@pytest.mark.unit
def test_single_gpu_probe_is_not_a_quality_article():
    from workflow_scripts.config import load_config

    cfg = load_config([ROOT / "config.yaml", ROOT / "experiments" / "single-gpu.yaml"])
    assert cfg["cpt"]["probe"]["source"] == "replay:heldout"


# ----------------------------------------------------------------------------------------------- item 7: paper.yaml
@pytest.mark.unit
def test_paper_overlay_matches_the_paper():
    from workflow_scripts.config import load_config

    cfg = load_config([ROOT / "config.yaml", ROOT / "experiments" / "paper.yaml"])
    budgets = cfg["cpt"]["budgets"]
    assert len(budgets) == 37 and 450_450_000 in budgets and budgets == sorted(budgets)
    assert [b / 1e6 for b in budgets] == pytest.approx(list(paper_reference.BUDGETS_MILLIONS))
    assert cfg["synthesis"]["entigraph"]["max_new_tokens"] == 4096
    assert cfg["synthesis"]["entigraph"]["triple_order"] == "reference"
    assert "599" in (ROOT / "docs" / "cpt.md").read_text() and "455M" in (ROOT / "docs" / "cpt.md").read_text()
    assert cfg["evaluation"]["rag"]["per_model"]["base"]["top_k"] == 16


@pytest.mark.unit
def test_the_authors_triple_order():
    import itertools
    import random

    from workflow_scripts import entigraph

    ents = [f"e{i}" for i in range(7)]
    want = list(itertools.combinations(ents, 3))
    random.seed(42)          # what data/entigraph.py does before its shuffle
    random.shuffle(want)
    assert entigraph.reference_triples(ents, None, 42) == want
    assert entigraph.reference_triples(ents, 5, 42) == want[:5]
    cfg = validate_config({"synthesis": {"entigraph": {"triple_order": "reference", "max_triples": 3}}})
    tasks = entigraph.EntiGraph("entigraph", cfg).plan(
        {"uid": "a", "title": "T", "author": None, "year": None, "text": "x"}, {"entities": ents, "status": "ok"})
    assert [tuple(tk.entities) for tk in tasks if tk.kind == "triple"] == want[:3]


# ----------------------------------------------------------------------------------------------- item 8: BOM
@pytest.mark.unit
def test_inputs_with_a_byte_order_mark_are_read(tmp_path):
    from workflow_scripts import quality
    from workflow_scripts.io_utils import read_jsonl

    bom = b"\xef\xbb\xbf"
    p = tmp_path / "q.jsonl"
    p.write_bytes(bom + b'{"a": 1}\n{"a": 2}\n')
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "one.txt").write_bytes(bom + "Öl und Wasser.".encode())
    prep = quality.Prepared()
    quality.read_folder(folder, prep)
    assert prep.articles["one"]["text"] == "Öl und Wasser."
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(bom + json.dumps({"uid": "d1", "title": "T", "text": "body"}).encode() + b"\n")
    quality.read_jsonl_corpus(corpus, prep)
    qs = tmp_path / "qs.jsonl"
    qs.write_bytes(bom + json.dumps({"qid": "1", "article_uid": "d1", "question": "?", "options": list("abcd"),
                                     "gold": 0}).encode() + b"\n")
    quality.read_questions_file(qs, prep)
    assert prep.articles["d1"]["text"] == "body" and prep.questions["1"]["article_uid"] == "d1"
    rows = list(parse_jsonl(bom + b'{"article_id": "x"}\n', "QuALITY.v1.0.1.htmlstripped.dev"))  # zip members
    assert rows == [(1, {"article_id": "x"})]
    prefix = qa_eval.load_prompt_template()
    (tmp_path / "mine.txt").write_bytes(bom + b"%% my prefix\n" + prefix.encode())  # a user's own prefix file
    assert qa_eval.load_prompt_template(tmp_path / "mine.txt") == prefix


def subprocess_run(cmd, **kw):
    import subprocess

    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


# ----------------------------------------------------------------------------------------------- item 9: one line
def _one_line_error(r, *needles: str) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert lines and lines[-1].startswith("error: ") and all(n in lines[-1] for n in needles), r.stderr


@pytest.fixture(scope="module")
def qa_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("qa")
    (d / "a.jsonl").write_text(json.dumps({"uid": "a", "title": "T", "author": None, "year": None, "text": "x"}) + "\n")
    (d / "q.jsonl").write_text(json.dumps({"qid": "q", "article_uid": "a", "question": "Why?",
                                           "options": list("abcd"), "gold": 0}) + "\n")
    return d


def _qa_cli(d: Path, model_id: str, cfg: dict | str, env: dict | None = None):
    return subprocess_run([sys.executable, "-m", "workflow_scripts.qa_eval", "--model-id", model_id,
                           "--model-path", "" if model_id.startswith("api-") else "some/model",
                           "--questions", str(d / "q.jsonl"), "--articles", str(d / "a.jsonl"),
                           "--output-jsonl", str(d / "o.jsonl"), "--output-json", str(d / "o.json"),
                           "--config-json", cfg if isinstance(cfg, str) else json.dumps(cfg)],
                          env={**os.environ, **(env or {})})


@pytest.mark.engine
def test_missing_api_key_is_one_line(qa_inputs):
    cfg = {"evaluation": {"modes": ["cot"], "api_models": [{"name": "g", "model": "gpt-4-turbo"}]},
           "backends": {"openai": {"api_key_env": "ISSUE12_SURELY_UNSET_KEY"}}}
    _one_line_error(_qa_cli(qa_inputs, "api-g", cfg), "ISSUE12_SURELY_UNSET_KEY", "not set")


@pytest.mark.engine
def test_missing_engine_is_one_line(qa_inputs, tmp_path):
    pytest.importorskip("torch")
    # An interpreter without the engine, also where the --vllm extra is installed (as in CI): a module named vllm
    # that fails to import stands in front of any installed one.
    hide = tmp_path / "without_vllm"
    hide.mkdir()
    (hide / "vllm.py").write_text("raise ImportError('No module named vllm (hidden by the test)')\n")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(hide), os.environ.get("PYTHONPATH", "")) if p)}
    _one_line_error(_qa_cli(qa_inputs, "base", {"evaluation": {"modes": ["cot"], "cot": {"engine": "vllm"}}}, env),
                    "vllm backend needs", "bootstrap.sh --vllm")


@pytest.mark.engine
def test_invalid_config_override_is_one_line(qa_inputs):
    _one_line_error(_qa_cli(qa_inputs, "base", {"seed": "abc", "evaluation": {"cot": {"n": 0}}}),
                    "invalid configuration", "seed", "evaluation.cot.n")
    _one_line_error(_qa_cli(qa_inputs, "base", "{not json"), "--config-json: not valid JSON")
    # Snakemake's own parsing of the same override: tests/test_workflow_checks.py


# ----------------------------------------------------------------------------------------------- item 10: docs
@pytest.mark.unit
def test_docs_say_what_the_reference_and_the_overlay_do():
    from workflow_scripts.config import load_config

    readme = (ROOT / "workflow_scripts" / "prompts" / "README.md").read_text(encoding="utf-8")
    # The current reference relation prompts equal the paper's; only another stored version adds questions.
    assert "commit bbd8ac3c" in readme and "862d07a7" in readme and "no questions" in readme
    # How the few-shot thought processes open, checked against the prefix itself.
    prefix = qa_eval.load_prompt_template()
    openings = [ln[len("Thought process: "):] for ln in prefix.splitlines() if ln.startswith("Thought process: ")]
    assert len(openings) == 5 and sum(o.startswith("In ") for o in openings) == 4 and openings[0].startswith('"')
    ev = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8")
    assert "do not\n  open with the option's text" in ev and "four of the five open with the work's author" in ev
    # allow_budget_cap: the docs describe what experiments/paper.yaml sets.
    cfg = load_config([ROOT / "config.yaml", ROOT / "experiments" / "paper.yaml"])
    cpt_doc = (ROOT / "docs" / "cpt.md").read_text(encoding="utf-8")
    assert cfg["cpt"]["allow_budget_cap"] is True
    assert "`experiments/paper.yaml` sets `allow_budget_cap: true`" in cpt_doc
    assert "the paper's setting is false" not in cpt_doc


@pytest.mark.unit
def test_prepare_keeps_the_raw_title_the_split_sorts_by():
    from workflow_scripts import quality

    prep = quality.Prepared()
    rec = {"article_id": "1", "title": " Zebra", "author": "A", "article": "text", "questions": []}
    quality.add_quality_records(prep, [("train", "train.jsonl", 1, rec),
                                       ("train", "train.jsonl", 2, {**rec, "article_id": "2", "title": "Apple"})])
    arts = list(prep.articles.values())
    assert arts[0]["title"] == "Zebra" and arts[0]["title_raw"] == " Zebra" and "title_raw" not in arts[1]
    assert [a["uid"] for a in qa_eval.split_order(arts)] == ["1", "2"]  # " Zebra" sorts before "Apple"
