"""The per-method ledger and corpus report of the synthesis stage (docs/synthesis.md "Report").

ledger.json: what producing the corpus cost - requests, prompt and completion tokens, failures, estimated cost at
`synthesis.prices`, wall time - summed over the per-article stats files, with the extraction calls of EntiGraph.

report.json (+ report.csv for the Snakemake report): what the corpus is - records and tokens (generator
completion tokens), diversity (distinct-1/2/3: unique word n-grams / all word n-grams; compression_ratio: raw
bytes / zlib-compressed bytes, higher = more repetitive), source_ngram_overlap (share of a text's word n-grams
that occur in its source article), entity_coverage (share of the article's extracted entities named in the
method's texts for it). Totals at the top level, then by kind, and `prefixes`: the same metrics on growing
prefixes of a seeded record order (for diversity-against-tokens plots).
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from .io_utils import InputError, iter_jsonl, read_jsonl, write_json_atomic, write_text_atomic

_WORD = re.compile(r"\w+", re.UNICODE)
METRIC_KEYS = ("records", "tokens", "distinct_1", "distinct_2", "distinct_3", "compression_ratio",
               "source_ngram_overlap", "entity_coverage")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(toks: list[str], n: int) -> Iterable[tuple[str, ...]]:
    return zip(*(toks[i:] for i in range(n)))


def distinct_n(token_lists: Iterable[list[str]], n: int) -> float | None:
    """Unique n-grams / all n-grams over the texts (n-grams do not cross text boundaries); None if no n-gram."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for toks in token_lists:
        for g in ngrams(toks, n):
            seen.add(g)
            total += 1
    return len(seen) / total if total else None


def compression_ratio(texts: Iterable[str]) -> float | None:
    """Raw UTF-8 bytes / zlib (level 9) bytes of the texts joined by newlines: higher = more redundant."""
    raw = "\n".join(texts).encode("utf-8")
    if not raw:
        return None
    return len(raw) / len(zlib.compress(raw, 9))


def source_overlap(records: list[dict], source_ngrams: dict[str, set], n: int) -> float | None:
    """Share of the records' word n-grams that also occur in their own source article (micro-averaged)."""
    hit = total = 0
    for rec in records:
        src = source_ngrams.get(rec["article_uid"])
        if src is None:
            continue
        for g in ngrams(words(rec["text"]), n):
            total += 1
            hit += g in src
    return hit / total if total else None


def entity_coverage(records: list[dict], entities: dict[str, list[str]]) -> float | None:
    """Share of (article, entity) pairs whose entity is named (case-insensitively) in one of the method's texts
    for that article; over the articles that have an entity list and at least one record."""
    texts: dict[str, list[str]] = {}
    for rec in records:
        texts.setdefault(rec["article_uid"], []).append(rec["text"].casefold())
    covered = total = 0
    for uid, ents in entities.items():
        if uid not in texts:
            continue
        blob = "\n".join(texts[uid])
        for e in ents:
            total += 1
            covered += e.casefold() in blob
    return covered / total if total else None


def corpus_metrics(records: list[dict], source_ngrams: dict[str, set], entities: dict[str, list[str]],
                   n_overlap: int) -> dict[str, Any]:
    toks = [words(r["text"]) for r in records]
    out: dict[str, Any] = {"records": len(records), "tokens": sum(int(r["completion_tokens"]) for r in records),
                           "words": sum(len(t) for t in toks)}
    for n in (1, 2, 3):
        out[f"distinct_{n}"] = _round(distinct_n(toks, n))
    out["compression_ratio"] = _round(compression_ratio(r["text"] for r in records))
    out["source_ngram_overlap"] = _round(source_overlap(records, source_ngrams, n_overlap))
    out["entity_coverage"] = _round(entity_coverage(records, entities))
    return out


def _round(x: float | None, nd: int = 5) -> float | None:
    return None if x is None else round(x, nd)


def prefix_points(total_tokens: int, smallest: int = 256) -> list[int]:
    """Token counts where prefix metrics are taken: doubling from `smallest`, ending at the total."""
    pts: list[int] = []
    t = smallest
    while t < total_tokens:
        pts.append(t)
        t *= 2
    return pts + [total_tokens] if total_tokens > 0 else []


# ------------------------------------------------------------------------------------------------ files
def read_articles(path: str | Path) -> list[dict]:
    return [rec for _, rec in iter_jsonl(path)]


