"""Training mixtures with exact shares at every budget, and the perplexity curriculum (easy to hard).

    python -m workflow_scripts.mixture build --name NAME --corpora entigraph=results/corpus/entigraph \\
        raw=results/corpus/raw --model MODEL --outdir results/corpus/NAME [--configfile ...]
    python -m workflow_scripts.mixture difficulty --corpus results/corpus/NAME --model MODEL

A mixture (`mixtures.NAME: {sources: {source: weight}, order}`) is a corpus of whole blocks of cpt.block_size
tokens. Each source contributes the blocks of its own corpus in that corpus' order (so a mixture's budgets stay
nested), and the blocks are interleaved by largest deficit: block k goes to the source whose share is furthest
below its weight, so every prefix - hence every budget, which is a prefix - holds each source's configured
share within one block. `replay` is general text (cpt.replay.source) tokenized like the corpora. Llama-3-SynE's CPT
report (Chen et al. 2024, arXiv:2407.18743) motivates fixed source ratios; the mixture makes them exact.

Curriculum (`order: perplexity`): the base model's mean next-token loss of every block, computed once per corpus
(`difficulty`, results/corpus/NAME/block_loss.npy); a CPT run on such a corpus visits the blocks of its budget from
the lowest loss to the highest in every epoch, instead of in a seeded shuffle (Llama-3-SynE's perplexity-based
curriculum). Same blocks as the shuffled run at every budget: equal tokens, other order.

Outputs: tokens.npy and manifest.json as the corpus stage's (workflow_scripts/corpus.py), plus block_sources.npy
(the source index of every block) and the manifest's `mixture` section (sources, weights, blocks by source, order).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import stage
from .config import config_hash
from .corpus import MANIFEST_FILE, TOKENS_FILE, load_corpus
from .io_utils import InputError, atomic_path, write_json_atomic

SOURCES_FILE = "block_sources.npy"
LOSS_FILE = "block_loss.npy"
REPLAY = "replay"


def normalised(weights: dict[str, float]) -> dict[str, float]:
    total = float(sum(weights.values()))
    if total <= 0:
        raise InputError("mixture weights must be positive")
    return {k: float(v) / total for k, v in weights.items()}


def interleave(weights: Sequence[float], n: int) -> np.ndarray:
    """Source index of each of n blocks: block k (1-based) goes to the source with the largest deficit
    w_s * k - c_s (first source on ties). Every prefix of k blocks then holds each source within one block of
    w_s * k."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    counts = np.zeros(len(w), dtype=np.int64)
    out = np.empty(n, dtype=np.int16)
    for k in range(1, n + 1):
        s = int(np.argmax(w * k - counts))
        out[k - 1] = s
        counts[s] += 1
    return out


def mixture_length(available: dict[str, int], weights: dict[str, float]) -> int:
    """The most blocks a mixture can have: every source must supply its share of them."""
    n = min(int(available[s] / weights[s]) for s in weights)
    while n > 0:  # the interleave's counts may exceed w_s * n by less than one block
        counts = np.bincount(interleave(list(weights.values()), n), minlength=len(weights))
        if all(counts[i] <= available[s] for i, s in enumerate(weights)):
            return n
        n -= 1
    return 0


def replay_blocks(cfg: dict, tokenizer: str, specials: dict, n_blocks: int, block: int) -> np.ndarray:
    """The first n_blocks blocks of the general-text source (cpt.replay), tokenized like the corpora."""
    from .models import load_tokenizer
    from .replay import general_tokens, to_blocks

    rp = cfg["cpt"]["replay"]
    if not rp["source"]:
        raise InputError("a mixture with source replay needs cpt.replay.source (a local text/JSONL file)")
    want = min(n_blocks * block, int(rp["max_tokens"]))
    toks = general_tokens(rp["source"], load_tokenizer(tokenizer), specials, want, text_field=rp["text_field"])
    return to_blocks(toks, block)


