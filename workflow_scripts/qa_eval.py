"""Stage 7: closed-book QuALITY QA, the paper's knowledge measure (the paper's evaluation section).

    python -m workflow_scripts.qa_eval --model-id base --model-path results/hf_models/smollm2-135m-instruct \\
        --questions results/data/questions.jsonl --articles results/data/articles.jsonl \\
        --output-jsonl results/eval/qa/base.jsonl --output-json results/eval/qa/base.json [--configfile config.yaml]

Every question is shown after the paper's 5-shot chain-of-thought prefix (Appendix I.1, kept verbatim in
prompts/qa_5shot_prefix.txt) in the paper's format (`render_question`). Two scoring modes (evaluation.modes):

- `cot` (the paper's): n sampled completions per question (temperature 0.1, up to 300 new tokens in the paper)
  through any generation backend (transformers on CPU, vLLM on GPU, openai for API models); the answer is read
  as the reference code does, from the `Answer: X.` stop the completion ended on (`evaluation.cot.answer_rule:
  reference`; `first_match` takes the first `answer: x` anywhere). Two conventions are reported: `accuracy` counts
  a question with no readable answer as wrong; `accuracy_attempted` drops it from the denominator (the reference
  code's way), with the `attempted` rate beside it.
- `loglik` (the demo's default): the model's log-likelihood of each option as the continuation of the same prompt,
  i.e. the thought process opening with the option's text (`" {option}"` after "Thought process:"; see
  docs/evaluation.md for why). Deterministic and cheap: the 5-shot prefix is run once per model and its KV cache
  reused for every question, each question is run once and its four options are scored as one batch on top of
  its cache (`LoglikScorer`). Predictions by total, per-token and per-character log-likelihood are all recorded.

Outputs: a JSONL record per question (qid, prompt id, option scores and/or completions, predicted index, correct)
and a JSON summary (n, accuracy with a Wilson and a bootstrap 95% interval, attempted, both CoT conventions, the
split by QuALITY's `difficult` flag, and `reported`: all questions and the reference code's 20/80 val/test article
split, each under both conventions with n and interval). Closed-book QA and RAG share `evaluate_and_write`.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from . import stage
from .config import config_hash
from .io_utils import (AppendOnlyJsonl, InputError, iter_jsonl, stable_hash, write_json_atomic,
                       write_jsonl_atomic)
from .job_keys import shaping_part
from .layout import ARTICLES, QUESTIONS
from .quality import author_first_last
from .templates import load_template

DEFAULT_PREFIX = "qa_5shot_prefix.txt"
LETTERS = "ABCD"
MODES = ("loglik", "cot")
NORMALIZATIONS = ("sum", "per_token", "per_char")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- prompts
def load_prompt_template(name_or_path: str | Path = DEFAULT_PREFIX) -> str:
    """Read a prompt template verbatim: a file name in workflow_scripts/prompts/ or a path. Leading lines starting
    with `%%` (comments a user may put at the top of their own prefix file) are not part of the prompt."""
    return load_template(name_or_path, keep_final_newline=True, skip_comment_header=True,
                         hint="set evaluation.prompt_prefix to a file name in that folder or a path")


def prompt_version(text: str) -> str:
    """Short hash of a prompt text, recorded with every result so that a prompt change is visible."""
    return stable_hash(text, n=12)


def lowercase_first(text: str) -> str:
    """The paper (and reference code) lowercases the question's first character, whatever it is."""
    return text[:1].lower() + text[1:]


def _present(value: Any) -> bool:
    return value is not None and str(value).strip() not in ("", "0", "None", "null")


def article_context(article: dict) -> str:
    """`In the context of "{title}", written by {First Last} in {year},` with missing parts left out sensibly
    (a user's own corpus may lack a year or an author)."""
    title = str(article.get("title") or "").strip()
    subject = f'"{title}"' if title else "the document"
    author = author_first_last(article.get("author"))
    year = article.get("year")
    year = str(year).strip() if _present(year) else ""
    if author and year:
        return f"In the context of {subject}, written by {author} in {year},"
    if author:
        return f"In the context of {subject}, written by {author},"
    if year:
        return f"In the context of {subject}, written in {year},"
    return f"In the context of {subject},"


def render_question(question: dict, article: dict, thought_process: bool = True, sep_after_question: str = "\n") -> str:
    """One question in the paper's format (Appendix I.1), byte for byte as the reference implementation writes it:
    question and options verbatim (QuALITY's trailing spaces included), the question's first letter lowercased,
    ending with `Thought process:` (no trailing space or newline) when `thought_process`. The RAG prompt uses
    `sep_after_question="\n\n"`: a blank line after the question line and before the thought process, as the
    reference's QuALITYQuestion.prompt writes it."""
    options = question["options"]
    if len(options) != 4:
        raise InputError(f"question {question.get('qid')!r}: {len(options)} options, expected 4")
    text = "### Question\n"
    text += (f"{article_context(article)} {lowercase_first(question['question'])} There is only one correct choice."
             f"{sep_after_question}")
    text += "### Choices\n"
    text += "".join(f"{LETTERS[i]}. {opt}\n" for i, opt in enumerate(options))
    if thought_process:
        if sep_after_question == "\n\n":
            text += "\n"
        text += "### Thought Process and Answer\nThought process:"
    return text


