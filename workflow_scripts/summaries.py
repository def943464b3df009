"""Summaries by instruction-tuned models (paper Table 5), and the qualitative instruction-following report.

    python -m workflow_scripts.summaries summarize --model-id entigraph-384-instruct \\
        --model-path results/models/entigraph-384/instruct --articles results/data/articles.jsonl \\
        --output results/instruct/summaries/entigraph-384-instruct.jsonl [--configfile config.yaml]
    python -m workflow_scripts.summaries examples --model-id ... --model-path ... --articles ... --questions ... \\
        --output-jsonl results/instruct/examples/M.jsonl --output-html results/instruct/examples/M.html

Summaries: each article with the paper's two prompts (Table 5, verbatim in workflow_scripts/prompts/summary_*.txt),
as a user message through the model's chat template, on any engine (instruct.summaries.engine). The article is
never in the prompt: the model writes from what it learned. One record per (article, prompt): id, model,
article_uid, prompt (short | long), the prompt text, summary, finish_reason, token counts, error. A failed
generation is a record with `error` set (the judge counts it as failed), never a missing line. Records go to an
append-only work file first, so a rerun resumes; the output is written atomically when all are done.

Examples: the three kinds of instruction of the paper's examples (section 4.3): an explicit reference to an
article (title and author named), an implicit reference (a question about the article's content that does not
name it: a QuALITY question of the article, without its options), and a cross-article instruction (two
articles named together). The wording is this project's; the answers go into a small HTML page per model that
the Snakemake report shows.
"""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from . import stage
from .io_utils import AppendOnlyJsonl, InputError, iter_jsonl, stable_hash, write_jsonl_atomic, write_text_atomic
from .job_keys import shaping_part
from .quality import author_first_last

PROMPT_KINDS = ("short", "long")


def summary_prompt(kind: str, article: dict) -> str:
    """Paper Table 5: `{article title}` and `{author name}` filled with the title and the author as First Last."""
    from .templates import load_template

    if kind not in PROMPT_KINDS:
        raise InputError(f"instruct.summaries.prompts: unknown prompt {kind!r}; use short and/or long")
    author = author_first_last(article.get("author")) or "an unknown author"
    title = str(article.get("title") or article["uid"]).strip()
    return load_template(f"summary_{kind}").replace("{article title}", title).replace("{author name}", author)


def example_prompts(articles: Sequence[dict], questions: Sequence[dict]) -> list[dict]:
    """The qualitative instructions: explicit and implicit references for the first article, and one
    cross-article instruction over the first two (when there are two)."""
    if not articles:
        raise InputError("no articles for the instruction examples")
    a = articles[0]
    ref = f"\"{str(a.get('title')).strip()}\" by {author_first_last(a.get('author')) or 'an unknown author'}"
    out = [{"kind": "explicit reference", "article_uids": [a["uid"]],
            "prompt": f"What happens in the story {ref}? Describe its main characters and events."}]
    q = next((q for q in questions if str(q["article_uid"]) == str(a["uid"])), None)
    if q is not None:
        out.append({"kind": "implicit reference", "article_uids": [a["uid"]], "prompt": q["question"]})
    if len(articles) > 1:
        b = articles[1]
        ref_b = f"\"{str(b.get('title')).strip()}\" by {author_first_last(b.get('author')) or 'an unknown author'}"
        out.append({"kind": "cross-article", "article_uids": [a["uid"], b["uid"]],
                    "prompt": f"Compare the stories {ref} and {ref_b}. What do they have in common, and how do "
                              "they differ?"})
    return out


def make_backend(cfg: dict, engine: str, model: str) -> Any:
    """Engine `engine` serving `model` (backends.engine_for; imported lazily, as every engine is)."""
    from .backends import engine_for

    return engine_for(cfg, engine, model)