def build_mixture(name: str, corpora: dict[str, str | Path], tokenizer: str, outdir: str | Path,
                  cfg: dict) -> dict[str, Any]:
    """Interleave whole blocks of the source corpora; write tokens.npy, block_sources.npy and manifest.json."""
    t0 = time.time()
    spec = cfg["mixtures"][name]
    weights = normalised(spec["sources"])
    T = int(cfg["cpt"]["block_size"])
    blocks: dict[str, np.ndarray] = {}
    manifests: dict[str, dict] = {}
    for src in weights:
        if src == REPLAY:
            continue
        if src not in corpora:
            raise InputError(f"mixtures.{name}: no corpus given for source {src!r} (--corpora {src}=FOLDER)")
        tokens, manifests[src] = load_corpus(corpora[src])
        blocks[src] = tokens[: (len(tokens) // T) * T].reshape(-1, T)
    if not manifests:
        raise InputError(f"mixtures.{name}: at least one source must be a corpus (not only replay)")
    first = next(iter(manifests.values()))
    for src, m in manifests.items():
        if m["tokenizer"]["vocab_size"] != first["tokenizer"]["vocab_size"] or m["dtype"] != first["dtype"]:
            raise InputError(f"mixtures.{name}: corpus {src!r} was built with another tokenizer; rebuild the corpora")
    avail = {s: len(b) for s, b in blocks.items()}
    if REPLAY in weights:
        guess = mixture_length({**avail, REPLAY: 1 << 62}, weights)
        need = int(np.ceil(weights[REPLAY] * guess)) + 1
        specials = {k: first["tokenizer"][k] for k in ("bos", "eos")}
        blocks[REPLAY] = replay_blocks(cfg, tokenizer, specials, need, T).astype(first["dtype"])
        avail[REPLAY] = len(blocks[REPLAY])
    n = mixture_length(avail, weights)
    if n == 0:
        raise InputError(f"mixtures.{name}: a source has no whole block of {T} tokens ({avail})")
    names = list(weights)
    seq = interleave([weights[s] for s in names], n)
    dtype = np.dtype(first["dtype"])
    outdir = Path(outdir)
    with atomic_path(outdir / TOKENS_FILE, suffix=".npy") as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n * T,))
        view = arr.reshape(n, T)
        for i, src in enumerate(names):
            pos = np.flatnonzero(seq == i)
            view[pos] = blocks[src][: len(pos)]
        arr.flush()
        del arr, view
    with atomic_path(outdir / SOURCES_FILE, suffix=".npy") as tmp:
        np.save(tmp, seq)
    counts = {s: int((seq == i).sum()) for i, s in enumerate(names)}
    manifest = {
        "method": name, "tokens_file": TOKENS_FILE,
        "layout": f"1-D array of {n} blocks of {T} tokens; block k comes from source sources[block_sources[k]] "
                  "(block_sources.npy), each source's blocks in its own corpus order",
        "tokenizer": first["tokenizer"], "dtype": dtype.name, "seed": first.get("seed"), "total_tokens": n * T,
        "n_records": n, "n_articles": None, "tokens_by_kind": {s: c * T for s, c in counts.items()},
        "mean_tokens_per_record": T, "dropped": {},
        "inputs": [{"source": s, "corpus": str(corpora[s]), "total_tokens": manifests[s]["total_tokens"],
                    "config_hash": manifests[s]["config_hash"]} for s in manifests],
        "mixture": {"sources": names, "weights": [weights[s] for s in names], "block_size": T,
                    "blocks_by_source": counts, "available_blocks": avail, "order": spec["order"],
                    "block_sources_file": SOURCES_FILE},
        "config_hash": config_hash({"mixture": spec, "block_size": T,
                                    "sources": {s: m["config_hash"] for s, m in manifests.items()},
                                    "replay": cfg["cpt"]["replay"]["source"] if REPLAY in weights else None}),
        "seconds": round(time.time() - t0, 2),
        "records": {"ids": [], "offsets": []},
    }
    write_json_atomic(outdir / MANIFEST_FILE, manifest)
    return manifest


# ------------------------------------------------------------------------------------------------ CPT side
def curriculum_order(corpus: str | Path, manifest: dict, n_blocks: int, block_size: int) -> np.ndarray | None:
    """The block order of a CPT run: None (the seeded shuffle) unless the corpus is a mixture with order
    perplexity; then the budget's blocks from the lowest base-model loss to the highest (stable on ties)."""
    mix = manifest.get("mixture")
    if not mix:
        return None
    if int(mix["block_size"]) != int(block_size):
        raise InputError(f"{corpus}: the mixture was built in blocks of {mix['block_size']} tokens but "
                         f"cpt.block_size is {block_size}; rebuild it (the rules do so when the key changes)")
    if mix["order"] != "perplexity":
        return None
    folder = Path(corpus).parent if Path(corpus).suffix == ".npy" else Path(corpus)
    path = folder / LOSS_FILE
    if not path.exists():
        raise InputError(f"{path}: block losses not found; compute them first "
                         f"(python -m workflow_scripts.mixture difficulty --corpus {folder} --model MODEL)")
    losses = np.load(path)
    if len(losses) < n_blocks:
        raise InputError(f"{path}: {len(losses)} block losses for {n_blocks} blocks; recompute them")
    return np.argsort(losses[:n_blocks], kind="stable").astype(np.int64)


