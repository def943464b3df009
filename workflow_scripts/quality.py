"""Stages 1-2: fetch the QuALITY zip, and turn it (or a user's own corpus) into articles.jsonl + questions.jsonl.

    python -m workflow_scripts.quality download --url URL_OR_PATH [--sha256 HEX] --output results/data/quality/QuALITY.v1.0.1.zip
    python -m workflow_scripts.quality prepare --configfile config.yaml [--zip ZIP] --outdir results/data

Output contract (docs/architecture.md, data stage):
- articles.jsonl: uid, title, author, year, text, n_chars (+ source, splits, and title_raw when QuALITY's title has
  surrounding spaces)
- questions.jsonl: qid, article_uid, question, options (4), gold (0-based), difficult (0/1/null) (+ split, set_id)
- prepare_stats.json: counts, characters, approximate tokens, and every dropped record counted by reason.

Bad input, decided per case (tests/test_quality.py pins each):
- fail (InputError naming file:line/record): malformed JSON line, missing required field, gold_label outside
  1..4, a duplicate question id whose content differs, a non-UTF-8 document, a wrong checksum, a corrupt zip.
- drop and count (a warning names the record): a question without exactly 4 options, an empty article (with
  its questions), an empty document in a user's folder, an exact duplicate question (same id, same content).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import stage
from .layout import DATA
from .io_utils import (InputError, atomic_path, decode_text, iter_jsonl, parse_jsonl, sha256_file, write_json_atomic,
                       write_jsonl_atomic)

OFFICIAL_URL = "https://github.com/nyu-mll/quality/raw/main/data/v1.0.1/QuALITY.v1.0.1.zip"
# The official release: 300 train + 230 dev question-set lines -> 265 articles, 4,609 questions
# (the paper's data section; the EntiGraph loader's doctest expects 265 articles).
OFFICIAL_LINES = {"train": 300, "dev": 230}
OFFICIAL_COUNTS = {"articles": 265, "questions": 4609}
CHARS_PER_TOKEN = 4.0  # rough English BPE ratio, for the stats file only
REQUIRED_SET_FIELDS = ("article_id", "title", "author", "article", "questions")
REQUIRED_QUESTION_FIELDS = ("question", "options", "gold_label")
LOCAL_HINT = ("download it elsewhere and set data.quality.url in your config to the local path "
              "(or a file:// URL), e.g. --config data='{quality: {url: /path/QuALITY.v1.0.1.zip}}'")


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- download
def download(url: str, output: str | Path, sha256: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """Copy or fetch the zip to `output` atomically, verify its sha256 and that it is a readable zip."""
    output = Path(output)
    parsed = urllib.parse.urlparse(url)
    with atomic_path(output) as tmp:
        if parsed.scheme in ("http", "https"):
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
                    shutil.copyfileobj(resp, f)
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                raise InputError(f"could not download {url} ({e}); to use a copy on disk, {LOCAL_HINT}") from None
        else:
            src = Path(urllib.parse.unquote(parsed.path)) if parsed.scheme == "file" else Path(url)
            if not src.exists():
                raise InputError(f"{src}: QuALITY zip not found; {LOCAL_HINT}")
            shutil.copyfile(src, tmp)
        digest = sha256_file(tmp)
        if sha256 and digest != sha256.lower():
            raise InputError(f"{url}: sha256 mismatch (expected {sha256}, got {digest}); the file is corrupt or a "
                             "different release. Nothing was written. Re-download it, or fix data.quality.sha256")
        try:
            with zipfile.ZipFile(tmp) as z:
                bad = z.testzip()
                members = z.namelist()
        except zipfile.BadZipFile:
            raise InputError(f"{url}: not a valid zip archive; re-download it or {LOCAL_HINT}") from None
        if bad is not None:
            raise InputError(f"{url}: zip member {bad} is corrupt; re-download the archive")
        if not any(_split_of(m) for m in members):
            raise InputError(f"{url}: no QuALITY.v1.0.1.htmlstripped.<split> member in the zip (found {members[:5]})")
    return {"url": url, "output": str(output), "sha256": digest}


def _split_of(member: str) -> str | None:
    m = re.search(r"QuALITY\.v1\.0\.1\.htmlstripped\.(train|dev|test)$", member)
    return m.group(1) if m else None


def read_quality_zip(zip_path: str | Path, splits: Iterable[str]) -> Iterator[tuple[str, str, int, dict]]:
    """Yield (split, source name, line number, question-set record) for the requested splits."""
    splits = list(splits)
    with zipfile.ZipFile(zip_path) as z:
        members = {s: m for m in z.namelist() if (s := _split_of(m)) in splits}
        for split in splits:
            if split not in members:
                raise InputError(f"{zip_path}: no htmlstripped {split} file in the zip")
            name = f"{zip_path}!{members[split]}"
            data = z.read(members[split])
            yield from ((split, name, i, rec) for i, rec in parse_jsonl(data, name))


# ----------------------------------------------------------------------------------------------- prepare
class Prepared:
    """Accumulates articles and questions with drop counts; `finish()` returns the two tables and stats."""

    def __init__(self) -> None:
        self.articles: dict[str, dict] = {}
        self.questions: dict[str, dict] = {}
        self.dropped: Counter[str] = Counter()
        self.lines: Counter[str] = Counter()

    def add_article(self, art: dict, where: str) -> bool:
        uid = art["uid"]
        if not art["text"].strip():
            self.dropped["empty_article"] += 1
            warn(f"{where}: article {uid!r} has empty text; dropped with its questions")
            return False
        if uid in self.articles:
            prev = self.articles[uid]
            prev["splits"] = sorted(set(prev["splits"]) | set(art["splits"]))
            return True
        self.articles[uid] = art
        return True

    def add_question(self, q: dict, where: str) -> None:
        if len(q["options"]) != 4:
            self.dropped["not_4_options"] += 1
            warn(f"{where}: question {q['qid']!r} has {len(q['options'])} options, not 4; dropped")
            return
        prev = self.questions.get(q["qid"])
        if prev is not None:
            same = all(prev[k] == q[k] for k in ("article_uid", "question", "options", "gold"))
            if not same:
                raise InputError(f"{where}: duplicate question id {q['qid']!r} with different content; "
                                 "question ids must be unique")
            self.dropped["duplicate_question"] += 1
            return
        self.questions[q["qid"]] = q

    def finish(self) -> tuple[list[dict], list[dict], dict[str, Any]]:
        articles = list(self.articles.values())
        questions = [q for q in self.questions.values() if q["article_uid"] in self.articles]
        orphans = len(self.questions) - len(questions)
        if orphans:
            self.dropped["question_without_article"] += orphans
        n_chars = sum(a["n_chars"] for a in articles)
        stats = {
            "articles": len(articles),
            "questions": len(questions),
            "characters": n_chars,
            "approx_tokens": int(n_chars / CHARS_PER_TOKEN),
            "approx_tokens_method": f"characters / {CHARS_PER_TOKEN}",
            "input_lines": dict(self.lines),
            "dropped": dict(self.dropped),
        }
        return articles, questions, stats


def _gold_index(label: Any, where: str) -> int:
    if isinstance(label, bool) or not isinstance(label, int) or not 1 <= label <= 4:
        raise InputError(f"{where}: gold_label {label!r} is outside 1..4 (QuALITY labels are 1-indexed)")
    return label - 1


def add_quality_records(prep: Prepared, records: Iterable[tuple[str, str, int, dict]]) -> None:
    for split, name, line, rec in records:
        where = f"{name}:{line}"
        prep.lines[split] += 1
        missing = [k for k in REQUIRED_SET_FIELDS if k not in rec or rec[k] is None]
        if missing:
            raise InputError(f"{where}: missing required field(s) {missing}")
        uid = str(rec["article_id"])
        text = rec["article"]
        art = {"uid": uid, "title": rec["title"].strip(), "author": rec["author"], "year": rec.get("year"),
               "text": text, "n_chars": len(text), "source": rec.get("source"), "splits": [split]}
        if rec["title"] != art["title"]:
            # the raw title (QuALITY keeps leading spaces in some): the reference code sorts articles by it, which
            # decides its 20/80 val/test split (qa_eval.split_order)
            art["title_raw"] = rec["title"]
        if not prep.add_article(art, where):
            prep.dropped["question_of_empty_article"] += len(rec["questions"])
            continue
        for j, q in enumerate(rec["questions"]):
            qwhere = f"{where} question {j}"
            qmissing = [k for k in REQUIRED_QUESTION_FIELDS if k not in q]
            if qmissing:
                raise InputError(f"{qwhere}: missing required field(s) {qmissing}")
            qid = q.get("question_unique_id") or f"{rec.get('set_unique_id') or uid}_pos{j + 1}"  # sample rows lack ids
            prep.add_question({
                "qid": qid, "article_uid": uid, "question": q["question"], "options": list(q["options"]),
                "gold": _gold_index(q["gold_label"], qwhere), "difficult": q.get("difficult"),
                "split": split, "set_id": rec.get("set_unique_id"),
            }, qwhere)


def check_official_counts(stats: dict[str, Any]) -> None:
    """On the official release (300 train + 230 dev lines) the paper's counts must come out exactly."""
    if stats["input_lines"] == OFFICIAL_LINES and not stats["dropped"]:
        for key, want in OFFICIAL_COUNTS.items():
            if stats[key] != want:
                raise InputError(f"official QuALITY v1.0.1 should give {want} {key}, got {stats[key]}; "
                                 "the zip may be modified")
        stats["official_counts_checked"] = True


