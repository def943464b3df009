"""Claim-based scoring of summaries by a judge LLM (paper section 4.3 and Appendix I.2).

    python -m workflow_scripts.claims judge --summaries results/instruct/summaries/entigraph-384-instruct.jsonl \\
        --articles results/data/articles.jsonl --output-jsonl results/instruct/claims/entigraph-384-instruct.jsonl \\
        --output-json results/instruct/claims/entigraph-384-instruct.json [--configfile config.yaml]
    python -m workflow_scripts.claims judge --human results/human_summaries.jsonl --articles ... (the human summaries)

The table and the figure: workflow_scripts/claims_report.py.

The paper describes three steps and released no prompt or code for them (shared reference notes): a judge splits a
summary into atomic claims; it marks each claim true or false against the article; it marks each true claim
salient or cosmetic. The three prompts here are this project's (workflow_scripts/prompts/claims_*.txt); their
hash, `prompt_version`, is in every record. Each step is one batch of requests to the judge engine (any backend:
transformers, vllm, openai), requests of one article grouped so that the article prefix is computed once. The
verdict steps send one request per summary (its numbered claims) or, with `judge.per_claim`, one per claim.

Judge answers are parsed strictly (`parse_claims`, `parse_labels`, `parse_single_label`). Nothing is dropped silently:
- a claim list that cannot be read makes the summary `split_status: unparseable`; the summary is counted in
  `summaries_unparseable` and left out of the means (its claims are unknown);
- a claim whose verdict line is missing, repeated with different labels, or not one of the allowed labels counts
  in `truth_unparsed` (resp. `salience_unparsed`) and in neither the false nor the salient count.

Normalisation (`relative_to_human`): where human summaries are given (sQuALITY, `instruct.judge.human_summaries`),
they are scored by the same judge, and a model's false and salient counts are divided by the human summaries'
counts. The ratio is taken of the sums over the articles both have (equivalently of the means), not averaged per
article: a human summary often has 0 false claims, where a per-article ratio is undefined. Without human
summaries the table reports raw counts per summary.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import stage
from .config import config_hash
from .io_utils import InputError, iter_jsonl, stable_hash, write_json_atomic, write_jsonl_atomic

SPLIT, TRUTH, SALIENCE = "claims_split", "claims_truth", "claims_salience"
TRUTH_LABELS = ("TRUE", "FALSE")
SALIENCE_LABELS = ("SALIENT", "COSMETIC")
COUNT_KEYS = ("claims", "true", "false", "salient", "cosmetic", "truth_unparsed", "salience_unparsed")

TABLE_COLUMNS = ["model", "base_model", "method", "budget", "prompt", "articles", "summaries",
                 "summaries_unparseable", "summaries_failed", "claims_mean", "false_mean", "salient_mean",
                 "cosmetic_mean", "truth_unparsed", "salience_unparsed", "normalisation", "human_articles",
                 "false_rel_human", "salient_rel_human", "judge", "prompt_version"]


# ------------------------------------------------------------------------------------------------ prompts
def judge_prompts() -> dict[str, str]:
    """The three system prompts of the judge, from workflow_scripts/prompts/."""
    from .templates import load_template

    return {name: load_template(name) for name in (SPLIT, TRUTH, SALIENCE)}


def prompt_version(prompts: dict[str, str]) -> str:
    """One hash of the three judge prompts and of the user-message layout below."""
    return stable_hash("claims-judge-v1", USER_LAYOUT, [prompts[k] for k in sorted(prompts)], n=12)


USER_LAYOUT = "### Article:\n{document}\n\n### Claims:\n1. {claim}\n... | ### Summary:\n{summary}"


def split_message(summary: str) -> str:
    return f"### Summary:\n{summary.strip()}"


def claims_message(document: str, claims: Sequence[str]) -> str:
    """The article first (shared by every request of that article: the engines reuse its prefix), then the
    numbered claims."""
    listed = "\n".join(f"{i}. {c}" for i, c in enumerate(claims, start=1))
    return f"### Article:\n{document}\n\n### Claims:\n{listed}"


# ------------------------------------------------------------------------------------------------ parsing
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\(?\d{1,3}[.)])\s+(.*\S)\s*$")


def parse_claims(text: str | None) -> tuple[list[str], str]:
    """Claims of a judge's split answer: the lines that are list items (`- x`, `* x`, `• x`, `1. x`, `1) x`).

    Returns (claims, status): `ok`, `empty` (the answer holds no list item, or is empty: unparseable), with
    duplicates (same text, case-insensitive) kept once. Prose around the list (a heading such as "Claims:") is
    ignored; an answer with no list at all is unparseable, never guessed at."""
    if not text or not text.strip():
        return [], "empty"
    claims: list[str] = []
    seen: set[str] = set()
    for line in text.split("\n"):
        m = _BULLET.match(line)
        if not m:
            continue
        claim = m.group(1).strip()
        key = claim.lower()
        if claim and key not in seen:
            seen.add(key)
            claims.append(claim)
    return (claims, "ok") if claims else ([], "unparseable")


def parse_labels(text: str | None, n: int, labels: Sequence[str]) -> tuple[dict[int, str], list[str]]:
    """Verdicts `{claim number: label}` (numbers 1..n) from lines like `3: TRUE`, `3. false`, `Claim 3 - True`.

    Returns (verdicts, problems). A claim whose number is missing, out of range, repeated with a different label,
    or followed by no allowed label has no verdict, and each such case is named in `problems`. Labels are matched
    case-insensitively as whole words; a line naming two different labels is ambiguous and ignored."""
    allowed = {lab.upper() for lab in labels}
    word = re.compile(r"\b(" + "|".join(re.escape(lab) for lab in allowed) + r")\b", re.IGNORECASE)
    line_re = re.compile(r"^\s*(?:claim\s*)?\(?(\d{1,3})\s*[:.)\-]\s*(.*)$", re.IGNORECASE)
    verdicts: dict[int, str] = {}
    conflicts: set[int] = set()
    problems: list[str] = []
    for line in (text or "").split("\n"):
        m = line_re.match(line.strip().strip("*"))
        if not m:
            continue
        i = int(m.group(1))
        found = {w.upper() for w in word.findall(m.group(2))}
        if not 1 <= i <= n:
            problems.append(f"claim number {i} out of range 1..{n}")
            continue
        if len(found) != 1:
            problems.append(f"claim {i}: {'no' if not found else 'ambiguous'} label in {line.strip()[:60]!r}")
            continue
        lab = found.pop()
        if i in verdicts and verdicts[i] != lab:
            conflicts.add(i)
        verdicts.setdefault(i, lab)
    for i in sorted(conflicts):
        problems.append(f"claim {i}: conflicting labels")
        del verdicts[i]
    missing = [i for i in range(1, n + 1) if i not in verdicts and i not in conflicts]
    if missing:
        problems.append(f"no verdict for claim(s) {', '.join(map(str, missing))}")
    return verdicts, problems


def parse_single_label(text: str | None, labels: Sequence[str]) -> str | None:
    """The verdict of an answer about one claim: the one allowed label it contains (whole word, any case), or None
    when it contains none or more than one distinct label."""
    allowed = {lab.upper() for lab in labels}
    word = re.compile(r"\b(" + "|".join(re.escape(lab) for lab in allowed) + r")\b", re.IGNORECASE)
    found = {w.upper() for w in word.findall(text or "")}
    return found.pop() if len(found) == 1 else None

def count_verdicts(n_claims: int, truth: dict[int, str], salience: dict[int, str]) -> dict[str, int]:
    """Counts of one summary from its parsed verdicts (claims numbered 1..n_claims)."""
    true_ids = [i for i in range(1, n_claims + 1) if truth.get(i) == "TRUE"]
    return {
        "claims": n_claims,
        "true": len(true_ids),
        "false": sum(1 for i in range(1, n_claims + 1) if truth.get(i) == "FALSE"),
        "salient": sum(1 for i in true_ids if salience.get(i) == "SALIENT"),
        "cosmetic": sum(1 for i in true_ids if salience.get(i) == "COSMETIC"),
        "truth_unparsed": sum(1 for i in range(1, n_claims + 1) if i not in truth),
        "salience_unparsed": sum(1 for i in true_ids if i not in salience),
    }


# ------------------------------------------------------------------------------------------ normalisation
def per_article_counts(records: Iterable[dict], prompt: str | None = None) -> dict[str, dict[str, float]]:
    """Mean false and salient counts per article over its parsed summaries (several human summaries per article
    are averaged); records of another prompt, and unparseable or failed summaries, are left out."""
    acc: dict[str, list[dict]] = {}
    for r in records:
        if r.get("split_status") != "ok" or (prompt is not None and r.get("prompt") != prompt):
            continue
        acc.setdefault(str(r["article_uid"]), []).append(r["counts"])
    return {a: {k: sum(c[k] for c in cs) / len(cs) for k in ("false", "salient", "claims")} for a, cs in acc.items()}


def relative_to_human(model: dict[str, dict[str, float]], human: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Model counts over human counts, as the ratio of sums over the articles both have scores for.

    Returns {articles, false_rel_human, salient_rel_human}; a ratio whose human sum is 0 is None (undefined)."""
    common = sorted(set(model) & set(human))
    out: dict[str, Any] = {"articles": len(common)}
    for key in ("false", "salient"):
        num = sum(model[a][key] for a in common)
        den = sum(human[a][key] for a in common)
        out[f"{key}_rel_human"] = (num / den) if common and den > 0 else None
    return out


