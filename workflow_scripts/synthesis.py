"""Stages 3-4: synthetic data from the articles, one prompt family ("method") at a time.

    python -m workflow_scripts.synthesis methods
    python -m workflow_scripts.synthesis extract --articles results/data/articles.jsonl --article UID \\
        --output results/synth/entigraph/entities/UID.json
    python -m workflow_scripts.synthesis synthesize --method entigraph --articles results/data/articles.jsonl \\
        --article UID [--entities results/synth/entigraph/entities/UID.json] \\
        --output results/synth/entigraph/UID.jsonl --stats results/synth/entigraph/stats/UID.json
    python -m workflow_scripts.synthesis extract-shard --articles results/data/articles.jsonl --shard SHARD \
        --shard-articles UID [UID ...] --outdir results/synth/entigraph/extract_shards/SHARD \
        --work-dir results/synth/entigraph/work/extraction
    python -m workflow_scripts.synthesis synthesize-shard --method entigraph --articles results/data/articles.jsonl \
        --shard SHARD --shard-articles UID [UID ...] --entities-dir results/synth/entigraph/entities \
        --outdir results/synth/entigraph/shards/SHARD --work-dir results/synth/entigraph/work
    python -m workflow_scripts.synthesis report --method entigraph --articles results/data/articles.jsonl \\
        --synth-dir results/synth/entigraph --entities-dir results/synth/entigraph/entities \\
        --ledger results/synth/entigraph/ledger.json --report results/synth/entigraph/report.json \\
        --table results/synth/entigraph/report.csv

Every command also takes --configfile / --config-json (the rules pass the sections they need).

Methods are a registry (docs/synthesis.md): `entigraph` (workflow_scripts/entigraph.py), `rephrase` (easy /
medium / hard, paper Appendix H.2), `qa` (the QA-format baseline, Appendix E), and any prompt family the config
declares under `synthesis.families` (template files, or a Python class), with no change to the rules.

Resume contract: each generated text is appended to a working shard (results/synth/{method}/work/{article}.jsonl,
io_utils.AppendOnlyJsonl, one fsynced line per record) keyed by a stable record id. A re-run skips ids already
there, so a run killed at any moment loses only requests in flight and never duplicates. The final shard
results/synth/{method}/{article}.jsonl is written atomically, once every planned request has a record: it is
complete or absent. The working shard is kept as a cache, so raising a cap later only generates what is new.

The workflow runs the `*-shard` commands: one job per shard of `synthesis.articles_per_job` articles starts its
engine once and runs the per-article steps above one article after the other, writing each article's final
files into the shard's folder (rules/synthesis.smk copies them to the per-article paths). A shard is named by
its position and a hash of its article list (`article_shards`), so a changed list is a new shard.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .backends import GenerationRequest
from . import stage
from .entigraph import extract_entities
from .io_utils import AppendOnlyJsonl, InputError, iter_jsonl, stable_hash, write_json_atomic, write_jsonl_atomic
# The framework's names, importable from here as before (tests, tools and the docs use `synthesis.<name>`).
from .synth_framework import (BUILTIN_METHODS, USER_FORMAT, Method, QAFormat, Rephrase, Task,  # noqa: F401
                              TemplateMethod, backend_factory, backend_settings, default_work_path, generation_hash,
                              generator_name, get_method, method_needs_entities, prompt_version, read_work_shard,
                              record_id, render_document, request_seed, sampling_key, template_task, user_message)
from .templates import PROMPTS_DIR, load_template, template_path  # noqa: F401


class Progress:
    """A tqdm bar over requests with completion tokens per second in its postfix (stderr, i.e. the rule's log)."""

    def __init__(self, total: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self.t0 = time.perf_counter()
        self.tokens = 0
        self.bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, mininterval=2.0, dynamic_ncols=True)

    def update(self, completion_tokens: int) -> None:
        self.tokens += completion_tokens
        self.bar.update(1)
        self.bar.set_postfix(tok_s=f"{self.tokens / max(time.perf_counter() - self.t0, 1e-9):.1f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------------------------ runner
class SynthesisIncomplete(RuntimeError):
    """Some requests failed for good: the final shard is not written; a re-run retries only those."""


def load_article(articles_path: str | Path, uid: str) -> dict:
    for _, rec in iter_jsonl(articles_path):
        if str(rec.get("uid")) == uid:
            return rec
    raise InputError(f"{articles_path}: no article with uid {uid!r} (is the article list from another data config?)")


@dataclass
class ArticleRun:
    """One article of one method while it is being synthesized: what is planned, and what this run did."""

    cfg: dict
    method_name: str
    method: Method
    uid: str
    model: str
    chash: str
    planned: list[tuple[str, Task, int]]  # (record id, task, seed), each text once
    failures: list[dict] = field(default_factory=list)
    generated: int = 0
    reused: int = 0
    run_prompt: int = 0
    run_completion: int = 0

    def record(self, rid: str, task: Task, seed: int, text: str, prompt_tokens: int, completion_tokens: int,
               finish_reason: str, cached_prompt_tokens: int | None = None) -> dict:
        """A record of the working shard. `model` is the configured generator name (as in the id), not the
        engine's local path for it; cached_prompt_tokens: prompt tokens the engine served from its prefix cache
        (None: not reported)."""
        return {"id": rid, "method": self.method_name, "kind": task.kind, "article_uid": self.uid,
                "entities": list(task.entities), "text": text, "prompt_tokens": int(prompt_tokens),
                "completion_tokens": int(completion_tokens), "model": self.model, "finish_reason": finish_reason,
                "prompt_version": task.prompt_version, "seed": seed, "config_hash": self.chash,
                "template": task.template, "repeat": task.repeat, "cached_prompt_tokens": cached_prompt_tokens}

    def request(self, rid: str, task: Task, seed: int) -> GenerationRequest:
        sampling = self.cfg["synthesis"]["sampling"]
        return GenerationRequest(
            id=rid, messages=[{"role": "system", "content": task.system}, {"role": "user", "content": task.user}],
            group=self.uid, max_new_tokens=task.max_new_tokens or self.method.max_new_tokens(),
            temperature=float(sampling["temperature"]), top_p=float(sampling["top_p"]), seed=seed,
            metadata={"method": self.method_name, "kind": task.kind, "article_uid": self.uid})

    def fail(self, rid: str, task: Task, error: str) -> None:
        self.failures.append({"id": rid, "kind": task.kind, "entities": list(task.entities), "error": error})


def plan_article(cfg: dict, method_name: str, article: dict, entities_doc: dict | None) -> ArticleRun:
    """The method's tasks for one article with their record ids; a text planned twice (e.g. duplicate
    templates) is kept once."""
    method = get_method(method_name, cfg)
    if method.needs_entities and entities_doc is None:
        raise InputError(f"method {method_name!r} needs the entity file of article {article['uid']!r} "
                         "(--entities results/synth/entigraph/entities/UID.json)")
    uid = str(article["uid"])
    sampling = cfg["synthesis"]["sampling"]
    model = generator_name(cfg)
    planned: list[tuple[str, Task, int]] = []
    seen: set[str] = set()
    for task in method.plan(article, entities_doc):
        max_new = task.max_new_tokens or method.max_new_tokens()
        seed = task.fixed["seed"] if task.fixed else request_seed(sampling["seed"], uid, task.kind, task.entities,
                                                                  task.repeat)
        rid = record_id(uid, task.prompt_version, task.entities, model, seed, sampling_key(sampling, max_new))
        if rid not in seen:
            seen.add(rid)
            planned.append((rid, task, seed))
    return ArticleRun(cfg, method_name, method, uid, model, generation_hash(cfg, method), planned)


def generate_missing(run: ArticleRun, work: AppendOnlyJsonl, make_backend: Callable[[], Any]) -> None:
    """Append a record for every planned text the working shard lacks: fixed texts as they are, the others
    generated in one engine call (the engine is built only when something is left to generate)."""
    run.reused = sum(1 for rid, _, _ in run.planned if rid in work)
    pending: dict[str, tuple[Task, int]] = {}
    requests = []
    for rid, task, seed in run.planned:
        if rid in work:
            continue
        if task.fixed:
            f = task.fixed
            work.append(run.record(rid, task, seed, f["text"], f["prompt_tokens"], f["completion_tokens"],
                                   f["finish_reason"]))
            continue
        pending[rid] = (task, seed)
        requests.append(run.request(rid, task, seed))
    if not requests:
        return
    backend = make_backend()
    progress = Progress(len(requests), f"{run.method_name}/{run.uid}")
    try:
        for c in backend.generate(requests):
            if c.id not in pending:
                continue
            task, seed = pending.pop(c.id)
            run.run_prompt += c.prompt_tokens
            run.run_completion += c.completion_tokens
            if c.error:
                run.fail(c.id, task, c.error)
            else:
                work.append(run.record(c.id, task, seed, c.text, c.prompt_tokens, c.completion_tokens,
                                       c.finish_reason, c.cached_prompt_tokens))
                run.generated += 1
            progress.update(c.completion_tokens)
    finally:
        progress.close()
        backend.close()
    for rid, (task, _) in pending.items():  # an engine that dropped a request: count it as failed
        run.fail(rid, task, "no completion returned by the engine")


def article_stats(run: ArticleRun, records: list[dict], entities_doc: dict | None, wall: float) -> dict:
    """The stats of one article: what is planned and recorded, and what this run requested and generated."""
    kinds: dict[str, int] = {}
    for _, task, _ in run.planned:
        kinds[task.kind] = kinds.get(task.kind, 0) + 1
    fixed_ids = {rid for rid, task, _ in run.planned if task.fixed}
    generated_records = [r for r in records if r["id"] not in fixed_ids]
    stats = {
        "method": run.method_name, "article_uid": run.uid, "model": run.model,
        "backend": run.cfg["synthesis"]["backend"], "config_hash": run.chash, "planned": len(run.planned),
        "planned_by_kind": kinds, "records": len(records), "missing": len(run.planned) - len(records),
        "generated": run.generated, "reused": run.reused, "failures": len(run.failures),
        "failed_requests": run.failures[:50],
        # every text's request, whichever run made it (the summary's request is the extraction's, counted there)
        "requests": len(generated_records) + len(run.failures),
        "prompt_tokens": sum(r["prompt_tokens"] for r in generated_records),
        "completion_tokens": sum(r["completion_tokens"] for r in generated_records),
        "run": {"requests": run.generated + len(run.failures), "prompt_tokens": run.run_prompt,
                "completion_tokens": run.run_completion, "wall_seconds": round(wall, 3),
                "completion_tokens_per_second": round(run.run_completion / wall, 2) if wall > 0 else None},
    }
    if entities_doc is not None:
        stats["extraction"] = {"status": entities_doc.get("status"), "reason": entities_doc.get("reason"),
                               "entities": len(entities_doc.get("entities") or [])}
    return stats


def synthesize_article(cfg: dict, method_name: str, article: dict, output: str | Path, stats_path: str | Path,
                       entities_doc: dict | None = None, work_path: str | Path | None = None,
                       make_backend: Callable[[], Any] | None = None) -> dict:
    """Generate every planned text of `method_name` for one article; write the final shard and its stats.

    Returns the stats. Raises SynthesisIncomplete (after writing nothing final) when more requests failed than
    synthesis.max_failed_fraction allows.
    """
    t0 = time.perf_counter()
    run = plan_article(cfg, method_name, article, entities_doc)
    work_path = Path(work_path) if work_path else default_work_path(output)
    with AppendOnlyJsonl(work_path) as work:
        generate_missing(run, work, make_backend or backend_factory(cfg))
    done = read_work_shard(work_path)
    records = [done[rid] for rid, _, _ in run.planned if rid in done]
    stats = article_stats(run, records, entities_doc, time.perf_counter() - t0)
    if stats["missing"] > float(cfg["synthesis"]["max_failed_fraction"]) * len(run.planned):
        stats["status"] = "incomplete"
        write_json_atomic(Path(stats_path).with_suffix(".incomplete.json"), stats)
        failures = run.failures
        raise SynthesisIncomplete(
            f"{method_name}/{run.uid}: {stats['missing']} of {len(run.planned)} planned texts have no record "
            f"({len(failures)} requests failed this run, e.g. {failures[0]['error'] if failures else 'n/a'}); "
            f"finished records are kept in {work_path}; re-run to retry only the missing ones "
            "(or raise synthesis.max_failed_fraction)")
    stats["status"] = "complete"
    write_jsonl_atomic(output, records)
    write_json_atomic(stats_path, stats)
    Path(stats_path).with_suffix(".incomplete.json").unlink(missing_ok=True)
    return stats


# ------------------------------------------------------------------------------------------------ shards
def shard_id(index: int, uids: Sequence[str]) -> str:
    """Name of a shard: its position and a hash of its article list, so that a shard whose articles change
    between runs is a new shard (rebuilt from the per-article caches), never a mix of old and new outputs."""
    return f"{index:04d}-{stable_hash('shard', [str(u) for u in uids], n=8)}"


def article_shards(uids: Sequence[str], per_job: int) -> list[tuple[str, list[str]]]:
    """The articles cut into jobs of `per_job` (synthesis.articles_per_job), in corpus order: [(shard id, uids)]."""
    per = max(1, int(per_job))
    uids = [str(u) for u in uids]
    return [(shard_id(i // per, uids[i:i + per]), uids[i:i + per]) for i in range(0, len(uids), per)]


def check_shard(shard: str, uids: Sequence[str]) -> None:
    """The article list a shard job got must be the one its name was made from."""
    index = shard.split("-", 1)[0]
    if not index.isdigit() or shard != shard_id(int(index), uids):
        raise InputError(f"shard {shard!r} does not hold articles {', '.join(uids)} (its name is made from its "
                         "article list): re-run Snakemake so that the shard is rebuilt")


class SharedEngine:
    """One engine for every article of a shard job: built on first need (a fully cached shard loads nothing),
    handed to the per-article steps with a no-op close(), shut down by `shutdown()` at the end of the job."""

    def __init__(self, make: Callable[[], Any], label: str) -> None:
        self._make = make
        self.label = label
        self.engine: Any = None
        self.starts = 0
        self.startup_seconds = 0.0

    def __call__(self) -> "SharedEngine":
        if self.engine is None:
            t0 = time.perf_counter()
            self.engine = self._make()
            self.startup_seconds = time.perf_counter() - t0
            self.starts += 1
            print(f"engine {self.label} started in {self.startup_seconds:.1f}s (start {self.starts} of this job)",
                  file=sys.stderr, flush=True)
        return self

    @property
    def model(self) -> str:
        return getattr(self.engine, "model", "")

    def generate(self, requests: Iterable[GenerationRequest]) -> Any:
        return self.engine.generate(requests)

    def close(self) -> None:
        """Kept open for the shard's next article."""

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


class Deferred(Exception):
    """Raised by BatchRounds.generate: the requests are collected for the shard's next batch."""


class BatchRounds:
    """The engine of a shard job on a Batch API (synthesis.backend: openai_batch): every article's requests go
    into one batch per round instead of one batch per article.

    A round runs each per-article step with this object as its engine: a step whose requests have no result yet
    adds them to the round and stops (Deferred, nothing final written); then one `generate` call submits them
    all, and the next round runs the steps again with the results at hand. Synthesis takes two rounds;
    extraction one more per retried attempt. The batch ids live in `state_path` (the shard's work folder), so a
    killed job re-attaches to its batches (workflow_scripts/backends/openai_batch.py)."""

    def __init__(self, engine: SharedEngine, state_path: Path) -> None:
        self.shared = engine
        self.state_path = state_path
        self.results: dict[str, Any] = {}
        self.wanted: dict[str, GenerationRequest] = {}

    def __call__(self) -> "BatchRounds":
        return self

    @property
    def model(self) -> str:
        return self.shared.model

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterable[Any]:
        reqs = list(requests)
        missing = [r for r in reqs if r.id not in self.results]
        if missing:
            self.wanted.update({r.id: r for r in missing})
            raise Deferred(f"{len(missing)} requests wait for the next batch")
        return iter([self.results[r.id] for r in reqs])

    def close(self) -> None:
        """Kept open for the shard's next article."""

    def run_round(self) -> None:
        from .backends.common import error_completion

        reqs, self.wanted = list(self.wanted.values()), {}
        engine = self.shared().engine
        if hasattr(engine, "state_path"):
            engine.state_path = self.state_path
        for c in engine.generate(reqs):
            self.results[c.id] = c
        for r in reqs:  # an engine that dropped a request: an error result, so the step goes on
            if r.id not in self.results:
                self.results[r.id] = error_completion(r, self.model, "no completion returned by the engine")

    def run(self, step: Callable[[dict], None], articles: list[dict], max_rounds: int = 64) -> None:
        """Run `step(article)` for every article, batching the requests of each round."""
        for _ in range(max_rounds):
            waiting = []
            for article in articles:
                try:
                    step(article)
                except Deferred:
                    waiting.append(article)
            if not waiting:
                return
            self.run_round()
            articles = waiting
        raise RuntimeError(f"articles still waiting for results after {max_rounds} batch rounds")


def batch_rounds(cfg: dict, engine: SharedEngine, work_dir: Path, shard: str) -> BatchRounds | None:
    """The shard's batch rounds when the engine is a Batch API, else None (engines that answer at once)."""
    if cfg["synthesis"]["backend"] != "openai_batch":
        return None
    return BatchRounds(engine, work_dir / "batches" / f"{shard}.json")


def load_articles(articles_path: str | Path, uids: Sequence[str]) -> list[dict]:
    """The shard's articles, in its order (one pass over the article file)."""
    want = {str(u) for u in uids}
    found = {str(rec.get("uid")): rec for _, rec in iter_jsonl(articles_path) if str(rec.get("uid")) in want}
    missing = [u for u in uids if u not in found]
    if missing:
        raise InputError(f"{articles_path}: no article with uid {missing[0]!r} (is the article list from another "
                         "data config?)")
    return [found[str(u)] for u in uids]


def read_entities_doc(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: entity file not found (run the extract step first)") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}: malformed JSON ({err.msg}); delete it and re-run the extract "
                         "step") from None


def _shard_manifest(outdir: Path, shard: str, uids: Sequence[str], step: str, engine: SharedEngine,
                    results: dict[str, str], wall: float) -> None:
    write_json_atomic(outdir / "manifest.json", {
        "shard": shard, "step": step, "articles": list(uids), "status": results,
        "engine_starts": engine.starts, "engine_startup_seconds": round(engine.startup_seconds, 2),
        "wall_seconds": round(wall, 2)})


def prepare_shard_dir(outdir: Path, uids: Sequence[str]) -> None:
    """A shard folder left by a run with another article list is cleared (its outputs are never mixed in)."""
    manifest = outdir / "manifest.json"
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text(encoding="utf-8")).get("articles")
        except json.JSONDecodeError:
            old = None
        if old != list(uids):
            import shutil

            shutil.rmtree(outdir)
    outdir.mkdir(parents=True, exist_ok=True)


def synthesize_shard(cfg: dict, method_name: str, articles_path: str | Path, shard: str, uids: Sequence[str],
                     outdir: str | Path, work_dir: str | Path, entities_dir: str | Path | None = None,
                     make_backend: Callable[[], Any] | None = None) -> dict[str, str]:
    """All texts of one method for the articles of one shard, with one engine: OUTDIR/{uid}.jsonl and
    OUTDIR/stats/{uid}.json per article (the per-article contract), the working shards in WORK_DIR/{uid}.jsonl.

    Every article is attempted even when one is incomplete (its finished records stay cached); the job then
    fails (SynthesisIncomplete) naming them."""
    t0 = time.perf_counter()
    check_shard(shard, uids)
    outdir, work_dir = Path(outdir), Path(work_dir)
    prepare_shard_dir(outdir, uids)
    method = get_method(method_name, cfg)
    if method.needs_entities and not entities_dir:
        raise InputError(f"method {method_name!r} needs the entity files (--entities-dir "
                         "results/synth/entigraph/entities)")
    engine = SharedEngine(make_backend or backend_factory(cfg), cfg["synthesis"]["backend"])
    rounds = batch_rounds(cfg, engine, work_dir, shard)
    results: dict[str, str] = {}
    incomplete: list[str] = []

    def one(article: dict) -> None:
        uid = str(article["uid"])
        doc = read_entities_doc(Path(entities_dir) / f"{uid}.json") if method.needs_entities else None
        try:
            st = synthesize_article(cfg, method_name, article, outdir / f"{uid}.jsonl",
                                    outdir / "stats" / f"{uid}.json", doc, work_dir / f"{uid}.jsonl",
                                    rounds or engine)
        except SynthesisIncomplete as err:
            results[uid] = "incomplete"
            incomplete.append(str(err))
            print(f"incomplete: {err}", file=sys.stderr, flush=True)
            return
        results[uid] = st["status"]
        print(f"{method_name}/{uid}: {st['records']} records ({st['generated']} generated, {st['reused']} "
              f"reused, {st['failures']} failed) in {st['run']['wall_seconds']:.1f}s", file=sys.stderr,
              flush=True)

    try:
        articles = load_articles(articles_path, uids)
        if rounds is not None:
            rounds.run(one, articles)
        else:
            for article in articles:
                one(article)
    finally:
        engine.shutdown()
        _shard_manifest(outdir, shard, uids, f"synthesize:{method_name}", engine, results,
                        time.perf_counter() - t0)
    print(f"shard {shard}: {len(uids)} articles, engine started {engine.starts} time(s)", file=sys.stderr)
    if incomplete:
        raise SynthesisIncomplete(f"shard {shard}: {len(incomplete)} of {len(uids)} articles incomplete; "
                                  f"first: {incomplete[0]}")
    return results


def extract_shard(cfg: dict, articles_path: str | Path, shard: str, uids: Sequence[str], outdir: str | Path,
                  work_dir: str | Path, make_backend: Callable[[], Any] | None = None) -> dict[str, str]:
    """EntiGraph entity extraction of one shard's articles with one engine: OUTDIR/{uid}.json per article, the
    attempt caches in WORK_DIR/{uid}.jsonl."""
    t0 = time.perf_counter()
    check_shard(shard, uids)
    outdir, work_dir = Path(outdir), Path(work_dir)
    prepare_shard_dir(outdir, uids)
    engine = SharedEngine(make_backend or backend_factory(cfg), cfg["synthesis"]["backend"])
    rounds = batch_rounds(cfg, engine, work_dir, shard)
    results: dict[str, str] = {}

    def one(article: dict) -> None:
        uid = str(article["uid"])
        doc = extract_entities(cfg, article, work_dir / f"{uid}.jsonl", rounds or engine)
        write_json_atomic(outdir / f"{uid}.json", doc)
        results[uid] = doc["status"]
        print(f"{uid}: extraction {doc['status']} ({len(doc['entities'])} entities"
              f"{'; ' + doc['reason'] if doc.get('reason') else ''})", file=sys.stderr, flush=True)

    try:
        articles = load_articles(articles_path, uids)
        if rounds is not None:
            rounds.run(one, articles)
        else:
            for article in articles:
                one(article)
    finally:
        engine.shutdown()
        _shard_manifest(outdir, shard, uids, "extract", engine, results, time.perf_counter() - t0)
    print(f"shard {shard}: {len(uids)} articles, engine started {engine.starts} time(s)", file=sys.stderr)
    return results


# ------------------------------------------------------------------------------------------------ command line
def _methods_listing(cfg: dict) -> dict:
    out = {}
    for name in [*BUILTIN_METHODS, *(cfg["synthesis"].get("families") or {})]:
        m = get_method(name, cfg)
        out[name] = {"class": f"{type(m).__module__}:{type(m).__name__}", "needs_entities": m.needs_entities,
                     "settings": m.settings(), "configured": name in cfg["synthesis"]["methods"]}
    return out


def _parser() -> argparse.ArgumentParser:
    p = stage.parser("synthesis", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    stage.subcommand(sub, "methods", "list the registered synthesis methods, their templates and prompt versions",
                     config=True)

    e = stage.subcommand(sub, "extract", "EntiGraph step 1: summary + entity list of one article (JSON file)",
                         config=True)
    e.add_argument("--articles", required=True, help="results/data/articles.jsonl")
    e.add_argument("--article", required=True, help="article uid")
    e.add_argument("--output", required=True, help="results/synth/entigraph/entities/UID.json")
    e.add_argument("--work", default=None, help="attempt cache (default: OUTPUT's folder/../work/extraction/UID.jsonl)")
    e.add_argument("--engine", default=None, metavar="MODULE:CLASS", help="an engine class outside backends/")

    s = stage.subcommand(sub, "synthesize", "all texts of one method for one article (append-only, resumable)",
                         config=True)
    s.add_argument("--method", required=True)
    s.add_argument("--articles", required=True, help="results/data/articles.jsonl")
    s.add_argument("--article", required=True, help="article uid")
    s.add_argument("--entities", default=None, help="entity file (methods that need entities: entigraph)")
    s.add_argument("--output", required=True, help="results/synth/METHOD/UID.jsonl (written when complete)")
    s.add_argument("--stats", required=True, help="results/synth/METHOD/stats/UID.json")
    s.add_argument("--work", default=None, help="working shard (default: OUTPUT's folder/work/UID.jsonl)")
    s.add_argument("--engine", default=None, metavar="MODULE:CLASS", help="an engine class outside backends/")

    for name, what in (("extract-shard", "entity extraction of a shard of articles, one engine start"),
                       ("synthesize-shard", "all texts of one method for a shard of articles, one engine start")):
        x = stage.subcommand(sub, name, what, config=True)
        if name == "synthesize-shard":
            x.add_argument("--method", required=True)
            x.add_argument("--entities-dir", default=None, help="results/synth/entigraph/entities (entigraph)")
        x.add_argument("--articles", required=True, help="results/data/articles.jsonl")
        x.add_argument("--shard", required=True, help="shard id (synthesis.article_shards)")
        x.add_argument("--shard-articles", required=True, nargs="+", metavar="UID", help="the shard's article uids")
        x.add_argument("--outdir", required=True, help="the shard's folder: UID.json(l) (+ stats/UID.json)")
        x.add_argument("--work-dir", required=True, help="per-article caches: results/synth/METHOD/work")
        x.add_argument("--engine", default=None, metavar="MODULE:CLASS", help="an engine class outside backends/")

    r = stage.subcommand(sub, "report", "ledger (requests, tokens, cost, time) + corpus report of one method",
                         config=True)
    r.add_argument("--method", required=True)
    r.add_argument("--articles", required=True)
    r.add_argument("--synth-dir", required=True, help="results/synth/METHOD (shards and stats/)")
    r.add_argument("--entities-dir", default=None, help="results/synth/entigraph/entities (entity coverage)")
    r.add_argument("--ledger", required=True)
    r.add_argument("--report", required=True)
    r.add_argument("--table", required=True, help="CSV table for the Snakemake report")
    return p


def _run(args: argparse.Namespace, cfg: dict) -> None:
    if args.cmd == "methods":
        print(json.dumps(_methods_listing(cfg), indent=2))
    elif args.cmd == "extract":
        article = load_article(args.articles, args.article)
        work = args.work or Path(args.output).parent.parent / "work" / "extraction" / f"{args.article}.jsonl"
        doc = extract_entities(cfg, article, work, backend_factory(cfg, args.engine))
        write_json_atomic(args.output, doc)
        print(f"{args.article}: extraction {doc['status']} ({len(doc['entities'])} entities"
              f"{'; ' + doc['reason'] if doc.get('reason') else ''})", file=sys.stderr)
    elif args.cmd == "synthesize":
        article = load_article(args.articles, args.article)
        entities_doc = read_entities_doc(args.entities) if args.entities else None
        st = synthesize_article(cfg, args.method, article, args.output, args.stats, entities_doc, args.work,
                                backend_factory(cfg, args.engine))
        print(f"{args.method}/{args.article}: {st['records']} records ({st['generated']} generated, "
              f"{st['reused']} reused, {st['failures']} failed) in {st['run']['wall_seconds']:.1f}s",
              file=sys.stderr)
    elif args.cmd == "extract-shard":
        extract_shard(cfg, args.articles, args.shard, args.shard_articles, args.outdir, args.work_dir,
                      backend_factory(cfg, args.engine))
    elif args.cmd == "synthesize-shard":
        synthesize_shard(cfg, args.method, args.articles, args.shard, args.shard_articles, args.outdir,
                         args.work_dir, args.entities_dir, backend_factory(cfg, args.engine))
    elif args.cmd == "report":
        from .synth_report import write_method_report

        rep = write_method_report(cfg, args.method, args.articles, args.synth_dir, args.entities_dir,
                                  args.ledger, args.report, args.table)
        print(f"{args.method}: {rep['records']} records, {rep['tokens']} tokens", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # an incomplete article keeps exit status 1: its finished records are cached and a re-run retries the rest
    return stage.run(lambda: _run(args, stage.config(args)), exits={SynthesisIncomplete: ("error", 1)})


if __name__ == "__main__":
    sys.exit(main())