# ----------------------------------------------------------------------------------------------- custom corpora
def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-") or "doc"


def read_folder(folder: str | Path, prep: Prepared) -> None:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (data.custom.path with data.source: folder)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".txt", ".md") and p.is_file())
    if not files:
        raise InputError(f"{folder}: no .txt or .md documents found")
    for p in files:
        text = decode_text(p.read_bytes(), p)  # a leading byte-order mark is accepted
        title = p.stem
        m = re.match(r"\s*#\s+(.+)", text)
        if p.suffix.lower() == ".md" and m:
            title = m.group(1).strip()
        uid = _slug(str(p.relative_to(folder).with_suffix("")))
        if not text.strip():
            prep.dropped["empty_document"] += 1
            warn(f"{p}: empty document; dropped")
            continue
        prep.add_article({"uid": uid, "title": title, "author": None, "year": None, "text": text,
                          "n_chars": len(text), "source": "folder", "splits": ["custom"]}, str(p))


def read_jsonl_corpus(path: str | Path, prep: Prepared) -> None:
    for i, rec in iter_jsonl(path):
        where = f"{path}:{i}"
        missing = [k for k in ("title", "text") if not isinstance(rec.get(k), str)]
        if missing:
            raise InputError(f"{where}: missing required field(s) {missing} (each record needs title and text)")
        uid = str(rec.get("uid") or rec.get("id") or _slug(rec["title"]))
        prep.add_article({"uid": uid, "title": rec["title"].strip(), "author": rec.get("author"),
                          "year": rec.get("year"), "text": rec["text"], "n_chars": len(rec["text"]),
                          "source": rec.get("source", "jsonl"), "splits": ["custom"]}, where)


