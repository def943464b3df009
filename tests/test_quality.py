"""Data stage (issue 2): download_quality and prepare_articles on the vendored sample, the official-count check,
a user's own corpus, and every bad-input case (fail with file:line, or drop with a count)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from workflow_scripts import quality
from workflow_scripts.config import validate_config
from workflow_scripts.io_utils import InputError, read_jsonl

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_SHA = "ad807ea26f306f103c04407c6d94e35f15a15abf6e53d9a43e95b745e20c4095"


def qset(article_id="10001", set_id="10001_AAAA", title="A Story", author="Doe, Jane", text="Once upon a time.",
         questions=None, **extra):
    qs = questions if questions is not None else [
        {"question": "Who?", "question_unique_id": f"{set_id}_1", "options": ["a", "b", "c", "d"], "gold_label": 2,
         "difficult": 1},
    ]
    rec = {"article_id": article_id, "set_unique_id": set_id, "batch_num": "11", "writer_id": "1", "source": "Gutenberg",
           "title": title, "year": 1950, "author": author, "topic": "SF", "article": text, "questions": qs}
    rec.update(extra)
    return rec


def make_zip(path: Path, train: list, dev: list, raw_lines: dict | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for split, recs in (("train", train), ("dev", dev)):
            body = (raw_lines or {}).get(split)
            if body is None:
                body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
            z.writestr(f"QuALITY.v1.0.1/QuALITY.v1.0.1.htmlstripped.{split}", body)
    return path


def cfg(**data) -> dict:
    return validate_config({"data": data})


def run_prepare(tmp_path: Path, zip_path: Path, **data) -> tuple[list, list, dict]:
    stats = quality.prepare(cfg(**data), zip_path, tmp_path / "out")
    return read_jsonl(tmp_path / "out/articles.jsonl"), read_jsonl(tmp_path / "out/questions.jsonl"), stats


# ------------------------------------------------------------------------------------------- the vendored sample
def test_download_local_sample_verifies_checksum(tmp_path, sample_zip):
    out = tmp_path / "q.zip"
    info = quality.download(str(sample_zip), out, SAMPLE_SHA)
    assert out.exists() and info["sha256"] == SAMPLE_SHA
    out2 = tmp_path / "q2.zip"
    quality.download(sample_zip.resolve().as_uri(), out2, SAMPLE_SHA)  # file:// URL, same code path
    assert out2.read_bytes() == sample_zip.read_bytes()


def test_prepare_sample_counts_and_gold(tmp_path, sample_zip):
    arts, qs, stats = run_prepare(tmp_path, sample_zip)
    # mini/README.md: 15 articles (all dev, train empty), 184 QuALITY questions.
    assert len(arts) == 15 and len(qs) == 184
    assert stats["articles"] == 15 and stats["questions"] == 184 and stats["dropped"] == {}
    assert {a["uid"] for a in arts} >= {"30029", "62139", "20007", "51027"}
    assert all(set(a) >= {"uid", "title", "author", "year", "text", "n_chars"} for a in arts)
    assert all(a["n_chars"] == len(a["text"]) > 1000 for a in arts)
    assert all(len(q["options"]) == 4 and 0 <= q["gold"] <= 3 for q in qs)
    assert len({q["qid"] for q in qs}) == 184
    # Gold indices are the official 1-indexed gold_label minus one: check against the raw zip.
    raw = {}
    for _, _, _, rec in quality.read_quality_zip(sample_zip, ["dev"]):
        for q in rec["questions"]:
            if q["question_unique_id"]:
                raw[q["question_unique_id"]] = q["gold_label"]
    checked = [q for q in qs if q["qid"] in raw]
    assert len(checked) == 107  # questions whose official ids were recovered (mini/README.md)
    assert all(q["gold"] == raw[q["qid"]] - 1 for q in checked)
    per_article = {a["uid"]: sum(q["article_uid"] == a["uid"] for q in qs) for a in arts}
    assert per_article["30029"] == 13 and per_article["51027"] == 11


def test_demo_selection_truncates(tmp_path, sample_zip):
    arts, qs, stats = run_prepare(tmp_path, sample_zip, max_articles=3, max_article_chars=2500)
    assert [a["uid"] for a in arts] == ["30029", "62139", "61119"]  # file order
    assert all(len(a["text"]) <= 2500 for a in arts)
    assert {q["article_uid"] for q in qs} == {"30029", "62139", "61119"} and len(qs) == 13 + 8 + 16
    assert stats["selection"]["truncated_articles"] == 3


def test_cli_prepare_matches_function(tmp_path, sample_zip):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "workflow_scripts.quality", "prepare", "--config-json",
                        json.dumps({"data": {"max_articles": 2}}), "--zip", str(sample_zip), "--outdir", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert len(read_jsonl(out / "articles.jsonl")) == 2
    assert json.loads(r.stdout)["selected_articles"] == 2


# ------------------------------------------------------------------------------------------- merging and counts
def test_two_writers_and_splits_merge(tmp_path):
    a1 = qset(set_id="10001_W1", questions=[{"question": "Q1", "question_unique_id": "10001_W1_1",
                                              "options": list("abcd"), "gold_label": 1}])
    a2 = qset(set_id="10001_W2", questions=[{"question": "Q2", "question_unique_id": "10001_W2_1",
                                              "options": list("abcd"), "gold_label": 4}])
    b = qset(article_id="10002", set_id="10002_W1", title="Other", text="Text two.")
    z = make_zip(tmp_path / "q.zip", [a1, a2], [b])
    arts, qs, stats = run_prepare(tmp_path, z)
    assert [a["uid"] for a in arts] == ["10001", "10002"]
    assert sorted((q["qid"], q["gold"]) for q in qs if q["article_uid"] == "10001") == [("10001_W1_1", 0), ("10001_W2_1", 3)]
    assert stats["input_lines"] == {"train": 2, "dev": 1}


def test_line_separator_u2028_is_not_a_line_break(tmp_path):
    rec = qset(text="first\u2028second paragraph")
    z = make_zip(tmp_path / "q.zip", [rec], [])
    arts, _, _ = run_prepare(tmp_path, z)
    assert arts[0]["text"] == "first\u2028second paragraph"


def _official_like(n_train_articles=150, n_dev_articles=115, questions=(2523, 2086)):
    """Synthetic zip with the official release's shape: two writer lines per article per split."""
    out = {}
    for split, n_art, n_q, base in (("train", n_train_articles, questions[0], 20000),
                                    ("dev", n_dev_articles, questions[1], 60000)):
        lines, left = [], n_q
        for i in range(n_art):
            for w in range(2):
                k = left // (2 * n_art - len(lines)) if (2 * n_art - len(lines)) else 0
                qs = [{"question": f"q{j}", "question_unique_id": f"{base + i}_{w}_{j}", "options": list("abcd"),
                       "gold_label": 1} for j in range(k)]
                left -= k
                lines.append(qset(article_id=str(base + i), set_id=f"{base + i}_{w}", text=f"text {i}", questions=qs))
        out[split] = lines
    return out