# ------------------------------------------------------------------------------------------------ judging
def _request(rid: str, system: str, user: str, group: str, jcfg: dict,  # type: ignore[no-untyped-def]
             max_new_tokens: int):
    from .backends import GenerationRequest

    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return GenerationRequest(id=rid, messages=messages,
                             group=group, max_new_tokens=max_new_tokens, temperature=jcfg["temperature"],
                             top_p=jcfg["top_p"], seed=int(stable_hash(jcfg["seed"], rid, n=8), 16))


def _run(backend: Any, requests: list) -> dict[str, Any]:
    return {c.id: c for c in backend.generate(requests)} if requests else {}


def judge_records(backend: Any, items: Sequence[dict], documents: dict[str, str], jcfg: dict,
                  prompts: dict[str, str]) -> list[dict]:
    """Score summaries: items are {id, article_uid, prompt, summary (None when its generation failed)}.

    Three batches to the judge: split every summary, check every claim list, rate every set of true claims."""
    out = {it["id"]: {**it, "claims": [], "split_status": "failed" if it.get("summary") is None else "pending",
                      "truth": {}, "salience": {}, "problems": [], "answers": {}} for it in items}
    reqs = [_request(f"{i}:split", prompts[SPLIT], split_message(r["summary"]), r["article_uid"], jcfg,
                     jcfg["split_max_new_tokens"]) for i, r in out.items() if r["split_status"] == "pending"]
    for rid, c in _run(backend, reqs).items():
        r = out[rid.rsplit(":", 1)[0]]
        r["answers"]["split"] = c.text
        if c.error:
            r["split_status"], r["problems"] = "judge_error", [c.error]
            continue
        claims, status = parse_claims(c.text)
        r["claims"], r["split_status"] = claims[:jcfg["max_claims"]], status
        if len(claims) > jcfg["max_claims"]:
            r["problems"].append(f"{len(claims)} claims, judged the first {jcfg['max_claims']} (judge.max_claims)")
    for stage, labels, key in ((TRUTH, TRUTH_LABELS, "truth"), (SALIENCE, SALIENCE_LABELS, "salience")):
        _verdict_stage(backend, out, prompts[stage], labels, key, documents, jcfg)
    records = []
    for r in out.values():
        counts = count_verdicts(len(r["claims"]), r["truth"], r["salience"]) if r["split_status"] == "ok" else None
        labels = [{"claim": c, "truth": r["truth"].get(k), "salience": r["salience"].get(k)}
                  for k, c in enumerate(r["claims"], start=1)]
        records.append({k: v for k, v in r.items() if k not in ("truth", "salience", "claims")}
                       | {"claims": labels, "counts": counts})
    return records