def read_entities(entities_dir: str | Path | None, uids: list[str]) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """Entity files by uid (those that exist) and the usable entity lists (status ok or fallback)."""
    docs: dict[str, dict] = {}
    if entities_dir:
        for uid in uids:
            p = Path(entities_dir) / f"{uid}.json"
            if p.exists():
                try:
                    docs[uid] = json.loads(p.read_text(encoding="utf-8"))
                except json.JSONDecodeError as e:
                    raise InputError(f"{p}:{e.lineno}: malformed JSON ({e.msg}); delete it and re-run "
                                     "extraction") from None
    lists = {uid: list(d.get("entities") or []) for uid, d in docs.items() if d.get("status") in ("ok", "fallback")}
    return docs, lists


def build_ledger(cfg: dict, method: str, stats: list[dict], entity_docs: dict[str, dict]) -> dict[str, Any]:
    """Requests, tokens, failures, cost and time of a method, from its per-article stats (+ extraction)."""
    prices = cfg["synthesis"]["prices"]
    req = sum(s["requests"] for s in stats)
    pt = sum(s["prompt_tokens"] for s in stats)
    ct = sum(s["completion_tokens"] for s in stats)
    wall = sum(s["run"]["wall_seconds"] for s in stats)
    ledger: dict[str, Any] = {
        "method": method,
        "model": stats[0]["model"] if stats else None,
        "backend": stats[0]["backend"] if stats else cfg["synthesis"]["backend"],
        "articles": len(stats),
        "records": sum(s["records"] for s in stats),
        "requests": req, "prompt_tokens": pt, "completion_tokens": ct,
        "failures": sum(s["failures"] for s in stats),
        "failed_requests": [f | {"article_uid": s["article_uid"]} for s in stats for f in s["failed_requests"]][:100],
    }
    if entity_docs:
        attempts = [a for d in entity_docs.values() for a in d.get("attempts", [])]
        by_status = Counter(d.get("status") for d in entity_docs.values())
        ledger["extraction"] = {
            "articles": len(entity_docs), "ok": by_status.get("ok", 0), "fallback": by_status.get("fallback", 0),
            "failed": by_status.get("failed", 0), "requests": len(attempts),
            "prompt_tokens": sum(a["prompt_tokens"] for a in attempts),
            "completion_tokens": sum(a["completion_tokens"] for a in attempts),
            "failed_articles": [{"article_uid": uid, "status": d.get("status"), "reason": d.get("reason")}
                                for uid, d in entity_docs.items() if d.get("status") != "ok"],
        }
        ledger["requests"] += ledger["extraction"]["requests"]
        ledger["prompt_tokens"] += ledger["extraction"]["prompt_tokens"]
        ledger["completion_tokens"] += ledger["extraction"]["completion_tokens"]
    # a Batch API (backends/openai_batch.py) bills synthesis.prices.batch_factor of the synchronous price
    factor = float(prices.get("batch_factor", 0.5)) if ledger["backend"] == "openai_batch" else 1.0
    cost_in = ledger["prompt_tokens"] * prices["input_per_mtok"] * factor / 1e6
    cost_out = ledger["completion_tokens"] * prices["output_per_mtok"] * factor / 1e6
    ledger["cost"] = {"currency": prices["currency"], "input": round(cost_in, 6), "output": round(cost_out, 6),
                      "total": round(cost_in + cost_out, 6), "input_per_mtok": prices["input_per_mtok"],
                      "output_per_mtok": prices["output_per_mtok"], "price_factor": factor,
                      "pricing": "batch" if factor != 1.0 else "synchronous"}
    run_ct = sum(s["run"]["completion_tokens"] for s in stats)
    ledger["wall_seconds"] = round(wall, 3)
    ledger["last_run"] = {
        "requests": sum(s["run"]["requests"] for s in stats),
        "generated": sum(s["generated"] for s in stats), "reused": sum(s["reused"] for s in stats),
        "prompt_tokens": sum(s["run"]["prompt_tokens"] for s in stats), "completion_tokens": run_ct,
        "completion_tokens_per_second": round(run_ct / wall, 2) if wall > 0 else None,
        "note": "the runs that completed each article's shard (cached records cost no new calls)",
    }
    ledger["by_article"] = {s["article_uid"]: {k: s[k] for k in ("records", "requests", "prompt_tokens",
                                                                  "completion_tokens", "failures")}
                            | {"wall_seconds": s["run"]["wall_seconds"]} for s in stats}
    return ledger