def source_shares(corpus: str | Path, manifest: dict, plan: np.ndarray, n_blocks: int) -> dict[str, Any]:
    """Realised shares of the run's sequences by source (replay draws of cpt.replay as `replay (cpt.replay)`),
    and for a mixture the configured weights and the blocks of each source in the budget."""
    n = max(len(plan), 1)
    train_replay = int((plan < 0).sum())
    mix = manifest.get("mixture")
    if not mix:
        shares = {manifest["method"]: (len(plan) - train_replay) / n}
        if train_replay:
            shares["replay (cpt.replay)"] = train_replay / n
        return {"source_shares": shares}
    folder = Path(corpus).parent if Path(corpus).suffix == ".npy" else Path(corpus)
    labels = np.load(folder / mix["block_sources_file"])[:n_blocks]
    names = mix["sources"]
    seq_counts = np.bincount(labels[plan[plan >= 0]], minlength=len(names))
    shares = {s: float(seq_counts[i]) / n for i, s in enumerate(names)}
    if train_replay:
        shares["replay (cpt.replay)"] = train_replay / n
    budget_counts = np.bincount(labels, minlength=len(names))
    return {"source_shares": shares, "mixture": {
        "order": mix["order"], "configured": dict(zip(names, mix["weights"])),
        "budget_blocks": {s: int(budget_counts[i]) for i, s in enumerate(names)},
        "budget_shares": {s: float(budget_counts[i]) / max(n_blocks, 1) for i, s in enumerate(names)},
        "max_deviation_blocks": float(max(abs(budget_counts[i] - w * n_blocks) for i, w in enumerate(mix["weights"])))}}


def block_losses(corpus: str | Path, model_location: str, micro_batch: int = 4) -> dict[str, Any]:
    """Mean next-token loss of every block of a mixture corpus under the base model; block_loss.npy beside it."""
    import torch

    from .models import load_base_model

    t0 = time.time()
    folder = Path(corpus)
    tokens, manifest = load_corpus(folder)
    mix = manifest.get("mixture")
    if not mix:
        raise InputError(f"{folder}: not a mixture corpus (no `mixture` in its manifest); curricula order mixtures")
    T = int(mix["block_size"])
    blocks = tokens.reshape(-1, T)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_base_model(model_location).to(device).eval()
    out = np.empty(len(blocks), dtype=np.float32)
    with torch.no_grad():
        for i in range(0, len(blocks), micro_batch):
            x = torch.from_numpy(np.asarray(blocks[i:i + micro_batch], dtype=np.int64)).to(device)
            logits = model(input_ids=x).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
            out[i:i + len(x)] = nll.mean(dim=1).cpu().numpy()
    with atomic_path(folder / LOSS_FILE, suffix=".npy") as tmp:
        np.save(tmp, out)
    return {"corpus": str(folder), "blocks": len(out), "model": model_location, "mean_loss": float(out.mean()),
            "min_loss": float(out.min()), "max_loss": float(out.max()), "seconds": round(time.time() - t0, 2)}


def _build(args: argparse.Namespace) -> None:
    cfg = stage.config(args)
    if args.name not in cfg["mixtures"]:
        raise InputError(f"mixtures has no {args.name!r} (configured: {', '.join(cfg['mixtures']) or 'none'})")
    pairs = [c.split("=", 1) for c in args.corpora]
    if any(len(x) != 2 for x in pairs):
        raise InputError(f"--corpora takes SOURCE=FOLDER pairs, got {args.corpora}")
    m = build_mixture(args.name, dict(pairs), args.model, args.outdir, cfg)
    out = {k: m[k] for k in ("method", "total_tokens", "n_records")}
    out["blocks"] = m["mixture"]["blocks_by_source"]
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    p = stage.parser("mixture", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = stage.subcommand(sub, "build", "interleave the source corpora of one mixture", config=True)
    b.add_argument("--name", required=True, help="a key of mixtures")
    b.add_argument("--corpora", nargs="*", default=[], metavar="SOURCE=FOLDER", help="corpus folder of each source")
    b.add_argument("--model", required=True, help="base model (its tokenizer tokenizes replay text)")
    b.add_argument("--outdir", required=True, help="results/corpus/NAME")
    d = stage.subcommand(sub, "difficulty", "per-block base-model loss of a mixture corpus (the curriculum)")
    d.add_argument("--corpus", required=True)
    d.add_argument("--model", required=True)
    d.add_argument("--micro-batch", type=int, default=4)
    args = p.parse_args(argv)
    if args.cmd == "build":
        return stage.run(lambda: _build(args))
    return stage.run(lambda: print(json.dumps(block_losses(args.corpus, args.model, args.micro_batch))))


if __name__ == "__main__":
    sys.exit(main())
