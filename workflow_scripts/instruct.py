"""Instruction tuning of a trained model (paper section 4.3, Appendix D): chat data -> packed corpus -> `ID-instruct`.

    python -m workflow_scripts.instruct corpus --model results/hf_models/smollm2-135m-instruct \\
        --outdir results/instruct/corpus [--configfile config.yaml]
    python -m workflow_scripts.instruct tune --corpus results/instruct/corpus --init-model results/models/entigraph/384 \\
        --output results/models/entigraph-384/instruct [--configfile config.yaml]

Data (`instruct.data`). Conversations in the messages format (`[{role, content}, ...]`) from:
- `gutenberg`: the offline demo's set, built here from the vendored public-domain Project Gutenberg stories listed
  in resources/instruct/gutenberg.json (resources/replay/README.md gives their provenance and licence). Each
  example is a real instruction with its answer taken from the text: continue a passage (the next paragraph),
  name the story a passage comes from, or open a story by title and author (its first paragraph).
- a local file or folder (JSONL, JSON or parquet rows with a `messages` column), e.g. a downloaded copy of
  HuggingFaceH4/ultrachat_200k's `train_sft` parquet files;
- a Hugging Face dataset id (`datasets.load_dataset(id, split=...)`; UltraChat 200k is parquet, so datasets 5.x
  loads it; needs the dataset in HF_HOME or network).

Rendering follows the authors' data/tokenize_instruct.py: each conversation through the chat template
(`apply_chat_template`, no generation prompt), concatenated without extra separators (the template marks the
turns), cut into blocks, loss on all tokens. A base model without a chat template takes it from
`instruct.chat_template_from` (the paper: Llama 3.1 Instruct's template on Llama 3 8B). The rendered
conversations become a corpus of workflow_scripts/corpus.py (tokens.npy + manifest.json), and the tuning is
workflow_scripts/train.py's loop run from the trained model on the whole corpus (`--budget all --method instruct`)
with the cpt settings overridden by `instruct.train`. The output folder gets the chat template.

Model ids: `{model}-instruct` for a trained model id (`base`, `raw-all`, `METHOD-BUDGET`); its folder is
`results/models/{model}/instruct`, which is what rules/common.smk's model_dir gives for that id
(rsplit('-', 1) -> (`{model}`, `instruct`)), so the QA evaluation can take instruct models too.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from . import stage
from .config import ROOT, config_hash, deep_merge, validate_config
from .io_utils import InputError, iter_jsonl, stable_hash, write_json_atomic, write_jsonl_atomic
from .job_keys import INSTRUCT_METHOD
from .layout import INSTRUCT_SUFFIX, instruct_checkpoints
from .layout import instruct_id as instruct_id  # the ids and paths live in layout.py

SUFFIX = INSTRUCT_SUFFIX
METHOD = INSTRUCT_METHOD
GUTENBERG_LIST = ROOT / "resources" / "instruct" / "gutenberg.json"
# cpt keys that the instruction-tuning run never inherits from the cpt section (they are about the scaling curve).
NOT_INHERITED = ("budgets", "method_budgets", "budget_unit", "compare_adapter", "resources", "allow_budget_cap")


# ------------------------------------------------------------------------------------------------ ids


def parse_instruct_id(model: str) -> tuple[str, str, int | None]:
    """(start model id, method, budget) of an id with or without the -instruct suffix: `entigraph-384-instruct` ->
    (`entigraph-384`, `entigraph`, 384); `base-instruct` -> (`base`, `base`, None); `raw-all-instruct` ->
    (`raw-all`, `raw`, None); `human` -> (`human`, `human`, None)."""
    from .aggregate import parse_model_id

    start = model[:-len(SUFFIX)] if model.endswith(SUFFIX) else model
    if start == "human":
        return start, "human", None
    method, budget = parse_model_id(start)
    return start, method, budget


# ------------------------------------------------------------------------------------------------ data
def _paragraphs(text: str) -> list[str]:
    paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    return [p for p in paras if len(p) >= 80]  # headings, bylines and one-line exchanges make poor examples


def gutenberg_examples(listing: str | Path = GUTENBERG_LIST, max_chars: int = 600) -> list[dict]:
    """Instruction examples from the vendored public-domain stories (see the module docstring)."""
    listing = Path(listing)
    try:
        stories = json.loads(listing.read_text(encoding="utf-8"))["stories"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise InputError(f"{listing}: cannot read the story list ({e})") from None
    out = []
    for s in stories:
        path = (listing.parent / s["path"]).resolve()
        if not path.exists():
            raise InputError(f"{listing}: story file {path} missing")
        paras = [p[:max_chars] for p in _paragraphs(path.read_text(encoding="utf-8"))]
        ref = f"\"{s['title']}\" by {s['author']}"
        for i, p in enumerate(paras):
            if i == 0:
                out.append(_ex(s, i, "open", f"How does the story {ref} begin?", p))
            if i + 1 < len(paras):
                out.append(_ex(s, i, "continue", f"Continue this passage from {ref}:\n\n{p}", paras[i + 1]))
            out.append(_ex(s, i, "source", f"Which story is this passage from?\n\n{p}",
                           f"This passage is from {ref} ({s['year']})."))
    return out


def _ex(story: dict, i: int, kind: str, user: str, answer: str) -> dict:
    return {"id": f"gutenberg-{story['ebook']}-{i}-{kind}", "source": f"Project Gutenberg ebook #{story['ebook']}",
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def _rows_from_files(path: Path) -> list[dict]:
    suffixes = (".jsonl", ".json", ".parquet")
    files = sorted(f for f in path.rglob("*") if f.suffix in suffixes) if path.is_dir() else [path]
    rows: list[dict] = []
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(f).to_pylist())
        elif f.suffix == ".json":
            data = json.loads(f.read_text(encoding="utf-8"))
            rows.extend(data if isinstance(data, list) else [data])
        else:
            rows.extend(r for _, r in iter_jsonl(f))
    return rows


def load_examples(dcfg: dict, seed: int) -> list[dict]:
    """The instruction examples of instruct.data: [{id, messages, source}], seeded subsample of max_examples."""
    import random

    src = dcfg["source"]
    if src == "gutenberg":
        rows = gutenberg_examples()
    else:
        p = Path(src)
        if p.exists():
            raw = _rows_from_files(p)
        elif src.startswith(("/", ".", "results/", "resources/")):
            raise InputError(f"{src}: instruct.data.source not found (a local JSONL/JSON/parquet file or folder, "
                             "`gutenberg`, or a Hugging Face dataset id)")
        else:
            from datasets import load_dataset

            raw = list(load_dataset(src, split=dcfg["split"]))
        field = dcfg["messages_field"]
        rows = []
        for n, r in enumerate(raw):
            msgs = r.get(field)
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in msgs):
                raise InputError(f"{src}: row {n} has no '{field}' list of {{role, content}} messages "
                                 "(instruct.data.messages_field)")
            rows.append({"id": str(r.get("prompt_id") or r.get("id") or n), "source": src, "messages": msgs})
    if dcfg["max_examples"] is not None and len(rows) > dcfg["max_examples"]:
        rows = random.Random(seed).sample(rows, dcfg["max_examples"])
    if not rows:
        raise InputError(f"instruct.data.source {src!r}: no instruction examples")
    return rows


def chat_tokenizer(model: str, template_from: str | None):  # type: ignore[no-untyped-def]
    """The model's tokenizer, with the chat template of `template_from` when the model has none."""
    from .models import load_tokenizer

    tok = load_tokenizer(model)
    if not getattr(tok, "chat_template", None):
        if not template_from:
            raise InputError(f"{model}: the tokenizer has no chat template; set instruct.chat_template_from to a "
                             "model whose template to use (the paper: meta-llama/Meta-Llama-3.1-8B-Instruct)")
        tok.chat_template = load_tokenizer(template_from).chat_template
    return tok