def test_official_counts_checked(tmp_path):
    o = _official_like()
    arts, qs, stats = run_prepare(tmp_path, make_zip(tmp_path / "q.zip", o["train"], o["dev"]))
    assert stats["official_counts_checked"] is True and len(arts) == 265 and len(qs) == 4609


def test_official_counts_mismatch_fails(tmp_path):
    o = _official_like(questions=(2523, 2085))
    with pytest.raises(InputError, match="4609 questions"):
        run_prepare(tmp_path, make_zip(tmp_path / "q.zip", o["train"], o["dev"]))


# ------------------------------------------------------------------------------------------- bad input
def test_malformed_json_line_names_file_and_line(tmp_path):
    body = json.dumps(qset()) + "\n{not json\n"
    z = make_zip(tmp_path / "q.zip", [], [], raw_lines={"train": body, "dev": ""})
    with pytest.raises(InputError, match=r"htmlstripped\.train:2: malformed JSON"):
        run_prepare(tmp_path, z)
    assert not (tmp_path / "out/articles.jsonl").exists()  # nothing half-written


def test_missing_required_field(tmp_path):
    rec = qset()
    del rec["title"]
    with pytest.raises(InputError, match=r"train:1: missing required field\(s\) \['title'\]"):
        run_prepare(tmp_path, make_zip(tmp_path / "q.zip", [rec], []))
    rec = qset(questions=[{"question": "Q", "options": list("abcd")}])
    with pytest.raises(InputError, match=r"train:1 question 0: missing required field\(s\) \['gold_label'\]"):
        run_prepare(tmp_path, make_zip(tmp_path / "q.zip", [rec], []))


@pytest.mark.parametrize("label", [0, 5, "2", None])
def test_gold_label_outside_range(tmp_path, label):
    rec = qset(questions=[{"question": "Q", "question_unique_id": "x1", "options": list("abcd"), "gold_label": label}])
    with pytest.raises(InputError, match=r"train:1 question 0: gold_label .* outside 1\.\.4"):
        run_prepare(tmp_path, make_zip(tmp_path / "q.zip", [rec], []))


def test_question_without_four_options_is_dropped_and_counted(tmp_path):
    rec = qset(questions=[{"question": "Q", "question_unique_id": "x1", "options": list("abc"), "gold_label": 1},
                          {"question": "R", "question_unique_id": "x2", "options": list("abcd"), "gold_label": 1}])
    _, qs, stats = run_prepare(tmp_path, make_zip(tmp_path / "q.zip", [rec], []))
    assert [q["qid"] for q in qs] == ["x2"] and stats["dropped"] == {"not_4_options": 1}


