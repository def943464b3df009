"""Quality filters between synthesis and the corpora: a filtered variant of a method is a method of its own.

    python -m workflow_scripts.filters run --variant entigraph_judge --articles results/data/articles.jsonl \\
        --inputs results/synth/entigraph/*.jsonl --outdir results/filtered/entigraph_judge [--configfile ...]

A variant (`filters.variants.NAME: {source, steps}`) reads the records of its source method and runs its steps in
order; each step sees only what the previous ones kept:
- `heuristics`: length and repetition rules after Gopher (Rae et al. 2021, "Scaling language models", App. A;
  the same rules as datatrove's GopherRepetitionFilter): too few / too many words, the most frequent word 2/3/4-gram
  covering too many characters, duplicated 5+-grams covering too many characters, repeated lines; optionally
  texts cut at the token limit.
- `dedup`: exact duplicates (normalised text), then near duplicates: MinHash over word shingles with locality-
  sensitive hashing (datasketch; Broder 1997), Jaccard estimate >= `threshold`. The first record in id order is
  kept, so the result does not depend on file order.
- `judge`: an LLM scores each record for faithfulness to its source article and for informativeness (1-5 each;
  prompt workflow_scripts/prompts/judge_quality.txt, versioned by its hash); a record is kept when the mean of the
  two scores reaches `filters.judge.threshold`. Any engine of workflow_scripts.backends runs it. Scores are
  appended to a resumable cache (work/judge_scores.jsonl) and published with the outputs.

Outputs in --outdir: records.jsonl (the kept records, `method` set to the variant, `source_method` kept),
removed.jsonl (every removed record: id, article, kind, filter, reason), judge_scores.jsonl (when judged),
report.json (per-filter counts by reason, the judge's prompt version and score distribution, and the corpus
report of synth_report.py on the kept records: diversity, compression ratio, overlap) and report.csv.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

from . import stage
from .config import config_hash
from .io_utils import (AppendOnlyJsonl, InputError, iter_jsonl, stable_hash, write_json_atomic, write_jsonl_atomic,
                       write_text_atomic)

STEPS = ("heuristics", "dedup", "judge")
JUDGE_TEMPLATE = "judge_quality"
# The user message of a judge call: the source article first, so engines reuse its prefix across the article's
# records (GenerationRequest.group). Part of the prompt version.
JUDGE_USER_FORMAT = "### Source article:\n{document}\n\n### Synthetic text:\n{text}"
_WORD = re.compile(r"\w+", re.UNICODE)
_SCORE = {"faithfulness": re.compile(r"faithful\w*\W{0,5}([1-5])\b", re.I),
          "informativeness": re.compile(r"informativ\w*\W{0,5}([1-5])\b", re.I)}


Removal = tuple[dict, str]  # (record, reason)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


# ------------------------------------------------------------------------------------------------ heuristics
def top_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters inside the most frequent word n-gram (all its occurrences) / characters of all words (Gopher)."""
    grams = list(zip(*(words[i:] for i in range(n))))
    if not grams:
        return 0.0
    gram, count = Counter(grams).most_common(1)[0]
    if count < 2:
        return 0.0
    total = sum(len(w) for w in words)
    return count * sum(len(w) for w in gram) / total if total else 0.0