def render(tok: Any, examples: list[dict]) -> list[dict]:
    """Corpus records (corpus.py's synthesis-record format) of the rendered conversations."""
    return [{"id": e["id"], "method": METHOD, "kind": "chat", "article_uid": None,
             "text": tok.apply_chat_template(e["messages"], tokenize=False)} for e in examples]


def build_instruct_corpus(cfg: dict, model: str, outdir: str | Path) -> dict:
    """Render and pack the instruction data with the base model's tokenizer into outdir (a corpus folder)."""
    from .corpus import build_corpus

    icfg, seed = cfg["instruct"], int(cfg["seed"])
    outdir = Path(outdir)
    examples = load_examples(icfg["data"], seed)
    tok = chat_tokenizer(model, icfg["chat_template_from"])
    records = render(tok, examples)
    write_jsonl_atomic(outdir / "chat.jsonl", records)
    # No document separators: the chat template marks where a conversation starts and ends (as the authors').
    ccfg = {"seed": seed, "corpus": {**cfg["corpus"], "bos_token": None, "eos_token": None}}
    manifest = build_corpus(METHOD, [outdir / "chat.jsonl"], model, outdir, ccfg)
    manifest["instruct_data"] = {"source": icfg["data"]["source"], "examples": len(examples),
                                 "chat_template_from": icfg["chat_template_from"] or model,
                                 "config_hash": config_hash(icfg["data"])}
    write_json_atomic(outdir / "manifest.json", manifest)
    return manifest