def read_questions_file(path: str | Path, prep: Prepared) -> None:
    for i, rec in iter_jsonl(path):
        where = f"{path}:{i}"
        missing = [k for k in ("qid", "article_uid", "question", "options", "gold") if k not in rec]
        if missing:
            raise InputError(f"{where}: missing required field(s) {missing}")
        gold = rec["gold"]
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold <= 3:
            raise InputError(f"{where}: gold {gold!r} is outside 0..3 (questions.jsonl uses a 0-based index)")
        if str(rec["article_uid"]) not in prep.articles:
            raise InputError(f"{where}: article_uid {rec['article_uid']!r} matches no document of the corpus")
        prep.add_question({"qid": str(rec["qid"]), "article_uid": str(rec["article_uid"]), "question": rec["question"],
                           "options": list(rec["options"]), "gold": gold, "difficult": rec.get("difficult"),
                           "split": "custom", "set_id": None}, where)


# ----------------------------------------------------------------------------------------------- selection
def truncate_text(text: str, limit: int) -> str:
    """Cut to at most `limit` characters at the last paragraph break, else sentence end, else space."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    for sep in ("\n\n", ". ", " "):
        cut = head.rfind(sep)
        if cut > limit // 2:
            return head[: cut + (1 if sep == ". " else 0)].rstrip()
    return head


def select(articles: list[dict], questions: list[dict], data_cfg: dict) -> tuple[list[dict], list[dict], dict]:
    info: dict[str, Any] = {}
    if data_cfg.get("article_uids"):
        want = [str(u) for u in data_cfg["article_uids"]]
        unknown = sorted(set(want) - {a["uid"] for a in articles})
        if unknown:
            raise InputError(f"data.article_uids names unknown articles {unknown}")
        articles = [a for a in articles if a["uid"] in set(want)]
    if data_cfg.get("max_articles"):
        articles = articles[: data_cfg["max_articles"]]
    limit = data_cfg.get("max_article_chars")
    if limit:
        n_cut = 0
        for a in articles:
            t = truncate_text(a["text"], limit)
            n_cut += t != a["text"]
            a["text"], a["n_chars"] = t, len(t)
        info["truncated_articles"] = n_cut
        info["max_article_chars"] = limit
    keep = {a["uid"] for a in articles}
    questions = [q for q in questions if q["article_uid"] in keep]
    return articles, questions, info


def prepare(cfg: dict, zip_path: str | Path | None, outdir: str | Path) -> dict[str, Any]:
    data_cfg = cfg["data"]
    prep = Prepared()
    source = data_cfg["source"]
    if source == "quality":
        if zip_path is None:
            raise InputError("data.source is quality: pass the downloaded zip (--zip)")
        add_quality_records(prep, read_quality_zip(zip_path, data_cfg["quality"]["splits"]))
    else:
        path = data_cfg["custom"].get("path")
        if not path:
            raise InputError(f"data.source is {source}: set data.custom.path to your corpus")
        (read_folder if source == "folder" else read_jsonl_corpus)(path, prep)
        if data_cfg["custom"].get("questions"):
            read_questions_file(data_cfg["custom"]["questions"], prep)
    if not prep.articles:
        raise InputError("no articles left after reading the input; check data.source and data paths")
    articles, questions, stats = prep.finish()
    if source == "quality" and data_cfg["quality"]["check_official_counts"]:
        check_official_counts(stats)
    articles, questions, sel = select(articles, questions, data_cfg)
    stats["selection"] = sel
    stats["selected_articles"] = len(articles)
    stats["selected_questions"] = len(questions)
    stats["selected_characters"] = sum(a["n_chars"] for a in articles)
    stats["selected_approx_tokens"] = int(stats["selected_characters"] / CHARS_PER_TOKEN)
    stats["source"] = source
    outdir = Path(outdir)
    write_jsonl_atomic(outdir / "articles.jsonl", articles)
    write_jsonl_atomic(outdir / "questions.jsonl", questions)
    write_json_atomic(outdir / "prepare_stats.json", stats)
    return stats


# ----------------------------------------------------------------------------------------------- helpers for later stages
def author_first_last(author: Any) -> str:
    """'Hugo, Victor' -> 'Victor Hugo' (QuALITY stores 'Last, First'); other forms pass through unchanged."""
    if not author:
        return ""
    author = str(author).strip()
    if author.count(",") == 1:
        last, first = (s.strip() for s in author.split(","))
        if first and last:
            return f"{first} {last}"
    return author


def load_articles(path: str | Path) -> list[dict]:
    return [rec for _, rec in iter_jsonl(path)]


def main(argv: list[str] | None = None) -> int:
    p = stage.parser("quality", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = stage.subcommand(sub, "download", "fetch/copy and verify the QuALITY zip")
    d.add_argument("--url", default=OFFICIAL_URL, help="https URL, local path or file:// URL")
    d.add_argument("--sha256", default=None)
    d.add_argument("--output", required=True)
    r = stage.subcommand(sub, "prepare", "write articles.jsonl, questions.jsonl, prepare_stats.json", config=True)
    r.add_argument("--zip", default=None, help="the downloaded QuALITY zip (data.source: quality)")
    r.add_argument("--outdir", default=DATA)
    args = p.parse_args(argv)

    def body() -> None:
        if args.cmd == "download":
            print(json.dumps(download(args.url, args.output, args.sha256 or None)))
        else:
            print(json.dumps(prepare(stage.config(args), args.zip, args.outdir)))

    return stage.run(body)


if __name__ == "__main__":
    sys.exit(main())
