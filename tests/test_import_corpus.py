"""Importing an existing synthetic corpus (issue 14): a small local parquet in the authors' released schema (uid
"{title} by {author}" with the raw title's leading space, texts joined by the literal <|entigraphseptoekn|>),
JSONL records joined by uid or title, unmatched rows counted, malformed rows named in one clear line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflow_scripts.import_corpus import import_corpus, main
from workflow_scripts.io_utils import InputError, read_jsonl, write_jsonl_atomic

pytestmark = pytest.mark.unit

SEP = "<|entigraphseptoekn|>"
ARTICLES = [{"uid": "30029", "title": "Lost in Translation", "author": "Janifer, Laurence M.", "text": "..."},
            {"uid": "62139", "title": "Captain Chaos", "author": "Bond, Nelson S.", "text": "..."}]


def authors_parquet(path, rows, row_group_size=1):
    table = pa.table({"uid": [r[0] for r in rows], "raw": ["article text"] * len(rows),
                      "entity": [f"Korvin{'<|entityseptoekn|>'}Tr'en"] * len(rows),
                      "entigraph": [r[1] for r in rows]})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def spec(path, **kw):
    return {"path": str(path), "schema": "auto", "separator": SEP, "text_field": "text", "uid_field": "uid",
            "title_field": "title", **kw}


def test_authors_parquet_splits_on_the_literal_separator_and_counts_unmatched_rows(tmp_path):
    path = authors_parquet(tmp_path / "train.parquet", [
        (" Lost in Translation by Janifer, Laurence M.", f"A summary of the story.{SEP}Korvin and the Tr'en.{SEP} "),
        (" Captain Chaos by Bond, Nelson S.", "One text only."),
        (" The Gravity Business by Gunn, James E.", f"x{SEP}y"),  # an article this run did not prepare
    ])
    records, report = import_corpus("entigraph_released", spec(path), ARTICLES)
    assert report["schema"] == "authors"
    assert report["rows"] == 3 and report["matched_rows"] == 2 and report["unmatched_rows"] == 1
    assert report["unmatched_examples"] == [" The Gravity Business by Gunn, James E."]
    assert report["texts"] == 5 and report["records"] == 3 and report["articles_covered"] == 2
    assert [(r["article_uid"], r["text"]) for r in records] == [
        ("30029", "A summary of the story."), ("30029", "Korvin and the Tr'en."), ("62139", "One text only.")]
    assert all(r["method"] == "entigraph_released" and r["kind"] == "imported" for r in records)
    assert len({r["id"] for r in records}) == 3
    # ids are stable: the same file imports to the same ids (the corpus order depends on them)
    assert [r["id"] for r in import_corpus("entigraph_released", spec(path), ARTICLES)[0]] == [r["id"] for r in records]


def test_jsonl_records_join_by_uid_or_title(tmp_path):
    path = tmp_path / "mine.jsonl"
    write_jsonl_atomic(path, [{"uid": "30029", "text": "By uid."}, {"title": "  captain CHAOS ", "text": "By title."},
                              {"title": "Unknown", "text": "No article."}, {"uid": "62139", "text": "  "}])
    records, report = import_corpus("mine", spec(path), ARTICLES)
    assert report["schema"] == "records"
    assert [(r["article_uid"], r["text"]) for r in records] == [("30029", "By uid."), ("62139", "By title.")]
    assert report["unmatched_rows"] == 1 and report["matched_rows"] == 3 and report["records"] == 2


@pytest.mark.parametrize("rows,match", [
    ([{"uid": "30029", "text": "ok"}, {"uid": "30029", "body": "no text"}], r"mine.jsonl:2: malformed row, no text"),
    ([{"uid": "30029", "text": 5}], r"mine.jsonl:1: malformed row, 'text' is int"),
    ([{"text": "whose?"}], r"mine.jsonl:1: malformed row, neither 'uid' nor 'title'"),
])
def test_a_malformed_jsonl_row_is_named(tmp_path, rows, match):
    path = tmp_path / "mine.jsonl"
    write_jsonl_atomic(path, rows)
    with pytest.raises(InputError, match=match):
        import_corpus("mine", spec(path), ARTICLES)


def test_a_malformed_parquet_row_is_named_on_the_command_line(tmp_path, capsys):
    path = authors_parquet(tmp_path / "train.parquet", [(" Lost in Translation by Janifer, Laurence M.", "fine"),
                                                         (" Captain Chaos by Bond, Nelson S.", None)])
    arts = tmp_path / "articles.jsonl"
    write_jsonl_atomic(arts, ARTICLES)
    cfg = json.dumps({"imports": {"released": {"path": str(path)}}})
    out = tmp_path / "out" / "records.jsonl"
    code = main(["--name", "released", "--articles", str(arts), "--output", str(out),
                 "--report", str(tmp_path / "out" / "report.json"), "--config-json", cfg])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "train.parquet row 2: malformed row, column 'entigraph' is NoneType" in err[0]
    assert not out.exists()


def test_no_matching_row_and_a_missing_file_are_clear_errors(tmp_path, capsys):
    path = authors_parquet(tmp_path / "t.parquet", [(" Other by Someone", "x")])
    with pytest.raises(InputError, match="none of the 1 rows matches a prepared article"):
        import_corpus("x", spec(path), ARTICLES)
    with pytest.raises(InputError, match="import source not found"):
        import_corpus("x", spec(tmp_path / "missing.parquet"), ARTICLES)
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(InputError, match="not a readable parquet file"):
        import_corpus("x", spec(bad), ARTICLES)


def test_the_command_writes_records_the_corpus_stage_reads(tmp_path):
    from workflow_scripts.corpus import load_records

    path = authors_parquet(tmp_path / "train.parquet",
                           [(" Lost in Translation by Janifer, Laurence M.", f"a b{SEP}c d")])
    arts = tmp_path / "articles.jsonl"
    write_jsonl_atomic(arts, ARTICLES)
    out = tmp_path / "imported" / "released"
    code = main(["--name", "released", "--articles", str(arts), "--output", str(out / "records.jsonl"),
                 "--report", str(out / "report.json"),
                 "--config-json", json.dumps({"imports": {"released": {"path": str(path)}}})])
    assert code == 0
    docs, stats = load_records("released", [out / "records.jsonl"])
    assert sorted(d["text"] for d in docs) == ["a b", "c d"] and stats["dropped"]["empty_text"] == 0
    assert json.loads((out / "report.json").read_text())["records"] == 2
    assert len(read_jsonl(out / "records.jsonl")) == 2