def build_report(cfg: dict, method: str, records: list[dict], articles: list[dict],
                 entity_docs: dict[str, dict], entity_lists: dict[str, list[str]]) -> dict[str, Any]:
    rc = cfg["synthesis"]["report"]
    n = int(rc["overlap_n"])
    src = {str(a["uid"]): set(ngrams(words(str(a["text"])), n)) for a in articles}
    # Seeded order: diversity of a prefix is that of a random subset, as the corpus stage's budgets are.
    order = list(records)
    random.Random(int(cfg["synthesis"]["sampling"]["seed"])).shuffle(order)
    sample = order if not rc["sample_records"] else order[: int(rc["sample_records"])]
    rep: dict[str, Any] = {"method": method}
    rep.update(corpus_metrics(sample, src, entity_lists, n))
    rep["records"] = len(records)
    rep["tokens"] = sum(int(r["completion_tokens"]) for r in records)
    rep["prompt_tokens"] = sum(int(r["prompt_tokens"]) for r in records)
    rep["metrics_on_records"] = len(sample)
    rep["source_ngram_n"] = n
    rep["tokens_unit"] = "generator completion tokens"
    rep["articles"] = len(articles)
    rep["articles_with_records"] = len({r["article_uid"] for r in records})
    finish = Counter(r.get("finish_reason") for r in records)
    rep["truncated"] = finish.get("length", 0)
    rep["empty_texts"] = sum(1 for r in records if not r["text"].strip())
    rep["finish_reasons"] = dict(finish)
    rep["by_kind"] = {}
    for kind in sorted({r["kind"] for r in records}):
        part = [r for r in sample if r["kind"] == kind]
        rep["by_kind"][kind] = corpus_metrics(part, src, entity_lists, n)
        full = [r for r in records if r["kind"] == kind]
        rep["by_kind"][kind].update(records=len(full), tokens=sum(int(r["completion_tokens"]) for r in full))
    prefixes = []
    cum = 0
    points = prefix_points(sum(int(r["completion_tokens"]) for r in sample))
    i = 0
    for k, r in enumerate(sample, start=1):
        cum += int(r["completion_tokens"])
        if i < len(points) and cum >= points[i]:
            m = corpus_metrics(sample[:k], src, entity_lists, n)
            prefixes.append(m)
            while i < len(points) and cum >= points[i]:
                i += 1
    rep["prefixes"] = prefixes
    rep["by_article"] = {}
    for a in articles:
        uid = str(a["uid"])
        mine = [r for r in records if r["article_uid"] == uid]
        row: dict[str, Any] = {"records": len(mine), "tokens": sum(int(r["completion_tokens"]) for r in mine)}
        if uid in entity_docs:
            row["extraction"] = entity_docs[uid].get("status")
            row["entities"] = len(entity_docs[uid].get("entities") or [])
        rep["by_article"][uid] = row
    return rep


def table_csv(report: dict) -> str:
    """One row for the method's total, one per kind: the report's scalar metrics."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "kind", *METRIC_KEYS])
    rows = [("all", report)] + list(report["by_kind"].items())
    for kind, m in rows:
        w.writerow([report["method"], kind, *("" if m.get(k) is None else m[k] for k in METRIC_KEYS)])
    return buf.getvalue()


def write_method_report(cfg: dict, method: str, articles_path: str | Path, synth_dir: str | Path,
                        entities_dir: str | Path | None, ledger_path: str | Path, report_path: str | Path,
                        table_path: str | Path) -> dict:
    """Read every article's final shard and stats of `method`; write ledger.json, report.json and the CSV."""
    articles = read_articles(articles_path)
    uids = [str(a["uid"]) for a in articles]
    synth_dir = Path(synth_dir)
    records: list[dict] = []
    stats: list[dict] = []
    for uid in uids:
        shard = synth_dir / f"{uid}.jsonl"
        st = synth_dir / "stats" / f"{uid}.json"
        if not shard.exists() or not st.exists():
            raise InputError(f"{shard}: missing shard or stats of article {uid!r} (run the synthesize step for it)")
        records.extend(read_jsonl(shard))
        stats.append(json.loads(st.read_text(encoding="utf-8")))
    ids = Counter(r["id"] for r in records)
    dup = [i for i, c in ids.items() if c > 1]
    if dup:
        raise InputError(f"{synth_dir}: {len(dup)} record id(s) appear twice (e.g. {dup[0]}); the shards are corrupt")
    entity_docs, entity_lists = read_entities(entities_dir, uids)
    ledger = build_ledger(cfg, method, stats, entity_docs if method == "entigraph" else {})
    report = build_report(cfg, method, records, articles, entity_docs, entity_lists)
    report["failures"] = ledger["failures"]
    write_json_atomic(ledger_path, ledger)
    write_json_atomic(report_path, report)
    write_text_atomic(table_path, table_csv(report))
    return report