def _verdict_stage(backend: Any, out: dict[str, dict], system: str, labels: Sequence[str], key: str,
                   documents: dict[str, str], jcfg: dict) -> None:
    """One verdict step (truth: every claim; salience: the true claims) for every parsed summary in `out`: one
    request per summary listing its claims, or with judge.per_claim one request per claim (for small judges that
    cannot keep a numbered list). Verdicts land in r[key] under the summary's own claim numbers."""
    todo: dict[str, list[int]] = {}
    for i, r in out.items():
        if r["split_status"] != "ok":
            continue
        ids = (list(range(1, len(r["claims"]) + 1)) if key == "truth"
               else [k for k, v in r["truth"].items() if v == "TRUE"])
        if ids:
            todo[i] = ids
    groups = ({f"{i}:{key}:{k}": (i, [k]) for i, ids in todo.items() for k in ids} if jcfg["per_claim"]
              else {f"{i}:{key}": (i, ids) for i, ids in todo.items()})
    reqs = [_request(rid, system,
                     claims_message(documents[out[i]["article_uid"]], [out[i]["claims"][k - 1] for k in ids]),
                     out[i]["article_uid"], jcfg, jcfg["verdict_tokens_per_claim"] * len(ids) + 16)
            for rid, (i, ids) in groups.items()]
    for rid, c in _run(backend, reqs).items():
        i, ids = groups[rid]
        r = out[i]
        r["answers"].setdefault(key, {})[",".join(map(str, ids))] = c.text
        if c.error:
            r["problems"].append(f"{key}: judge error: {c.error}")
            continue
        if jcfg["per_claim"]:
            label = parse_single_label(c.text, labels)
            verdicts = {1: label} if label else {}
            problems = [] if label else [f"claim {ids[0]}: no single label in {c.text.strip()[:60]!r}"]
        else:
            verdicts, problems = parse_labels(c.text, len(ids), labels)
        r[key].update({ids[k - 1]: v for k, v in verdicts.items()})  # back to the summary's claim numbers
        r["problems"].extend(f"{key}: {p}" for p in problems)