def dup_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters of the words covered by word n-grams that occur more than once / characters of all words."""
    grams = list(zip(*(words[i:] for i in range(n))))
    counts = Counter(grams)
    covered = [False] * len(words)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            for j in range(i, i + n):
                covered[j] = True
    total = sum(len(w) for w in words)
    return sum(len(w) for w, c in zip(words, covered) if c) / total if total else 0.0


def repeated_line_fraction(text: str) -> float:
    """Share of non-empty lines that repeat an earlier line."""
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


def heuristic_reason(rec: dict, hc: dict) -> str | None:
    """Why a record fails the length/repetition rules (the first failed rule), or None to keep it."""
    words = _words(rec["text"])
    if len(words) < hc["min_words"]:
        return f"too_short ({len(words)} < {hc['min_words']} words)"
    if hc["max_words"] is not None and len(words) > hc["max_words"]:
        return f"too_long ({len(words)} > {hc['max_words']} words)"
    if hc["drop_truncated"] and rec.get("finish_reason") == "length":
        return "truncated (finish_reason length)"
    for n, limit in sorted((int(k), v) for k, v in hc["max_top_ngram_fraction"].items()):
        f = top_ngram_char_fraction(words, n)
        if f > limit:
            return f"top_{n}gram ({f:.2f} > {limit})"
    for n, limit in sorted((int(k), v) for k, v in hc["max_dup_ngram_fraction"].items()):
        f = dup_ngram_char_fraction(words, n)
        if f > limit:
            return f"dup_{n}gram ({f:.2f} > {limit})"
    f = repeated_line_fraction(rec["text"])
    if f > hc["max_repeated_line_fraction"]:
        return f"repeated_lines ({f:.2f} > {hc['max_repeated_line_fraction']})"
    return None


def apply_heuristics(records: list[dict], hc: dict) -> tuple[list[dict], list[Removal]]:
    kept, removed = [], []
    for rec in records:
        reason = heuristic_reason(rec, hc)
        (removed.append((rec, reason)) if reason else kept.append(rec))
    return kept, removed


# ------------------------------------------------------------------------------------------------ dedup
def normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def shingles(text: str, n: int) -> set[bytes]:
    words = _words(text)
    if len(words) < n:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


def apply_dedup(records: list[dict], dc: dict, seed: int,
                share_permutations: bool = True) -> tuple[list[dict], list[Removal]]:
    """Exact, then MinHash-LSH near-duplicate removal; records are visited in id order, the first one is kept."""
    from datasketch import MinHash, MinHashLSH

    kept: list[dict] = []
    removed: list[Removal] = []
    exact: dict[str, str] = {}
    lsh = MinHashLSH(threshold=dc["threshold"], num_perm=dc["num_perm"]) if dc["near"] else None
    # one set of seeded permutations for every record: drawing them anew per MinHash costs more than hashing a text
    template = MinHash(num_perm=dc["num_perm"], seed=seed)
    perms = template.permutations if share_permutations else None
    hashes: dict[str, Any] = {}
    for rec in sorted(records, key=lambda r: r["id"]):
        if dc["exact"]:
            key = hashlib.sha1(normalise(rec["text"]).encode("utf-8")).hexdigest()
            if key in exact:
                removed.append((rec, f"exact_duplicate of {exact[key]}"))
                continue
            exact[key] = rec["id"]
        if lsh is not None:
            mh = (MinHash(num_perm=dc["num_perm"], seed=seed, permutations=perms, scheme=template.scheme) if perms
                  is not None else MinHash(num_perm=dc["num_perm"], seed=seed))
            mh.update_batch(list(shingles(rec["text"], dc["shingle_words"])))
            # LSH returns candidates; keep the verdict to those whose estimated Jaccard reaches the threshold
            close = [(hashes[c].jaccard(mh), c) for c in lsh.query(mh)]
            close = [(j, c) for j, c in close if j >= dc["threshold"]]
            if close:
                j, other = max(close)
                removed.append((rec, f"near_duplicate of {other} (jaccard~{j:.2f})"))
                continue
            lsh.insert(rec["id"], mh)
            hashes[rec["id"]] = mh
        kept.append(rec)
    return kept, removed


# ------------------------------------------------------------------------------------------------ judge
def judge_system() -> str:
    from .templates import load_template

    return load_template(JUDGE_TEMPLATE)


def judge_prompt_version(system: str) -> str:
    return stable_hash("judge", JUDGE_USER_FORMAT, system, n=12)


def parse_scores(text: str) -> dict[str, int] | None:
    """{'faithfulness': 1-5, 'informativeness': 1-5} from a judge completion, or None if either is missing."""
    out = {}
    for key, pattern in _SCORE.items():
        m = pattern.search(text)
        if not m:
            return None
        out[key] = int(m.group(1))
    return out


def judge_settings(cfg: dict) -> tuple[str, dict, str]:
    """(engine, engine settings with the model, model name) of the judge: filters.judge.backend / .model, by
    default the synthesis engine and generator."""
    from .backends import engine_settings
    from .models import model_location

    jc = cfg["filters"]["judge"]
    engine = jc["backend"] or cfg["synthesis"]["backend"]
    spec = jc["model"] or cfg["models"]["generator"]
    settings = engine_settings(cfg, engine)
    settings.setdefault("model", model_location(spec))
    name = settings["model"] if engine == "openai" and settings.get("model") else spec["name"]
    return engine, settings, str(name)


def judge_requests(records: list[dict], articles: dict[str, dict], system: str, version: str, model: str,
                   jc: dict, seed: int) -> list[tuple[str, dict, Any]]:
    """(score id, record, request) per record; the id names record, prompt version, judge model and sampling."""
    from .backends import GenerationRequest
    from .synth_framework import render_document

    out = []
    for rec in records:
        art = articles.get(rec["article_uid"])
        if art is None:
            raise InputError(f"record {rec['id']}: article {rec['article_uid']!r} is not in the articles file")
        doc = render_document(art)
        if jc["max_article_chars"]:
            doc = doc[: jc["max_article_chars"]]
        sid = stable_hash(rec["id"], version, model, jc["temperature"], jc["max_new_tokens"], n=20)
        req = GenerationRequest(id=sid, messages=[{"role": "system", "content": system},
                                                  {"role": "user", "content": JUDGE_USER_FORMAT.format(
                                                      document=doc, text=rec["text"])}],
                                group=rec["article_uid"], max_new_tokens=jc["max_new_tokens"],
                                temperature=jc["temperature"], top_p=1.0, seed=seed,
                                metadata={"record_id": rec["id"]})
        out.append((sid, rec, req))
    return out


def run_judge(records: list[dict], articles: dict[str, dict], cfg: dict, work: Path,
              make_backend: Callable[[], Any] | None = None) -> tuple[list[dict], list[Removal], list[dict], dict]:
    """Score every record (cached scores are reused), then keep those whose mean score reaches the threshold."""
    from .backends import get_backend

    jc = cfg["filters"]["judge"]
    system = judge_system()
    version = judge_prompt_version(system)
    engine, settings, model = judge_settings(cfg)
    planned = judge_requests(records, articles, system, version, model, jc, int(cfg["seed"]))
    t0 = time.perf_counter()
    errors: list[str] = []
    with AppendOnlyJsonl(work) as cache:
        todo = [req for sid, _, req in planned if sid not in cache]
        record_of = {req.id: req.metadata["record_id"] for req in todo}
        if todo:
            backend = (make_backend or (lambda: get_backend(engine, settings)))()
            try:
                for c in backend.generate(todo):
                    if c.error:  # not cached: a re-run asks again
                        errors.append(c.error)
                        continue
                    cache.append({"id": c.id, "record_id": record_of.get(c.id), "prompt_version": version,
                                  "model": model, "completion": c.text, "scores": parse_scores(c.text)})
            finally:
                backend.close()
    cached = {rec["id"]: rec for _, rec in iter_jsonl(work, allow_truncated_tail=True)}
    kept, removed, scores = [], [], []
    for sid, rec, _ in planned:
        row = cached.get(sid)
        if row is None:
            raise InputError(f"{work}: no judge score for record {rec['id']} ({len(errors)} judge requests failed, "
                             f"e.g. {errors[0] if errors else 'no completion returned'}); re-run to retry only those")
        s = row["scores"]
        mean = None if s is None else (s["faithfulness"] + s["informativeness"]) / 2
        scores.append({"record_id": rec["id"], "article_uid": rec["article_uid"], "scores": s, "mean": mean,
                       "completion": row["completion"], "prompt_version": version, "model": model})
        if mean is None:
            if jc["on_unparseable"] == "drop":
                removed.append((rec, "judge_unparseable"))
            else:
                kept.append(rec)
        elif mean < jc["threshold"]:
            removed.append((rec, f"judge_below_threshold ({mean:.1f} < {jc['threshold']})"))
        else:
            kept.append(rec)
    means = [s["mean"] for s in scores if s["mean"] is not None]
    info = {"prompt_version": version, "template": JUDGE_TEMPLATE, "engine": engine, "model": model,
            "threshold": jc["threshold"], "on_unparseable": jc["on_unparseable"], "scored": len(scores),
            "unparseable": len(scores) - len(means), "requests_this_run": len(todo),
            "mean_score": round(sum(means) / len(means), 3) if means else None,
            "score_histogram": dict(sorted(Counter(str(m) for m in means).items())),
            "seconds": round(time.perf_counter() - t0, 2)}
    return kept, removed, scores, info


# ------------------------------------------------------------------------------------------------ a variant
def read_records(paths: Iterable[str | Path], source: str) -> list[dict]:
    """The source method's records (synthesis shards or an imported records.jsonl), checked and sorted by id."""
    from .corpus import expand_inputs

    by_id: dict[str, dict] = {}
    for path in expand_inputs(paths):
        for line, rec in iter_jsonl(path):
            if not isinstance(rec.get("id"), str) or not isinstance(rec.get("text"), str) \
                    or "article_uid" not in rec:
                raise InputError(f"{path}:{line}: a record needs string 'id' and 'text' and an 'article_uid' "
                                 f"(has {sorted(rec)}); is this a synthesis shard of {source!r}?")
            if rec.get("method") not in (None, source):
                raise InputError(f"{path}:{line}: record of method {rec['method']!r} among the inputs of {source!r}")
            by_id.setdefault(rec["id"], rec)
    return [by_id[k] for k in sorted(by_id)]