def generate(cfg: dict, model_id: str, model_path: str, tasks: list[dict], work: Path, scfg: dict,
             backend: Any = None) -> list[dict]:
    """Run tasks ({id, prompt, max_new_tokens, ...}) on the engine, resuming from `work`; returns records."""
    from .backends import GenerationRequest

    with AppendOnlyJsonl(work) as shard:
        todo = [t for t in tasks if t["id"] not in shard]
        if todo:
            own = backend is None
            backend = backend or make_backend(cfg, scfg["engine"], model_path)
            reqs = [GenerationRequest(id=t["id"], messages=[{"role": "user", "content": t["prompt"]}],
                                      group=model_id, max_new_tokens=t["max_new_tokens"],
                                      temperature=scfg["temperature"], top_p=scfg["top_p"],
                                      seed=int(stable_hash(scfg["seed"], t["id"], n=8), 16)) for t in todo]
            by_id = {t["id"]: t for t in todo}
            try:
                for c in backend.generate(reqs):
                    t = by_id[c.id]
                    shard.append({**t, "model": model_id, "summary": c.text if not c.error else None,
                                  "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                                  "completion_tokens": c.completion_tokens, "error": c.error})
            finally:
                if own:
                    backend.close()
    done = {r["id"]: r for _, r in iter_jsonl(work)}
    return [done[t["id"]] for t in tasks]


def model_fingerprint(model_path: str) -> str:
    """What identifies the weights behind a model path: its train_summary.json (fingerprint, loss, wall time) when
    it is a trained folder, else the path or name. Part of every record id, so a retrained model's work file is
    never reused."""
    summary = Path(model_path) / "train_summary.json"
    if summary.exists():
        s = json.loads(summary.read_text(encoding="utf-8"))
        return stable_hash(s.get("fingerprint"), s.get("final_loss"), s.get("wall_seconds"), n=12)
    return str(model_path)


def summary_tasks(cfg: dict, model_id: str, articles: Sequence[dict], weights: str = "") -> list[dict]:
    scfg = cfg["instruct"]["summaries"]
    shaping = shaping_part(cfg, "instruct.summaries")  # ids (and so seeds) ignore threads and resources
    return [{"id": stable_hash(model_id, weights, a["uid"], kind, summary_prompt(kind, a), shaping, n=16),
             "article_uid": a["uid"],
             "prompt": kind, "prompt_text": summary_prompt(kind, a), "max_new_tokens": scfg["max_new_tokens"][kind]}
            for a in articles for kind in scfg["prompts"]]


def select_articles(path: str | Path, max_articles: int | None) -> list[dict]:
    arts = [a for _, a in iter_jsonl(path)]
    return arts[:max_articles] if max_articles else arts


def summarize(cfg: dict, model_id: str, model_path: str, articles_path: str | Path, output: str | Path,
              backend: Any = None) -> list[dict]:
    scfg = cfg["instruct"]["summaries"]
    tasks = summary_tasks(cfg, model_id, select_articles(articles_path, scfg["max_articles"]),
                          model_fingerprint(model_path))
    for t in tasks:
        t["prompt"], t["prompt_kind"] = t["prompt_text"], t["prompt"]  # the text goes to the engine
    records = generate(cfg, model_id, model_path, tasks, Path(str(output) + ".work.jsonl"), scfg, backend)
    out = [{"id": r["id"], "model": model_id, "article_uid": r["article_uid"], "prompt": r["prompt_kind"],
            "prompt_text": r["prompt_text"], "summary": r["summary"], "finish_reason": r["finish_reason"],
            "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"], "error": r["error"]}
           for r in records]
    write_jsonl_atomic(output, out)
    return out


def examples_html(model_id: str, records: Sequence[dict], titles: dict[str, str]) -> str:
    rows = "".join(
        f"<h3>{html.escape(r['kind'])}</h3><p><b>Articles:</b> "
        f"{html.escape(', '.join(titles.get(str(u), str(u)) for u in r['article_uids']))}</p>"
        f"<p><b>Instruction:</b> {html.escape(r['prompt'])}</p>"
        "<pre style='white-space:pre-wrap'>"
        f"{html.escape(r['summary'] or 'generation failed: ' + str(r['error']))}</pre>"
        for r in records)
    return (f"<html><head><meta charset='utf-8'><title>{html.escape(model_id)}</title></head><body>"
            f"<h2>Instruction following: {html.escape(model_id)}</h2>"
            "<p>The three kinds of instruction of the paper's examples (section 4.3); the article is not in the "
            f"prompt. Wording: this project's (workflow_scripts/summaries.py).</p>{rows}</body></html>\n")


def examples(cfg: dict, model_id: str, model_path: str, articles_path: str | Path, questions_path: str | Path,
             output_jsonl: str | Path, output_html: str | Path, backend: Any = None) -> list[dict]:
    ecfg = cfg["instruct"]["examples"]
    scfg = {**cfg["instruct"]["summaries"], "engine": cfg["instruct"]["summaries"]["engine"]}
    arts = select_articles(articles_path, None)
    qs = [q for _, q in iter_jsonl(questions_path)]
    weights = model_fingerprint(model_path)
    shaping = shaping_part(cfg, "instruct.summaries")  # ids (and so seeds) ignore threads and resources
    tasks = [{**p, "id": stable_hash(model_id, weights, p["kind"], p["prompt"], ecfg, shaping, n=16),
              "max_new_tokens": ecfg["max_new_tokens"]} for p in example_prompts(arts, qs)]
    records = generate(cfg, model_id, model_path, tasks, Path(str(output_jsonl) + ".work.jsonl"), scfg, backend)
    write_jsonl_atomic(output_jsonl, records)
    write_text_atomic(output_html, examples_html(model_id, records, {str(a["uid"]): str(a.get("title")) for a in arts}))
    return records


def main(argv: list[str] | None = None) -> int:
    p = stage.parser("summaries", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, what in (("summarize", "summaries of the articles by one instruct model"),
                       ("examples", "example answers and summaries of one model (JSONL + HTML)")):
        s = stage.subcommand(sub, name, what, config=True)
        s.add_argument("--model-id", required=True)
        s.add_argument("--model-path", required=True, help="the instruct model's folder (or the served name)")
        s.add_argument("--articles", required=True)
        if name == "summarize":
            s.add_argument("--output", required=True)
        else:
            s.add_argument("--questions", required=True)
            s.add_argument("--output-jsonl", required=True)
            s.add_argument("--output-html", required=True)
    args = p.parse_args(argv)

    def body() -> None:
        cfg = stage.config(args)
        if args.cmd == "summarize":
            recs = summarize(cfg, args.model_id, args.model_path, args.articles, args.output)
        else:
            recs = examples(cfg, args.model_id, args.model_path, args.articles, args.questions, args.output_jsonl,
                            args.output_html)
        print(json.dumps({"records": len(recs), "failed": sum(1 for r in recs if r.get("error"))}))

    return stage.run(body)


if __name__ == "__main__":
    sys.exit(main())