def option_continuation(template: str, question: dict, index: int) -> str:
    """The text whose log-likelihood scores option `index` (evaluation.loglik.continuation)."""
    return template.format(option=question["options"][index].strip(), letter=LETTERS[index])


# ----------------------------------------------------------------------------------------------- answers (cot)
# `Answer: C.` with any case and spacing of "answer", optional markdown emphasis or brackets around the letter.
# An uppercase letter must end there (punctuation, or spaces to the end of the line); a lowercase one must be
# followed by `.`, `)` or `]` or end the line, so that prose such as "Answer: A lot ..." never parses.
_ANSWER_RE = re.compile(
    r"\b(?i:answer)\s*[:：]\s*[*_]*\s*[(\[]?\s*"
    r"(?:([A-D])(?=\s*[).\]*_,:;]|[ \t]*$)|([a-d])(?=\s*[).\]]|[ \t]*$))",
    re.MULTILINE,
)


def extract_answer(completion: str | None) -> int | None:
    """Index (0-3) of the first `Answer: X.` in a completion, or None when there is none (the `first_match` rule).

    The first one counts, in any case and spacing of "answer". Unlike the reference parser (the character before
    the final period), "Answer: AB." is not read as B: it is no answer."""
    if not completion:
        return None
    m = _ANSWER_RE.search(completion)
    if m is None:
        return None
    return LETTERS.index((m.group(1) or m.group(2)).upper())


# The reference code's stop strings (utils/prompt_utils.py generate_all_answer_strings, used by inference/llama.py of
# the authors' repository) are `Answer: P.\n` for every ordering P of 1 to 4 distinct letters of ABCD; vLLM ends the
# completion at the first one, and the answer is the letter before the final period (the last letter of P).
REFERENCE_STOPS: tuple[str, ...] = tuple(f"Answer: {''.join(p)}.\n" for r in range(1, 5)
                                         for p in itertools.permutations(LETTERS, r))
# The authors' rule: only a stop string with its newline counts (vLLM's stop_reason is None, and the completion
# dropped, when generation ends any other way). `reference_eot` also reads a final `Answer: P.` at the very end of
# the text, where an engine that drops a matched stop (a hosted API whose `\n## Example` stop swallowed the newline)
# ends it.
_REFERENCE_STOP_RE = re.compile(r"Answer: ([ABCD]{1,4})\.\n")
_REFERENCE_EOT_RE = re.compile(r"Answer: ([ABCD]{1,4})\.(?:\n|\Z)")


def _first_stop(completion: str | None, pattern: re.Pattern) -> int | None:
    if not completion:
        return None
    for m in pattern.finditer(completion):
        letters = m.group(1)
        if len(set(letters)) == len(letters):  # a stop string: distinct letters only
            return LETTERS.index(letters[-1])
    return None


def extract_answer_reference(completion: str | None) -> int | None:
    """Index (0-3) read exactly as the authors' code does (the `reference` rule; inference/llama.py llama_forward
    and utils/prompt_utils.py second_last_character): from the first stop string `Answer: P.\n` in the text.

    vLLM ends the completion at the first such string, so it is the end of the text; reading the first occurrence
    gives the same letter for engines that do not stop (a hosted API). A completion cut at max tokens, one ending
    `Answer: C.` without the newline, or one that names a letter only in other words (`The correct answer: A, since
    ...`) is not attempted (None). As in the reference, `Answer: AB.\n` is read as B (the letter before the
    period)."""
    return _first_stop(completion, _REFERENCE_STOP_RE)


def extract_answer_reference_eot(completion: str | None) -> int | None:
    """The `reference_eot` rule: `reference`, and also a final `Answer: P.` at the end of the text without its
    newline (this workflow's earlier reference rule: an engine that drops the matched stop returns the text up to
    the period)."""
    return _first_stop(completion, _REFERENCE_EOT_RE)


ANSWER_RULES: dict[str, Callable[[str | None], int | None]] = {
    "reference": extract_answer_reference,
    "reference_eot": extract_answer_reference_eot,
    "first_match": extract_answer,
}


def read_answer(completion: str | None, rule: str = "reference") -> int | None:
    """The answer index of one completion under evaluation.cot.answer_rule."""
    try:
        return ANSWER_RULES[rule](completion)
    except KeyError:
        raise InputError(f"evaluation.cot.answer_rule {rule!r}: choose one of {', '.join(ANSWER_RULES)}") from None


def select_answer(answers: Sequence[int | None], how: str, rng: random.Random) -> int | None:
    """One answer from n samples: `first` valid (reference code), a seeded `random` valid one (the paper's
    description), or the `majority` among valid ones (ties to the earliest)."""
    valid = [a for a in answers if a is not None]
    if not valid:
        return None
    if how == "first":
        return valid[0]
    if how == "random":
        return rng.choice(valid)
    if how == "majority":
        counts = Counter(valid)
        best = max(counts.values())
        return next(a for a in valid if counts[a] == best)
    raise ValueError(f"unknown evaluation.cot.select {how!r}")