def filter_records(records: list[dict], articles: dict[str, dict], cfg: dict, steps: list[str], work_dir: Path,
                   make_backend: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Run the steps in order. Returns kept records, removals (record, filter, reason), per-step counts, scores."""
    fc = cfg["filters"]
    kept = [r for r in records if r["text"].strip()]
    removed = [(r, "empty", "empty_text") for r in records if not r["text"].strip()]
    counts: dict[str, Any] = {}
    scores: list[dict] = []
    judge_info = None
    for step in steps:
        if step == "dedup":
            import datasketch  # noqa: F401  (imported before the clock starts: records/s measures the filter)
        t0 = time.perf_counter()
        n_in = len(kept)
        if step == "heuristics":
            kept, out = apply_heuristics(kept, fc["heuristics"])
        elif step == "dedup":
            kept, out = apply_dedup(kept, fc["dedup"], int(cfg["seed"]))
        elif step == "judge":
            kept, out, scores, judge_info = run_judge(kept, articles, cfg, work_dir / "judge_scores.jsonl",
                                                      make_backend)
        else:
            raise InputError(f"unknown filter step {step!r}; steps are {', '.join(STEPS)}")
        dt = time.perf_counter() - t0
        removed.extend((r, step, why) for r, why in out)
        # reasons without their numbers, e.g. "top_2gram", "near_duplicate", so that they can be counted
        by_reason = Counter(why.split(" ")[0] for _, why in out)
        counts[step] = {"in": n_in, "kept": len(kept), "removed": len(out),
                        "by_reason": dict(sorted(by_reason.items())),
                        "seconds": round(dt, 4), "records_per_second": round(n_in / dt, 1) if dt > 0 else None}
    return {"kept": kept, "removed": removed, "counts": counts, "scores": scores, "judge": judge_info}


def variant_report(cfg: dict, variant: str, source: str, records: list[dict], result: dict, articles: list[dict],
                   steps: list[str]) -> dict[str, Any]:
    """The corpus report of the kept records (synth_report.build_report) plus the filters' counts."""
    from .synth_report import build_report

    kept = [r | {"completion_tokens": r.get("completion_tokens") if r.get("completion_tokens") is not None
                 else len(_words(r["text"])), "prompt_tokens": r.get("prompt_tokens") or 0,
                 "kind": r.get("kind") or "text"} for r in result["kept"]]
    rep = build_report(cfg, variant, kept, articles, {}, {})
    if kept and any(r.get("completion_tokens") is None for r in result["kept"]):
        rep["tokens_unit"] = "generator completion tokens (words where the source has no token counts)"
    rep["source_method"] = source
    rep["filters"] = {"steps": steps, "input_records": len(records), "kept_records": len(kept),
                      "removed_records": len(result["removed"]),
                      "kept_fraction": round(len(kept) / len(records), 4) if records else None,
                      "empty_removed": sum(1 for _, f, _ in result["removed"] if f == "empty"),
                      "by_step": result["counts"], "judge": result["judge"],
                      "config_hash": config_hash({"filters": {k: cfg["filters"][k] for k in steps}, "steps": steps})}
    return rep


def report_csv(rep: dict) -> str:
    """One row per step and reason (what each filter removed and why), then the kept corpus' metrics."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "step", "reason", "in", "removed", "kept", "records_per_second"])
    for step, c in rep["filters"]["by_step"].items():
        w.writerow([rep["method"], step, "all", c["in"], c["removed"], c["kept"], c["records_per_second"]])
        for reason, n in c["by_reason"].items():
            w.writerow([rep["method"], step, reason, "", n, "", ""])
    w.writerow([])
    from .synth_report import METRIC_KEYS

    w.writerow(["variant", "kind", *METRIC_KEYS])
    w.writerow([rep["method"], "all", *("" if rep.get(k) is None else rep[k] for k in METRIC_KEYS)])
    return buf.getvalue()


def run_variant(cfg: dict, variant: str, articles_path: str | Path, inputs: list[str], outdir: str | Path,
                make_backend: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Filter the source records of `variant`; write records.jsonl, removed.jsonl, judge_scores.jsonl, report."""
    from .synth_report import read_articles

    spec = (cfg["filters"]["variants"] or {}).get(variant)
    if spec is None:
        raise InputError(f"filters.variants has no variant {variant!r} (configured: "
                         f"{', '.join(cfg['filters']['variants']) or 'none'})")
    outdir = Path(outdir)
    articles = read_articles(articles_path)
    records = read_records(inputs, spec["source"])
    if not records:
        raise InputError(f"{variant}: the source {spec['source']!r} has no records in {', '.join(inputs)}")
    result = filter_records(records, {str(a["uid"]): a for a in articles}, cfg, list(spec["steps"]),
                            outdir / "work", make_backend)
    if not result["kept"]:
        raise InputError(f"{variant}: the filters removed all {len(records)} records ("
                         f"{json.dumps({s: c['by_reason'] for s, c in result['counts'].items()})}); loosen "
                         "filters.heuristics / filters.dedup / filters.judge.threshold")
    write_jsonl_atomic(outdir / "records.jsonl",
                       ({**r, "method": variant, "source_method": spec["source"]} for r in result["kept"]))
    write_jsonl_atomic(outdir / "removed.jsonl",
                       ({"id": r["id"], "article_uid": r["article_uid"], "kind": r.get("kind"), "filter": f,
                         "reason": why} for r, f, why in result["removed"]))
    write_jsonl_atomic(outdir / "judge_scores.jsonl", result["scores"])
    rep = variant_report(cfg, variant, spec["source"], records, result, articles, list(spec["steps"]))
    write_json_atomic(outdir / "report.json", rep)
    write_text_atomic(outdir / "report.csv", report_csv(rep))
    return rep


def main(argv: list[str] | None = None) -> int:
    p = stage.parser("filters", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = stage.subcommand(sub, "run", "filter the records of one variant's source method", config=True)
    r.add_argument("--variant", required=True)
    r.add_argument("--articles", required=True, help="results/data/articles.jsonl")
    r.add_argument("--inputs", nargs="+", required=True, help="the source's shards (files or folders)")
    r.add_argument("--outdir", required=True, help="results/filtered/VARIANT")
    args = p.parse_args(argv)

    def body() -> None:
        rep = run_variant(stage.config(args), args.variant, args.articles, args.inputs, args.outdir)
        f = rep["filters"]
        print(f"{args.variant}: kept {f['kept_records']} of {f['input_records']} records; removed by step: "
              + ", ".join(f"{s} {c['removed']}" for s, c in f["by_step"].items()), file=sys.stderr)

    return stage.run(body)


if __name__ == "__main__":
    sys.exit(main())
