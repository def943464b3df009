"""Import an existing synthetic corpus as a method: CPT and evaluation without paying for synthesis.

    python -m workflow_scripts.import_corpus --name entigraph_released --articles results/data/articles.jsonl \\
        --output results/imported/entigraph_released/records.jsonl \\
        --report results/imported/entigraph_released/report.json --configfile config.yaml my.yaml

Sources (`imports.NAME.path`: a .parquet or .jsonl file, or a folder of them):
- `authors`: the corpus the paper's authors released (Hugging Face `zitongyang/entigraph-quality-corpus`; schema in
  the project's reference notes): one row per article with columns `uid` (`"{title} by {author}"`, the raw
  QuALITY title with its leading space), `raw`, `entity` and `entigraph`, the article's synthetic texts joined by
  the literal separator `<|entigraphseptoekn|>`. Each text becomes a record.
- `records`: one text per row, `{uid or title, text}` (field names configurable).

Rows are joined to the prepared articles (results/data/articles.jsonl): by uid, by "title by author", or by title
(case and spacing ignored). Rows that match no article are counted and left out (the paper's corpus has 265
articles; a demo prepares a few). Parquet is read in record batches, so row groups of a GiB stay within memory.

Output: records.jsonl in the synthesis record format (id, method, kind, article_uid, text, source_row) that the
corpus stage (and the filters) read like a synthesis shard; report.json: rows, texts, matched and unmatched rows
with examples, articles covered.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

from . import stage
from .config import config_hash
from .io_utils import InputError, iter_jsonl, sha256_file, stable_hash, write_jsonl_atomic

AUTHORS_COLUMNS = ("uid", "entigraph")


def norm(s: Any) -> str:
    return " ".join(str(s).casefold().split())


def source_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".parquet", ".jsonl"))
        if not files:
            raise InputError(f"{p}: no .parquet or .jsonl files in the import folder")
        return files
    if not p.exists():
        raise InputError(f"{p}: import source not found (imports.*.path); download it first")
    if p.suffix not in (".parquet", ".jsonl"):
        raise InputError(f"{p}: import sources are .parquet or .jsonl files (got {p.suffix or 'no suffix'})")
    return [p]


def iter_rows(path: Path, batch_rows: int = 64) -> Iterator[tuple[str, dict]]:
    """(where, row) of a parquet or JSONL file; `where` names the file and row (1-based) for error messages."""
    if path.suffix == ".jsonl":
        for line, rec in iter_jsonl(path):
            yield f"{path}:{line}", rec
        return
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise InputError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        for rec in batch.to_pylist():
            row += 1
            yield f"{path} row {row}", rec


class ArticleIndex:
    """Prepared articles by uid, by normalised "title by author", and by normalised title."""

    def __init__(self, articles: list[dict]) -> None:
        self.by_uid = {str(a["uid"]): str(a["uid"]) for a in articles}
        self.by_title_author = {norm(f"{a['title']} by {a.get('author')}"): str(a["uid"]) for a in articles}
        titles: dict[str, list[str]] = {}
        for a in articles:
            titles.setdefault(norm(a["title"]), []).append(str(a["uid"]))
        # a title shared by two articles cannot identify one of them
        self.by_title = {t: uids[0] for t, uids in titles.items() if len(uids) == 1}

    def match(self, uid: Any = None, title: Any = None) -> str | None:
        if uid is not None:
            if str(uid) in self.by_uid:
                return self.by_uid[str(uid)]
            key = norm(uid)
            if key in self.by_title_author:
                return self.by_title_author[key]
            if key in self.by_title:
                return self.by_title[key]
        if title is not None:
            return self.by_title.get(norm(title))
        return None


def row_texts(where: str, rec: dict, schema: str, spec: dict) -> tuple[Any, Any, list[str]]:
    """(uid, title, texts) of one row; a malformed row is an InputError naming it."""
    if schema == "authors":
        missing = [c for c in AUTHORS_COLUMNS if c not in rec]
        if missing:
            raise InputError(f"{where}: malformed row, no column {', '.join(missing)} (authors schema: uid, raw, "
                             "entity, entigraph); set imports.*.schema: records for other files")
        blob = rec["entigraph"]
        if not isinstance(blob, str):
            raise InputError(f"{where}: malformed row, column 'entigraph' is {type(blob).__name__}, not text")
        texts = [t.strip() for t in blob.split(spec["separator"])]
        return rec["uid"], None, [t for t in texts if t]
    field = spec["text_field"]
    uid, title = rec.get(spec["uid_field"]), rec.get(spec["title_field"])
    text = rec.get(field)
    if not isinstance(text, str):
        raise InputError(f"{where}: malformed row, no text column {field!r} (has {sorted(rec)}; set "
                         f"imports.*.text_field)" if field not in rec else
                         f"{where}: malformed row, {field!r} is {type(text).__name__}, not text")
    if uid is None and title is None:
        raise InputError(f"{where}: malformed row, neither {spec['uid_field']!r} nor {spec['title_field']!r} names "
                         "its article (set imports.*.uid_field / title_field)")
    return uid, title, [text.strip()] if text.strip() else []


def detect_schema(spec: dict, first: dict) -> str:
    if spec["schema"] != "auto":
        return spec["schema"]
    return "authors" if "entigraph" in first and "uid" in first else "records"


def import_corpus(name: str, spec: dict, articles: list[dict]) -> tuple[list[dict], dict[str, Any]]:
    """Records of an imported corpus joined to the articles, and the import report."""
    spec = {"schema": "auto", "separator": "<|entigraphseptoekn|>", "text_field": "text", "uid_field": "uid",
            "title_field": "title"} | spec
    index = ArticleIndex(articles)
    records: list[dict] = []
    rows = matched = texts = 0
    unmatched: list[str] = []
    schema = None
    files = source_files(spec["path"])
    for path in files:
        for where, rec in iter_rows(path):
            if schema is None:
                schema = detect_schema(spec, rec)
            rows += 1
            uid, title, row_text = row_texts(where, rec, schema, spec)
            texts += len(row_text)
            article = index.match(uid, title)
            if article is None:
                unmatched.append(str(uid if uid is not None else title))
                continue
            matched += 1
            for i, text in enumerate(row_text):
                records.append({"id": stable_hash(name, article, str(uid if uid is not None else title), i, text,
                                                  n=20), "method": name,
                                "kind": "imported", "article_uid": article, "text": text,
                                "source_row": where, "text_index": i})
    if rows and not matched:
        raise InputError(f"{spec['path']}: none of the {rows} rows matches a prepared article (e.g. "
                         f"{unmatched[0]!r}); check that the data section prepares the same articles, or the "
                         "uid/title fields")
    report = {"name": name, "schema": schema, "path": str(spec["path"]),
              "files": [{"path": str(p), "sha256": sha256_file(p)} for p in files],
              "rows": rows, "texts": texts, "matched_rows": matched, "unmatched_rows": len(unmatched),
              "unmatched_examples": unmatched[:20], "records": len(records),
              "articles": len(articles), "articles_covered": len({r["article_uid"] for r in records}),
              "config_hash": config_hash(spec)}
    return records, report


def main(argv: list[str] | None = None) -> int:
    p = stage.parser("import_corpus", __doc__, config=True)
    p.add_argument("--name", required=True, help="the method name (a key of imports)")
    p.add_argument("--articles", required=True, help="results/data/articles.jsonl")
    p.add_argument("--output", required=True, help="results/imported/NAME/records.jsonl")
    p.add_argument("--report", required=True, help="results/imported/NAME/report.json")
    args = p.parse_args(argv)

    def body() -> None:
        cfg = stage.config(args)
        if args.name not in cfg["imports"]:
            raise InputError(f"imports has no corpus {args.name!r} (configured: {', '.join(cfg['imports']) or 'none'})")
        articles = [rec for _, rec in iter_jsonl(args.articles)]
        records, report = import_corpus(args.name, cfg["imports"][args.name], articles)
        write_jsonl_atomic(args.output, records)
        stage.write_stats(args.report, report)
        print(f"{args.name}: {report['records']} texts from {report['matched_rows']} of {report['rows']} rows "
              f"({report['unmatched_rows']} match no article)", file=sys.stderr)
        print(json.dumps({k: report[k] for k in ("rows", "matched_rows", "unmatched_rows", "records")}))

    return stage.run(body)


if __name__ == "__main__":
    sys.exit(main())