# ----------------------------------------------------------------------------------------------- statistics
def _z(level: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (NaNs for n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    z = _z(level)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(correct: Sequence[bool], n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of 0/1 outcomes (seeded)."""
    import numpy as np

    x = np.asarray(correct, dtype=float)
    if len(x) == 0 or n_boot <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def json_safe(obj: Any) -> Any:
    """NaN/inf (an empty split, no attempted question) -> null, so that the summaries are strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def accuracy_block(correct: Sequence[bool], ci: dict, seed: int) -> dict:
    n, k = len(correct), int(sum(correct))
    lo, hi = wilson_interval(k, n, ci["level"])
    out = {"n": n, "correct": k, "accuracy": k / n if n else float("nan"), "ci_low": lo, "ci_high": hi,
           "ci_method": f"wilson {ci['level']:.0%}"}
    if ci["bootstrap"] > 0:
        out["bootstrap_ci"] = list(bootstrap_interval(correct, ci["bootstrap"], ci["level"], seed))
    return out


def by_difficulty(records: Sequence[dict], key: Callable[[dict], bool], ci: dict, seed: int) -> dict:
    """Accuracy split by QuALITY's `difficult` flag (questions without the flag are left out of the split)."""
    out = {}
    for flag, name in ((1, "difficult"), (0, "not_difficult")):
        sel = [key(r) for r in records if r.get("difficult") == flag]
        if sel:
            out[name] = accuracy_block(sel, ci, seed)
    return out


# ----------------------------------------------------------------------------------------------- reported numbers
SPLITS = ("all", "val", "test")
CONVENTIONS = {"wrong": "unparseable questions counted wrong",
               "dropped": "unparseable questions dropped from the denominator (reference code)"}


def split_order(articles: Sequence[dict]) -> list[dict]:
    """Articles in the order the reference code splits them: sorted by their raw QuALITY title (`title_raw`, else
    `title`), a stable sort over articles.jsonl's order (train file, then dev), as tasks/quality.py of the authors'
    repository sorts train + dev by title before deduplicating."""
    return sorted(articles, key=lambda a: str(a.get("title_raw") if a.get("title_raw") is not None
                                              else a.get("title") or ""))


def article_split(articles: Sequence[dict], val_fraction: float = 0.2) -> dict[str, str]:
    """uid -> "val" | "test": the first int(val_fraction * n) articles in `split_order` are val, the rest test
    (the reference code's performance_stats())."""
    ordered = split_order(articles)
    n_val = int(val_fraction * len(ordered))
    return {a["uid"]: ("val" if i < n_val else "test") for i, a in enumerate(ordered)}


def convention_blocks(recs: Sequence[dict], level: float) -> dict:
    """Accuracy of per-question mode blocks under both conventions, each with its n and Wilson interval."""
    n = len(recs)
    att = [r for r in recs if r.get("attempted", r.get("predicted") is not None)]
    out: dict[str, Any] = {"questions": n, "attempted": len(att) / n if n else float("nan")}
    for conv, pool in (("wrong", recs), ("dropped", att)):
        k = int(sum(bool(r["correct"]) for r in pool))
        lo, hi = wilson_interval(k, len(pool), level)
        out[conv] = {"n": len(pool), "correct": k, "accuracy": k / len(pool) if pool else float("nan"),
                     "ci_low": lo, "ci_high": hi}
    return out


def reported_numbers(records: Sequence[dict], mode: str, split_of: dict[str, str] | None, level: float) -> dict:
    """{all, val, test} x {wrong, dropped}: what the tables can report (val/test only when a split is known)."""
    out = {"all": convention_blocks([r[mode] for r in records], level)}
    if split_of:
        for name in ("val", "test"):
            out[name] = convention_blocks([r[mode] for r in records if split_of.get(r["article_uid"]) == name], level)
    return out


# ----------------------------------------------------------------------------------------------- loglik scoring
class LoglikScorer:
    """Log-likelihoods of continuations after `shared_prefix + context`, reusing the prefix's key/value cache.

    The shared prefix (the 5-shot examples, identical for every question) is run once and its cache reused. Each
    batch of `batch_questions` questions then runs as ONE packed row on top of it: every context followed by its
    options, with a block attention mask and per-segment positions, so that each option sees exactly the prefix,
    its own context and itself. The prefix cache is thus never copied per row, no padding is computed, and the
    output layer runs only where a continuation token is predicted (1.6x fewer CPU seconds than one row per
    option on the demo; benchmarks/RESULTS.md). Segments are tokenized separately and concatenated (the usual
    loglik convention): the naive reference `naive_loglik` feeds the very same token ids, so both give the same
    numbers up to float error.
    """

    def __init__(self, model: Any, tokenizer: Any, shared_prefix: str, batch_questions: int = 4,
                 reuse_prefix_cache: bool = True) -> None:
        import torch

        self.torch = torch
        self.model = model.eval()
        self.tok = tokenizer
        self.device = next(model.parameters()).device
        self.batch_questions = max(1, int(batch_questions))
        self.reuse_prefix_cache = reuse_prefix_cache
        self.prefix_ids = self.encode_prefix(shared_prefix)
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        if reuse_prefix_cache and (getattr(cfg, "sliding_window", None)
                                   or any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or []))):
            # Sliding-window layers crop their cache, so a cached prefix is not a prefix of every row any more.
            log("loglik: the model uses sliding-window attention; scoring without cache reuse")
            self.reuse_prefix_cache = False
        if not self.prefix_ids:  # zero-shot prompt and a tokenizer without BOS: nothing to cache
            self.reuse_prefix_cache = False
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.forward_tokens = 0  # tokens run through the model, for the throughput report
        self._prefix_kv: list[tuple[Any, Any]] | None = None

    def encode_prefix(self, text: str) -> list[int]:
        """The prompt's first segment, with the tokenizer's special tokens (BOS where the model uses one)."""
        ids = self.tok(text)["input_ids"] if text else []
        if not ids and self.tok.bos_token_id is not None:
            ids = [self.tok.bos_token_id]
        return ids

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _prefix_cache(self) -> list[tuple[Any, Any]]:
        if self._prefix_kv is None:
            torch = self.torch
            ids = torch.tensor([self.prefix_ids], device=self.device)
            with torch.inference_mode():
                out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            self.forward_tokens += len(self.prefix_ids)
            self._prefix_kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return self._prefix_kv

    def _cache_from(self, kv: list[tuple[Any, Any]], rows: int) -> Any:
        from transformers import DynamicCache

        return DynamicCache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in kv],
                            config=self.model.config)

    def score(self, items: Sequence[tuple[str, Sequence[str]]], progress: bool = False) -> list[list[dict]]:
        """For each (context, continuations): per continuation {logprob (sum), tokens, chars}."""
        from tqdm import tqdm

        batches = [items[i:i + self.batch_questions] for i in range(0, len(items), self.batch_questions)]
        out: list[list[dict]] = []
        it = tqdm(batches, desc="loglik", unit="batch", disable=not progress, file=sys.stderr)
        for batch in it:
            if self.reuse_prefix_cache:
                out.extend(self._score_batch(batch))
            else:
                out.extend(self._score_batch_no_prefix_cache(batch))
        return out

    def _check_length(self, n: int) -> None:
        if self.max_positions and n > self.max_positions:
            raise InputError(f"a prompt of {n} tokens exceeds the model's {self.max_positions} positions; "
                             "shorten it (fewer RAG chunks, evaluation.rag.top_k) or use a longer-context model")

    def _score_batch(self, batch: Sequence[tuple[str, Sequence[str]]]) -> list[list[dict]]:
        """Score a batch as ONE packed row on top of the prefix cache: each question's context, then each of its
        options, with a block attention mask (a context sees the prefix and itself; an option sees the prefix,
        its own context and itself) and per-segment positions, so the prefix cache is never copied per row and
        no padding is computed. Logits are taken only where a continuation token is predicted."""
        torch = self.torch
        P = len(self.prefix_ids)
        ctx = [self.encode(c) for c, _ in batch]
        conts = [[self.encode(c) for c in cs] for _, cs in batch]
        if any(not c for c in ctx):
            raise ValueError("every context must be non-empty (the question text)")
        if any(not c for cs in conts for c in cs):
            raise ValueError("an option continuation tokenizes to nothing; check evaluation.loglik.continuation")
        self._check_length(P + max(len(c) for c in ctx) + max(len(c) for cs in conts for c in cs))
        ids, pos, seg_of, sources, targets = [], [], [], [], []  # sources[k] predicts targets[k]
        segments: list[tuple[int, int, int]] = []  # (start, end, start of the context it continues; -1 = itself)
        for c, cs in zip(ctx, conts):
            c0 = len(ids)
            ids += c
            pos += range(P, P + len(c))
            segments.append((c0, len(ids), -1))
            for o in cs:
                o0 = len(ids)
                ids += o
                pos += range(P + len(c), P + len(c) + len(o))
                segments.append((o0, len(ids), c0))
                # the first option token is predicted from the context's last token, the others from their left
                sources += [c0 + len(c) - 1] + list(range(o0, o0 + len(o) - 1))
                targets += o
        L = len(ids)
        allowed = torch.zeros((L, P + L), dtype=torch.bool)
        allowed[:, :P] = True
        causal = torch.ones((L, L), dtype=torch.bool).tril()
        for start, end, ctx_start in segments:
            allowed[start:end, P + start:P + end] = causal[start:end, start:end]
            if ctx_start >= 0:  # an option also sees its whole context
                ctx_end = next(e for s, e, _ in segments if s == ctx_start)
                allowed[start:end, P + ctx_start:P + ctx_end] = True
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros((1, 1, L, P + L), dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        cache = self._cache_from(self._prefix_cache(), 1)
        with torch.inference_mode():
            hidden = self.model.model(input_ids=torch.tensor([ids], device=self.device),
                                      attention_mask=mask.to(self.device),
                                      position_ids=torch.tensor([pos], device=self.device),
                                      past_key_values=cache, use_cache=True).last_hidden_state[0]
            logits = self.model.lm_head(hidden[torch.tensor(sources, device=self.device)]).float()
            lp = logits.gather(-1, torch.tensor(targets, device=self.device)[:, None])[:, 0] - logits.logsumexp(-1)
        self.forward_tokens += L
        lp = lp.tolist()
        results: list[list[dict]] = []
        k = 0
        for cs, (_, texts) in zip(conts, batch):
            row = []
            for o, text in zip(cs, texts):
                row.append({"logprob": sum(lp[k:k + len(o)]), "tokens": len(o), "chars": len(text)})
                k += len(o)
            results.append(row)
        return results

    def _score_batch_no_prefix_cache(self, batch: Sequence[tuple[str, Sequence[str]]]) -> list[list[dict]]:
        """The same numbers without any cache reuse, one option at a time (a baseline for the benchmark)."""
        return [[naive_loglik(self, ctx, c) for c in cs] for ctx, cs in batch]


def naive_loglik(scorer: LoglikScorer, context: str, continuation: str) -> dict:
    """Log-likelihood of one continuation by a full forward pass over prefix + context + continuation."""
    torch = scorer.torch
    pre, ctx, cont = scorer.prefix_ids, scorer.encode(context), scorer.encode(continuation)
    ids = torch.tensor([pre + ctx + cont], device=scorer.device)
    scorer._check_length(ids.shape[1])
    with torch.inference_mode():
        logits = scorer.model(input_ids=ids, use_cache=False).logits[0].float()
    scorer.forward_tokens += ids.shape[1]
    start = len(pre) + len(ctx)
    lp = logits[start - 1:-1].log_softmax(-1)
    target = ids[0, start:]
    return {"logprob": float(lp.gather(-1, target[:, None]).sum()), "tokens": len(cont), "chars": len(continuation)}


def loglik_predictions(scores: Sequence[dict]) -> dict[str, int]:
    """Predicted option under each normalization: total, per token, per character log-likelihood."""
    def argmax(vals: list[float]) -> int:
        return max(range(len(vals)), key=lambda j: vals[j])

    return {
        "sum": argmax([s["logprob"] for s in scores]),
        "per_token": argmax([s["logprob"] / max(1, s["tokens"]) for s in scores]),
        "per_char": argmax([s["logprob"] / max(1, s["chars"]) for s in scores]),
    }


# ----------------------------------------------------------------------------------------------- running a model
def select_questions(questions: list[dict], max_questions: int | None, seed: int) -> list[dict]:
    """All questions, or a seeded sample of `max_questions` kept in file order (a scale control)."""
    if not max_questions or max_questions >= len(questions):
        return questions
    keep = set(random.Random(seed).sample(range(len(questions)), max_questions))
    return [q for i, q in enumerate(questions) if i in keep]


def load_inputs(questions_path: str | Path, articles_path: str | Path) -> tuple[list[dict], dict[str, dict]]:
    articles = {rec["uid"]: rec for _, rec in iter_jsonl(articles_path)}
    questions = []
    for line, rec in iter_jsonl(questions_path):
        for key in ("qid", "article_uid", "question", "options", "gold"):
            if key not in rec:
                raise InputError(f"{questions_path}:{line}: missing field {key!r}; regenerate it with the data stage")
        if rec["article_uid"] not in articles:
            raise InputError(f"{questions_path}:{line}: article {rec['article_uid']!r} is not in {articles_path}")
        questions.append(rec)
    if not questions:
        raise InputError(f"{questions_path}: no questions; closed-book QA needs a questions file")
    return questions, articles


def loglik_records(scorer: LoglikScorer, contexts: Sequence[str], questions: Sequence[dict],
                   lcfg: dict) -> list[dict]:
    """Score every question's options and return the per-question `loglik` blocks."""
    items = [(ctx, [option_continuation(lcfg["continuation"], q, j) for j in range(4)])
             for ctx, q in zip(contexts, questions)]
    scores = scorer.score(items, progress=True)
    out = []
    for q, s in zip(questions, scores):
        preds = loglik_predictions(s)
        pred = preds[lcfg["normalization"]]
        out.append({"option_logprob": [round(x["logprob"], 5) for x in s],
                    "option_tokens": [x["tokens"] for x in s], "option_chars": [x["chars"] for x in s],
                    "predicted_by": preds, "predicted": pred, "correct": pred == q["gold"]})
    return out


def cot_stops(ccfg: dict, engine: str) -> list[str]:
    """Stop strings of a CoT request: the answer stops for engines that keep the matched stop in the text (under
    the `reference` rule the reference code's own `Answer: P.\n` strings, else `Answer: X.`), plus
    evaluation.cot.stop. Hosted OpenAI-style APIs drop the matched stop string, so
    the answer stops are never sent there; the default `\n## Example` stop (what the few-shot format writes after
    an answer) still ends the completion, and the first answer line is read either way."""
    answer_stops = (list(REFERENCE_STOPS) if ccfg["answer_rule"].startswith("reference")
                    else [f"Answer: {x}." for x in LETTERS])
    stops = answer_stops if ccfg["stop_at_answer"] and engine != "openai" else []
    return stops + [s for s in ccfg["stop"] if s not in stops]


def cot_requests(prompts: Sequence[str], questions: Sequence[dict], ccfg: dict, seed: int,
                 engine: str = "transformers") -> list:
    from .backends import GenerationRequest

    stops = cot_stops(ccfg, engine)
    return [GenerationRequest(id=q["qid"], prompt=p, group="qa-5shot-prefix", max_new_tokens=ccfg["max_new_tokens"],
                              temperature=ccfg["temperature"], top_p=ccfg["top_p"],
                              seed=int(stable_hash(seed, q["qid"], n=8), 16) % (2**31), stop=list(stops),
                              n=ccfg["n"], metadata={"qid": q["qid"]})
            for p, q in zip(prompts, questions)]


def cot_records(backend: Any, prompts: Sequence[str], questions: Sequence[dict], ccfg: dict, seed: int,
                partial_path: Path | None = None, engine: str = "transformers") -> list[dict]:
    """Generate (or resume from `partial_path`) n completions per question and parse their answers."""
    requests = cot_requests(prompts, questions, ccfg, seed, engine)
    done: dict[str, dict] = {}
    # A saved completion is reused only for the same model, sampling settings, seed and prompt text.
    sampling = {k: ccfg[k] for k in ("n", "temperature", "top_p", "max_new_tokens", "stop_at_answer", "stop",
                                    "answer_rule")}
    key = stable_hash(getattr(backend, "model", ""), sampling, seed, n=10)
    prompt_ids = {r.id: prompt_version(r.prompt) for r in requests}
    if partial_path is not None and partial_path.exists():
        for _, rec in iter_jsonl(partial_path, allow_truncated_tail=True):
            if rec.get("key") == key and rec.get("prompt_id") == prompt_ids.get(rec.get("qid")):
                done[rec["qid"]] = rec
    todo = [r for r in requests if r.id not in done]
    if todo:
        sink = AppendOnlyJsonl(partial_path, key="id") if partial_path is not None else None
        t0, n_done = time.time(), 0
        for comp in backend.generate(todo):
            rec = {"id": f"{key}:{prompt_ids[comp.id]}:{comp.id}", "key": key, "qid": comp.id,
                   "prompt_id": prompt_ids[comp.id], "texts": list(comp.texts),
                   "finish_reasons": list(comp.finish_reasons), "completion_tokens": comp.completion_tokens,
                   "error": comp.error}
            done[comp.id] = rec
            if sink is not None and comp.error is None:  # a failed request is retried by the next run
                sink.append(rec)
            n_done += 1
            if n_done % 50 == 0 or n_done == len(todo):
                log(f"cot: {n_done}/{len(todo)} questions ({n_done / max(1e-9, time.time() - t0):.2f}/s)")
        if sink is not None:
            sink.close()
    failed = [r for r in done.values() if r.get("error")]
    if len(failed) > ccfg["max_failed_fraction"] * len(questions):
        raise InputError(f"{len(failed)} of {len(questions)} CoT requests failed (first: {failed[0]['qid']}: "
                         f"{failed[0]['error']}); fix the cause and re-run: completed requests are kept in "
                         f"{partial_path}, or allow a few failures with evaluation.cot.max_failed_fraction")
    out = []
    for q in questions:
        rec = done.get(q["qid"])
        if rec is None:
            raise RuntimeError(f"backend returned no completion for question {q['qid']!r}")
        answers = [read_answer(t, ccfg["answer_rule"]) for t in rec["texts"]]
        rng = random.Random(int(stable_hash(seed, "select", q["qid"], n=8), 16))
        pred = select_answer(answers, ccfg["select"], rng)
        out.append({"completions": rec["texts"], "finish_reasons": rec["finish_reasons"], "answers": answers,
                    "error": rec.get("error"), "attempted": pred is not None, "predicted": pred,
                    "correct": pred is not None and pred == q["gold"]})
    return out


def summarize(records: Sequence[dict], modes: Sequence[str], ecfg: dict, seed: int,
              split_of: dict[str, str] | None = None) -> dict:
    """Per-mode accuracy blocks (with intervals and the difficulty split); `loglik` also per normalization,
    `cot` under both conventions; `reported`: all questions and the val/test article split under both."""
    ci = ecfg["ci"]
    out: dict[str, Any] = {}
    for mode in modes:
        recs = [r[mode] for r in records]
        block = accuracy_block([r["correct"] for r in recs], ci, seed)
        block["by_difficulty"] = by_difficulty(records, lambda r, m=mode: r[m]["correct"], ci, seed)
        block["reported"] = reported_numbers(records, mode, split_of, ci["level"])
        if mode == "loglik":
            block["normalization"] = ecfg["loglik"]["normalization"]
            block["continuation"] = ecfg["loglik"]["continuation"]
            for norm in NORMALIZATIONS:
                block[f"accuracy_{norm}"] = sum(r["predicted_by"][norm] == q["gold"]
                                                for r, q in zip(recs, records)) / len(recs)
            block["attempted"] = 1.0
            block["accuracy_attempted"] = block["accuracy"]
        else:
            att = [r for r in recs if r["attempted"]]
            block["attempted"] = len(att) / len(recs)
            block["n_attempted"] = len(att)
            block["accuracy_attempted"] = (sum(r["correct"] for r in att) / len(att)) if att else float("nan")
            lo, hi = wilson_interval(sum(r["correct"] for r in att), len(att), ci["level"])
            block["ci_attempted"] = [lo, hi]
            block["conventions"] = {"accuracy": "unparseable questions counted wrong",
                                    "accuracy_attempted": "unparseable questions dropped (reference code)"}
            block["failed_requests"] = sum(bool(r.get("error")) for r in recs)
            block["samples_per_question"] = ecfg["cot"]["n"]
            block["select"] = ecfg["cot"]["select"]
            block["answer_rule"] = ecfg["cot"]["answer_rule"]
        out[mode] = block
    return out


def load_local_model(model_path: str, ecfg: dict) -> tuple[Any, Any]:
    from .models import default_device, load_causal_lm, load_tokenizer

    device = default_device() if ecfg["device"] == "auto" else ecfg["device"]
    return load_causal_lm(model_path, dtype=ecfg["dtype"], device=device), load_tokenizer(model_path)


def api_model_spec(ecfg: dict, model_id: str) -> dict | None:
    """The evaluation.api_models entry of an `api-{name}` model id (None for local models)."""
    if not model_id.startswith("api-"):
        return None
    name = model_id[len("api-"):]
    for spec in ecfg["api_models"]:
        if spec["name"] == name:
            return spec
    raise InputError(f"model id {model_id!r}: no evaluation.api_models entry named {name!r}")


def external_spec(ecfg: dict, model_id: str) -> dict | None:
    """The evaluation.external_models entry of an `ext-{name}` model id (None for other models)."""
    if not model_id.startswith("ext-"):
        return None
    name = model_id[len("ext-"):]
    for spec in ecfg.get("external_models") or []:
        if spec["name"] == name:
            return spec
    raise InputError(f"model id {model_id!r}: no evaluation.external_models entry named {name!r}")


def make_backend(cfg: dict, engine: str, model: str) -> Any:
    """Engine `engine` serving `model` (backends.engine_for; imported lazily, as every engine is)."""
    from .backends import engine_for

    return engine_for(cfg, engine, model)


def loglik_blocks(ecfg: dict, model_path: str, questions: list[dict], contexts: list[str], prefix: str,
                  blocks: list[dict]) -> dict:
    """Score every question by option log-likelihood into `blocks` (its "loglik" entry); returns the run info.
    The model and the scorer (with its prefix cache) are locals: nothing refers to them once this returns."""
    import torch

    t0 = time.time()
    model, tok = load_local_model(model_path, ecfg)
    lcfg = ecfg["loglik"]
    scorer = LoglikScorer(model, tok, prefix, lcfg["batch_questions"], lcfg["reuse_prefix_cache"])
    t1 = time.time()
    for b, r in zip(blocks, loglik_records(scorer, contexts, questions, lcfg)):
        b["loglik"] = r
    sec = time.time() - t1
    return {"load_seconds": round(t1 - t0, 2), "seconds": round(sec, 2),
            "forward_tokens": scorer.forward_tokens, "prefix_tokens": len(scorer.prefix_ids),
            "tokens_per_second": round(scorer.forward_tokens / max(sec, 1e-9), 1),
            "device": str(scorer.device), "torch_threads": torch.get_num_threads()}


def release_memory() -> None:
    """Free what unreferenced models held: collect reference cycles, then hand torch's cached CUDA blocks back to
    the driver. vLLM sizes its KV cache from the GPU's free memory when it starts (gpu_memory_utilization), so in
    the same process it must start after this (issue 18)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_prompts(cfg: dict, model_id: str, model_path: str | None, questions: list[dict],
                     contexts: list[str], prefix: str, modes: Sequence[str],
                     partial_path: Path | None = None) -> tuple[list[dict], dict]:
    """Score `questions` whose per-question prompt text (after the shared `prefix`) is `contexts`.

    Shared by closed-book QA and RAG. Returns per-question mode blocks and run info (timings, engine)."""
    ecfg, seed = cfg["evaluation"], cfg["seed"]
    api = api_model_spec(ecfg, model_id)
    blocks: list[dict] = [{} for _ in questions]
    info: dict[str, Any] = {}
    model = tok = None
    if "loglik" in modes:
        if api is not None:
            raise InputError(f"{model_id}: API models are scored by sampling only; set its modes to [cot]")
        info["loglik"] = loglik_blocks(ecfg, model_path, questions, contexts, prefix, blocks)
        release_memory()  # the scorer's model and cache are gone before a generation engine claims the GPU
    if "cot" in modes:
        ccfg = ecfg["cot"]
        engine = api["engine"] if api else ccfg["engine"]
        backend = make_backend(cfg, engine, api["model"] if api else model_path)
        t0 = time.time()
        try:
            recs = cot_records(backend, [prefix + c for c in contexts], questions, ccfg, seed, partial_path, engine)
        finally:
            backend.close()
        for b, r in zip(blocks, recs):
            b["cot"] = r
        info["cot"] = {"engine": engine, "model": api["model"] if api else model_path,
                       "seconds": round(time.time() - t0, 2)}
    return blocks, info


def model_modes(ecfg: dict, model_id: str) -> list[str]:
    api = api_model_spec(ecfg, model_id)
    return list(api["modes"]) if api else list(ecfg["modes"])


def evaluate_and_write(cfg: dict, model_id: str, model_path: str | None, questions: list[dict],
                       articles: dict[str, dict], prefix: str, contexts: list[str], modes: Sequence[str],
                       output_jsonl: str | Path, output_json: str | Path, summary_head: dict,
                       extra: Sequence[dict] | None = None, t0: float | None = None) -> dict:
    """The evaluation loop shared by closed-book QA and RAG: score each question's prompt (`prefix` + its
    context), write the per-question JSONL (each record with `extra[i]` merged in) and the summary JSON (after
    `summary_head`); return the summary."""
    ecfg, seed = cfg["evaluation"], cfg["seed"]
    t0 = time.time() if t0 is None else t0
    partial = Path(str(output_jsonl) + ".cot-partial")
    blocks, info = evaluate_prompts(cfg, model_id, model_path, questions, contexts, prefix, modes, partial)
    records = []
    for i, (q, ctx, b) in enumerate(zip(questions, contexts, blocks)):
        records.append({"qid": q["qid"], "article_uid": q["article_uid"], "prompt_id": prompt_version(prefix + ctx),
                        "gold": q["gold"], "difficult": q.get("difficult"), **(extra[i] if extra else {}), **b,
                        "mode": modes[0], "predicted": b[modes[0]]["predicted"], "correct": b[modes[0]]["correct"]})
    rep = ecfg["report"]
    split_of = article_split(list(articles.values()), rep["val_fraction"])
    per_mode = summarize(records, modes, ecfg, seed, split_of)
    primary = per_mode[modes[0]]
    summary = {
        **summary_head, "model": model_id, "model_path": model_path, "mode": modes[0],
        "n": primary["n"], "accuracy": primary["accuracy"], "ci_low": primary["ci_low"],
        "ci_high": primary["ci_high"], "attempted": primary["attempted"],
        "accuracy_attempted": primary["accuracy_attempted"], "modes": per_mode,
        "split": {"val_fraction": rep["val_fraction"], "order": "articles sorted by raw title (reference code)",
                  "val_articles": sum(v == "val" for v in split_of.values()),
                  "test_articles": sum(v == "test" for v in split_of.values())},
        "prefix_file": summary_head.get("prefix_file", str(ecfg["prompt_prefix"])),
        "prefix_version": prompt_version(prefix),
        # the evaluation keys that shape the numbers (threads, devices and batch sizes leave them as they are)
        "config_hash": config_hash(shaping_part(cfg, "evaluation")), "seed": seed, "run": info,
    }
    ext = external_spec(ecfg, model_id)
    if ext is not None:  # an evaluation-only model (evaluation.external_models): the table and figure label it
        summary["external"] = {"label": ext.get("label") or ext["name"], "source": ext["source"],
                               "path_or_id": ext["path_or_id"]}
    summary["seconds"] = round(time.time() - t0, 2)
    write_jsonl_atomic(output_jsonl, records)
    write_json_atomic(output_json, json_safe(summary))
    if partial.exists():
        partial.unlink()
    return summary


def run(cfg: dict, model_id: str, model_path: str | None, questions_path: str, articles_path: str,
        output_jsonl: str | Path, output_json: str | Path) -> dict:
    """Closed-book QA of one model: write the per-question JSONL and the summary JSON; return the summary."""
    ecfg, seed = cfg["evaluation"], cfg["seed"]
    t0 = time.time()
    questions, articles = load_inputs(questions_path, articles_path)
    questions = select_questions(questions, ecfg["max_questions"], seed)
    prefix = load_prompt_template(ecfg["prompt_prefix"])
    contexts = [render_question(q, articles[q["article_uid"]]) for q in questions]
    return evaluate_and_write(cfg, model_id, model_path, questions, articles, prefix, contexts,
                              model_modes(ecfg, model_id), output_jsonl, output_json,
                              {"task": "quality-closed-book"}, t0=t0)


def eval_cli(stage_name: str, doc: str | None, run_fn: Callable[..., dict], argv: list[str] | None,
             report: Callable[[dict], dict]) -> int:
    """The command line shared by closed-book QA and the RAG baseline: one model id, its folder, the data."""
    p = stage.parser(stage_name, doc, config=True)
    p.add_argument("--model-id", required=True, help="base | raw-all | METHOD-BUDGET | api-NAME")
    p.add_argument("--model-path", default=None, help="model folder or hub id (not needed for api-NAME)")
    p.add_argument("--questions", default=QUESTIONS)
    p.add_argument("--articles", default=ARTICLES)
    p.add_argument("--output-jsonl", required=True)
    p.add_argument("--output-json", required=True)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: evaluation.threads)")
    args = p.parse_args(argv)

    def body() -> None:
        cfg = stage.config(args)
        import torch

        torch.set_num_threads(args.threads or cfg["evaluation"]["threads"])
        model_path = args.model_path or None  # the rule passes '' for API models
        if model_path is None and not args.model_id.startswith("api-"):
            raise InputError("--model-path is required for local models")
        summary = run_fn(cfg, args.model_id, model_path, args.questions, args.articles,
                         args.output_jsonl, args.output_json)
        print(json.dumps(report(summary)))

    return stage.run(body)


def main(argv: list[str] | None = None) -> int:
    return eval_cli("qa_eval", __doc__, run, argv,
                    lambda s: {k: s[k] for k in ("model", "mode", "n", "accuracy", "ci_low", "ci_high", "attempted")})


if __name__ == "__main__":
    sys.exit(main())