def test_empty_article_dropped_with_its_questions(tmp_path):
    z = make_zip(tmp_path / "q.zip", [qset(text="   \n"), qset(article_id="10002", set_id="s2", title="B")], [])
    arts, qs, stats = run_prepare(tmp_path, z)
    assert [a["uid"] for a in arts] == ["10002"] and all(q["article_uid"] == "10002" for q in qs)
    assert stats["dropped"] == {"empty_article": 1, "question_of_empty_article": 1}


def test_duplicate_question_id(tmp_path):
    q = {"question": "Q", "question_unique_id": "dup", "options": list("abcd"), "gold_label": 1}
    same = make_zip(tmp_path / "a.zip", [qset(questions=[q]), qset(set_id="s2", questions=[dict(q)])], [])
    _, qs, stats = run_prepare(tmp_path, same)
    assert len(qs) == 1 and stats["dropped"] == {"duplicate_question": 1}
    other = make_zip(tmp_path / "b.zip", [qset(questions=[q]), qset(set_id="s2", questions=[dict(q, gold_label=3)])], [])
    with pytest.raises(InputError, match="duplicate question id 'dup' with different content"):
        run_prepare(tmp_path, other)


def test_download_wrong_checksum_leaves_nothing(tmp_path, sample_zip):
    out = tmp_path / "d/q.zip"
    with pytest.raises(InputError, match="sha256 mismatch"):
        quality.download(str(sample_zip), out, "0" * 64)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_download_corrupt_zip_and_missing_file(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(InputError, match="not a valid zip"):
        quality.download(str(bad), tmp_path / "o.zip")
    assert not (tmp_path / "o.zip").exists()
    with pytest.raises(InputError, match="not found; download it elsewhere and set data.quality.url"):
        quality.download(str(tmp_path / "nope.zip"), tmp_path / "o.zip")


def test_download_unreachable_url_says_how_to_use_local_copy(tmp_path):
    # Port 9 on loopback: nothing listens, so the connection is refused at once (no traffic leaves the machine).
    with pytest.raises(InputError, match="could not download .* set data.quality.url"):
        quality.download("http://127.0.0.1:9/QuALITY.v1.0.1.zip", tmp_path / "o.zip", timeout=5)
    assert not (tmp_path / "o.zip").exists()


def test_cli_error_is_clear_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "workflow_scripts.quality", "download", "--url", str(tmp_path / "x.zip"),
                        "--output", str(tmp_path / "o.zip")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------- a user's own corpus
def test_custom_folder(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("Alpha document text.", encoding="utf-8")
    (docs / "sub" / "b.md").write_text("# Beta Title\n\nBeta body.", encoding="utf-8")
    (docs / "empty.txt").write_text("  \n", encoding="utf-8")
    (docs / "ignored.pdf").write_bytes(b"%PDF")
    c = validate_config({"data": {"source": "folder", "custom": {"path": str(docs)}}})
    stats = quality.prepare(c, None, tmp_path / "out")
    arts = read_jsonl(tmp_path / "out/articles.jsonl")
    assert [(a["uid"], a["title"]) for a in arts] == [("a", "a"), ("sub-b", "Beta Title")]
    assert stats["dropped"] == {"empty_document": 1} and read_jsonl(tmp_path / "out/questions.jsonl") == []


def test_custom_folder_non_utf8_fails(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    c = validate_config({"data": {"source": "folder", "custom": {"path": str(docs)}}})
    with pytest.raises(InputError, match=r"latin1\.txt: not valid UTF-8"):
        quality.prepare(c, None, tmp_path / "out")


def test_custom_jsonl_with_questions(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"uid": "p1", "title": "Paper One", "text": "We propose X.", "author": "Ann Lee",
                                  "year": 2024}) + "\n", encoding="utf-8")
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"qid": "p1-q1", "article_uid": "p1", "question": "What?", "options": list("wxyz"),
                                 "gold": 0}) + "\n", encoding="utf-8")
    c = validate_config({"data": {"source": "jsonl", "custom": {"path": str(corpus), "questions": str(qfile)}}})
    quality.prepare(c, None, tmp_path / "out")
    assert read_jsonl(tmp_path / "out/articles.jsonl")[0]["title"] == "Paper One"
    assert read_jsonl(tmp_path / "out/questions.jsonl")[0]["gold"] == 0
    qfile.write_text(json.dumps({"qid": "p1-q1", "article_uid": "nope", "question": "What?", "options": list("wxyz"),
                                 "gold": 0}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"q\.jsonl:1: article_uid 'nope' matches no document"):
        quality.prepare(c, None, tmp_path / "out")
    corpus.write_text(json.dumps({"title": "No text"}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"c\.jsonl:1: missing required field\(s\) \['text'\]"):
        quality.prepare(c, None, tmp_path / "out")


def test_author_first_last():
    assert quality.author_first_last("Hugo, Victor") == "Victor Hugo"
    assert quality.author_first_last("David Plotz") == "David Plotz"
    assert quality.author_first_last("Haley, A. L.") == "A. L. Haley"
    assert quality.author_first_last(None) == ""