def summarize_judged(records: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """Per prompt: summaries, unparseable and failed ones, and mean counts over the parsed summaries."""
    out: dict[str, dict[str, Any]] = {}
    for prompt in sorted({str(r["prompt"]) for r in records}):
        rs = [r for r in records if r["prompt"] == prompt]
        ok = [r["counts"] for r in rs if r["split_status"] == "ok"]
        block: dict[str, Any] = {
            "articles": len({r["article_uid"] for r in rs}), "summaries": len(rs),
            "summaries_unparseable": sum(r["split_status"] in ("unparseable", "empty") for r in rs),
            "summaries_failed": sum(r["split_status"] in ("failed", "judge_error") for r in rs),
            "summaries_scored": len(ok)}
        for k in COUNT_KEYS:
            total = sum(c[k] for c in ok)
            if k.endswith("_unparsed"):
                block[k] = total
            else:
                block[f"{k}_mean"] = total / len(ok) if ok else None
        out[prompt] = block
    return out


def judge_engine_settings(cfg: dict) -> tuple[str, dict, str]:
    """(engine, backend settings with the judge model, judge name) of instruct.judge; the model defaults to
    models.generator. For openai the model is the served or hosted model name."""
    from .backends import engine_settings
    from .models import model_location

    jcfg = cfg["instruct"]["judge"]
    spec = jcfg["model"] or cfg["models"]["generator"]
    engine = jcfg["engine"]
    settings = engine_settings(cfg, engine, spec["name"] if engine == "openai" else model_location(spec))
    return engine, settings, str(spec["name"])


def load_articles_map(path: str | Path) -> dict[str, dict]:
    return {str(a["uid"]): a for _, a in iter_jsonl(path)}


def load_items(summaries: str | Path | None, human: str | Path | None, articles: dict[str, dict]) -> list[dict]:
    """What to judge: a model's summary records, or the human summaries ({article_uid, summary} per line; several
    lines per article allowed; articles outside the run are skipped with a count on stderr)."""
    items: list[dict] = []
    if summaries is not None:
        for line, r in iter_jsonl(summaries):
            if "article_uid" not in r or "prompt" not in r or "id" not in r:
                raise InputError(f"{summaries}:{line}: a summary record needs id, article_uid and prompt; "
                                 "rerun the summarize rule")
            items.append({"id": r["id"], "model": r.get("model"), "article_uid": str(r["article_uid"]),
                          "prompt": r["prompt"], "summary": None if r.get("error") else r.get("summary")})
        return items
    skipped, k = 0, {}
    for line, r in iter_jsonl(human):  # type: ignore[arg-type]
        if not isinstance(r.get("summary"), str) or "article_uid" not in r:
            raise InputError(f"{human}:{line}: a human summary needs 'article_uid' and a string 'summary' "
                             "(instruct.judge.human_summaries, docs/instruct.md)")
        uid = str(r["article_uid"])
        if uid not in articles:
            skipped += 1
            continue
        k[uid] = k.get(uid, 0) + 1
        items.append({"id": f"human:{uid}:{k[uid]}", "model": "human", "article_uid": uid, "prompt": "human",
                      "summary": r["summary"]})
    if skipped:
        print(f"{human}: {skipped} human summaries of articles outside this run skipped", file=sys.stderr)
    if not items:
        raise InputError(f"{human}: no human summary of any article of this run; check the article_uid values")
    return items


def judge_file(cfg: dict, items: list[dict], articles: dict[str, dict], output_jsonl: str | Path,
               output_json: str | Path, backend: Any = None) -> dict:
    """Judge `items`, write the per-summary JSONL and the summary JSON; returns the summary."""
    from .synth_framework import render_document

    t0 = time.time()
    jcfg = cfg["instruct"]["judge"]
    prompts = judge_prompts()
    version = prompt_version(prompts)
    engine, settings, judge_name = judge_engine_settings(cfg)
    missing = sorted({it["article_uid"] for it in items} - set(articles))
    if missing:
        raise InputError(f"summaries of articles not in the articles file: {', '.join(missing[:5])}; "
                         "rerun the summarize rule on the same articles")
    documents = {uid: render_document(a) for uid, a in articles.items()}
    own = backend is None
    if own:
        from .backends import get_backend

        backend = get_backend(engine, settings)
    try:
        records = judge_records(backend, items, documents, jcfg, prompts)
    finally:
        if own:
            backend.close()
    order = {it["id"]: n for n, it in enumerate(items)}
    records.sort(key=lambda r: order[r["id"]])
    for r in records:
        r.update(judge=judge_name, judge_engine=engine, prompt_version=version)
    write_jsonl_atomic(output_jsonl, records)
    summary = {"model": items[0].get("model") if items else None, "judge": judge_name, "judge_engine": engine,
               "prompt_version": version, "by_prompt": summarize_judged(records),
               "config_hash": config_hash({"judge": jcfg}), "seconds": round(time.time() - t0, 1)}
    write_json_atomic(output_json, summary)
    return summary


# --------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = stage.parser("claims", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    j = stage.subcommand(sub, "judge", "split summaries into claims and judge them", config=True)
    src = j.add_mutually_exclusive_group(required=True)
    src.add_argument("--summaries", help="a model's summaries (summaries.py output)")
    src.add_argument("--human", help="human summaries, JSONL of {article_uid, summary}")
    j.add_argument("--articles", required=True)
    j.add_argument("--output-jsonl", required=True)
    j.add_argument("--output-json", required=True)
    args = p.parse_args(argv)

    def body() -> None:
        cfg = stage.config(args)
        articles = load_articles_map(args.articles)
        items = load_items(args.summaries, args.human, articles)
        summary = judge_file(cfg, items, articles, args.output_jsonl, args.output_json)
        print(json.dumps(summary["by_prompt"]))

    return stage.run(body)


if __name__ == "__main__":
    sys.exit(main())