# ------------------------------------------------------------------------------------------------ tuning
def train_section(cfg: dict) -> dict:
    """The tuning run's cpt section, unvalidated: this config's cpt section (less its scaling-curve keys) under
    instruct.train (whose schema defaults are one epoch, no replay, no probe)."""
    return deep_merge({k: v for k, v in cfg["cpt"].items() if k not in NOT_INHERITED}, cfg["instruct"]["train"])


def train_config(cfg: dict) -> dict:
    """The config train.py receives: train_section, validated with the schema's defaults."""
    merged = train_section(cfg)
    merged["allow_budget_cap"] = False
    return validate_config({"seed": cfg["seed"], "cpt": copy.deepcopy(merged)})


def tune(cfg: dict, corpus: str | Path, start: str, output: str | Path, workdir: str | Path | None = None) -> int:
    """Instruction-tune `start` on the packed corpus with train.py's CLI (the same loop as CPT), then give the
    output the chat template of the corpus's tokenizer. Returns train.py's exit code."""
    from . import train

    output = Path(output)
    workdir = workdir or instruct_checkpoints(stable_hash(str(output), n=8))
    tcfg = train_config(cfg)
    code = train.main(["--corpus", str(corpus), "--budget", "all", "--model", start, "--method", METHOD,
                       "--output", str(output), "--workdir", str(workdir), "--config-json", json.dumps(tcfg)])
    if code == 0 and int(os.environ.get("RANK", "0")) == 0:
        tok = chat_tokenizer(str(output), cfg["instruct"]["chat_template_from"])
        tok.save_pretrained(output)
        write_json_atomic(output / "instruct.json", {
            "start_model": start, "corpus": str(corpus), "train": tcfg["cpt"],
            "data": json.loads((Path(corpus) / "manifest.json").read_text())["instruct_data"]})
    return code


def main(argv: list[str] | None = None) -> int:
    p = stage.parser("instruct", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = stage.subcommand(sub, "corpus", "render and pack the instruction data", config=True)
    c.add_argument("--model", required=True, help="the base model (its tokenizer and chat template)")
    c.add_argument("--outdir", required=True)
    t = stage.subcommand(sub, "tune", "instruction-tune one trained model", config=True)
    t.add_argument("--corpus", required=True)
    t.add_argument("--init-model", required=True,
                   help="the model tuning starts from: a trained model's folder (or hub id)")
    t.add_argument("--output", required=True)
    t.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    def body() -> int:
        cfg = stage.config(args)
        if args.cmd == "corpus":
            m = build_instruct_corpus(cfg, args.model, args.outdir)
            print(json.dumps({k: m[k] for k in ("total_tokens", "n_records", "instruct_data")}))
            return 0
        return tune(cfg, args.corpus, args.init_model, args.output, args.workdir)

    return stage.run(body)


if __name__ == "__main__":
    sys.exit(main())
