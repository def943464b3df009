"""Benchmark of loglik QA scoring: KV-cache reuse + batching (qa_eval.LoglikScorer) against a naive forward pass
per option, on the same questions, in one process, one run each.

    python benchmarks/bench_eval.py [--questions 4] [--threads 2] [--results-md benchmarks/RESULTS.md]

Modes:
- naive: one full forward pass over 5-shot prefix + question + option for every option (4 per question);
- prefix: the 5-shot prefix run once and its cache reused; each question run once; its 4 options as one batch;
- prefix+batch: the same, with `--batch-questions` questions (and their 4 x that many options) per forward;
- with `--compare-rev REV`: qa_eval.LoglikScorer as it was at git revision REV, with `--batch-questions`, side
  by side (e.g. `--compare-rev bc1031c^`, the scorer before packed rows: one padded row per option).
All three feed identical token ids; the script checks that the scores agree (max |difference|) and that the
predictions are identical. Needs results/data/questions.jsonl + articles.jsonl and the converted demo model
(`snakemake --cores 2 results/data/prepare_stats.json results/hf_models/smollm2-135m-instruct`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import subprocess
import tempfile
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workflow_scripts import qa_eval  # noqa: E402


def scorer_at(rev: str):  # type: ignore[no-untyped-def]
    """qa_eval.LoglikScorer as it was at git revision `rev` (imported beside the current package)."""
    src = subprocess.run(["git", "show", f"{rev}:workflow_scripts/qa_eval.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "qa_eval_rev.py"
    path.write_text(src, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("workflow_scripts.qa_eval_rev", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod.LoglikScorer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="results/hf_models/smollm2-135m-instruct")
    p.add_argument("--questions", type=int, default=4, help="first N questions of results/data/questions.jsonl")
    p.add_argument("--batch-questions", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare-rev", default=None, help="also time LoglikScorer as it was at this git revision")
    p.add_argument("--results-md", default=None, help="append a section to this markdown file")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    questions, articles = qa_eval.load_inputs("results/data/questions.jsonl", "results/data/articles.jsonl")
    questions = questions[: args.questions]
    prefix = qa_eval.load_prompt_template()
    lcfg = {"continuation": " {option}", "normalization": "per_char"}
    items = [(qa_eval.render_question(q, articles[q["article_uid"]]),
              [qa_eval.option_continuation(lcfg["continuation"], q, j) for j in range(4)]) for q in questions]
    model, tok = qa_eval.load_local_model(args.model, {"device": "cpu", "dtype": "float32"})

    modes = [("naive", 1, False, qa_eval.LoglikScorer), ("prefix", 1, True, qa_eval.LoglikScorer),
             ("prefix+batch", args.batch_questions, True, qa_eval.LoglikScorer)]
    if args.compare_rev:
        modes.append((f"scorer at {args.compare_rev}", args.batch_questions, True, scorer_at(args.compare_rev)))
    rows, scores = [], {}
    for name, bq, reuse, scorer_cls in modes:
        scorer = scorer_cls(model, tok, prefix, batch_questions=bq, reuse_prefix_cache=reuse)
        load0 = os.getloadavg()[0]
        c0, t0 = time.process_time(), time.time()
        scores[name] = scorer.score(items)
        wall, cpu = time.time() - t0, time.process_time() - c0
        rows.append({"mode": name, "batch_questions": bq, "reuse": "on" if reuse else "off", "seconds": wall,
                     "cpu_seconds": cpu, "forward_tokens": scorer.forward_tokens,
                     "load": (load0 + os.getloadavg()[0]) / 2})
        print(f"{name}: {wall:.1f}s wall, {cpu:.1f}s cpu, {scorer.forward_tokens} tokens", file=sys.stderr)

    ref = scores["naive"]
    max_diff = max(abs(a["logprob"] - b["logprob"]) for name in scores for ra, rb in zip(scores[name], ref)
                   for a, b in zip(ra, rb))
    same_pred = all(qa_eval.loglik_predictions(a) == qa_eval.loglik_predictions(b)
                    for name in scores for a, b in zip(scores[name], ref))
    base = rows[0]["seconds"]
    n_prefix = len(qa_eval.LoglikScorer(model, tok, prefix).prefix_ids)
    lines = [
        "## Evaluation: loglik QA scoring with prefix KV reuse and batching",
        "",
        f"Command: `python benchmarks/bench_eval.py --questions {args.questions} --batch-questions "
        f"{args.batch_questions} --threads {args.threads}"
        + (f" --compare-rev {args.compare_rev!r}" if args.compare_rev else "")
        + f" --results-md benchmarks/RESULTS.md` on "
        f"{datetime.date.today().isoformat()}.",
        "",
        f"Model {args.model} (float32, CPU, {args.threads} torch thread(s)); the first {len(questions)} questions of "
        f"results/data/questions.jsonl (demo config), each scored on its 4 options after the paper's 5-shot prefix "
        f"({n_prefix} tokens); continuation `\" {{option}}\"`. forward tokens = tokens run through the model "
        "(padding excluded).",
        "",
        "| mode | batch_questions | prefix reuse | seconds | cpu seconds | forward tokens | questions/s | speed-up vs naive (wall) | speed-up vs naive (cpu) | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['batch_questions']} | {r['reuse']} | {r['seconds']:.1f} | "
                     f"{r['cpu_seconds']:.1f} | {r['forward_tokens']} | {len(questions) / r['seconds']:.3f} | "
                     f"{base / r['seconds']:.2f}x | {rows[0]['cpu_seconds'] / r['cpu_seconds']:.2f}x | {r['load']:.1f} |")
    lines += [
        "",
        f"Scores agree with the naive pass: max |difference| {max_diff:.2e} nats; predictions identical under all "
        f"three normalizations: {'yes' if same_pred else 'NO'}.",
        f"Speed-up of prefix+batch over naive: {base / rows[2]['seconds']:.2f}x wall-clock, "
        f"{rows[0]['cpu_seconds'] / rows[2]['cpu_seconds']:.2f}x in CPU seconds, "
        f"{rows[0]['forward_tokens'] / rows[2]['forward_tokens']:.2f}x fewer forward tokens (target >= 3x). "
        + (f"Packed rows (prefix, prefix+batch) against the scorer at {args.compare_rev}: "
           f"{rows[3]['cpu_seconds'] / rows[1]['cpu_seconds']:.2f}x and "
           f"{rows[3]['cpu_seconds'] / rows[2]['cpu_seconds']:.2f}x fewer CPU seconds. " if args.compare_rev else "")
        + "Wall-clock ratios move with the other processes' load; CPU seconds and tokens are steadier. The shared prefix "
        "is paid once per model (a one-off cost included in the timings above), so the gain grows with the number "
        "of questions (4,609 at paper scale).",
        "",
        "2 CPU cores shared with other developers' processes (load average in the last column), so absolute times "
        "are noisy; the runs were sequential in one process with one model, so the ratios are the result.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.results_md:
        path = ROOT / args.results_md
        old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n\n"
        path.write_text(old.rstrip("\n") + "\n\n" + text, encoding="utf-8")
    return 0 if same_pred else 1


if __name__ == "__main__":
    sys.exit(main())
