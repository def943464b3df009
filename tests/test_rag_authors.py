"""RAG as the authors ran it (issue 21, item 4), table-driven.

Cases are derived by hand from the authors' code (github.com/ZitongYang/Synthetic_Continued_Pretraining at
3a8edb5) and the LangChain splitter it calls:
- inference/retrieval.py `split_langchain_documents`: `RecursiveCharacterTextSplitter(chunk_size, chunk_overlap)`
  with LangChain's defaults of 2024 (separators "\\n\\n", "\\n", " ", ""; keep_separator=True, i.e. each separator
  kept at the start of the next piece; a piece recursed into when len >= chunk_size; strip_whitespace=True), then
  `get_metadata_prefix_for_quality_document`: `Title: ..\\nAuthor: ..\\nYear Written: ..\\n\\n` before each chunk;
- `RetrievalAndRerankResults.get_rerank_results_for_top_k`: candidates sorted by rerank score (stable, descending),
  the first rerank_top_k kept; `get_best_last_retrieved_chunks` reverses that order; `format_retrieval_icl_prompt`
  writes `*Context {i}*\\n{chunk}\\n\\n` from i = 1;
- README.md, "Retrieval-Augmented Generation": EntiGraph CPT at --eval_temperature=0.3 with --rerank_top_k=8, the
  Llama 3 8B base at 0.1 with 16.
"""

from __future__ import annotations

import pytest

from workflow_scripts import rag
from workflow_scripts.config import ROOT, load_config, validate_config
from workflow_scripts.rag_endpoints import rerank_order


# (text, chunk_size, overlap, authors' chunks, this workflow's `simple` splitter)
SPLITS = [
    # " fghij" keeps its space: 6 characters >= 5, so it is cut again into characters -> "fghi", "j"
    ("abcde fghij", 5, 0, ["abcde", "fghi", "j"], ["abcde", "fghij"]),
    # a piece of exactly chunk_size is split again ("< chunk_size" merges), here into its characters
    ("abcde", 5, 0, ["abcde"], ["abcde"]),
    # overlap counts the kept separators: pieces "a", " b", " c", ... of 1-2 characters
    ("a b c d e f", 5, 2, ["a b c", "c d", "d e", "e f"], ["a b c", "c d e", "e f"]),
    ("aaa bbb ccc", 7, 0, ["aaa bbb", "ccc"], ["aaa bbb", "ccc"]),
    # a paragraph too long for one chunk is cut on lines; the kept "\n\n" before P2 is stripped away
    ("Line one\nline two\n\nP2", 10, 0, ["Line one", "line two", "P2"], ["Line one", "line two", "P2"]),
    # separators stay inside a chunk exactly as written
    ("One.\n\nTwo.\nThree.", 1024, 0, ["One.\n\nTwo.\nThree."], ["One.\n\nTwo.\nThree."]),
    ("   \n\n  ", 10, 0, [], []),
]


@pytest.mark.unit
@pytest.mark.parametrize("text,size,overlap,authors,simple", SPLITS)
def test_splitters(text, size, overlap, authors, simple):
    assert rag.split_text_authors(text, size, overlap) == authors
    assert rag.split_text(text, size, overlap) == simple


@pytest.mark.unit
def test_chunks_get_the_authors_header_and_the_splitter_is_a_config_option():
    art = {"uid": "a", "title": "The Keeper", "author": "Mallory, Edith", "year": 1931, "text": "abcde fghij"}
    chunks = rag.chunk_articles([art], 5, 0)  # the default splitter is the authors'
    head = "Title: The Keeper\nAuthor: Edith Mallory\nYear Written: 1931\n\n"
    assert [c["text"] for c in chunks] == [head + "abcde", head + "fghi", head + "j"]
    assert [c["text"] for c in rag.chunk_articles([art], 5, 0, "simple")] == [head + "abcde", head + "fghij"]
    assert validate_config({})["evaluation"]["rag"]["splitter"] == "authors"


# (retrieval order of the candidates, their rerank scores, top k, the chunk order written into the prompt)
RERANKS = [
    (["c0", "c1", "c2", "c3"], [0.1, 0.9, 0.5, 0.9], 3, ["c2", "c3", "c1"]),   # tie: c1 before c3 best-first
    (["c0", "c1", "c2"], [0.3, 0.2, 0.1], 2, ["c1", "c0"]),
    (["c0", "c1"], [0.5, 0.5], 8, ["c1", "c0"]),                               # k beyond the candidates
]


@pytest.mark.unit
@pytest.mark.parametrize("cands,scores,k,prompt_order", RERANKS)
def test_rerank_then_best_last(cands, scores, k, prompt_order):
    best_first = [cands[i] for i in rerank_order(scores)][:k]
    contexts = rag.context_chunks(best_first)
    assert contexts == "".join(f"*Context {i + 1}*\n{c}\n\n" for i, c in enumerate(prompt_order))


class ScoreTable:
    """A reranker whose scores are given per document text."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table

    def scores(self, query: str, documents: list[str]) -> list[float]:
        return [self.table[d] for d in documents]


@pytest.mark.unit
def test_rerank_reorders_every_querys_candidates():
    texts = ["c0", "c1", "c2", "c3"]
    out = rag.rerank([[0, 1, 2, 3], [3, 2]], texts, ["q1", "q2"], ScoreTable({"c0": 0.1, "c1": 0.9, "c2": 0.5,
                                                                               "c3": 0.9}))
    assert out == [[1, 3, 2, 0], [3, 2]]


@pytest.mark.unit
def test_temperature_and_k_per_model_as_the_authors_readme():
    paper = load_config([ROOT / "config.yaml", ROOT / "experiments" / "paper.yaml"])
    ecfg = paper["evaluation"]
    assert rag.rag_settings(ecfg["rag"], ecfg, "entigraph-455000000") == (8, 0.3)
    assert rag.rag_settings(ecfg["rag"], ecfg, "base") == (16, 0.1)
    assert rag.rag_settings(ecfg["rag"], ecfg, "ext-authors_entigraph") == (8, 0.3)  # the released EntiGraph model
    assert ecfg["rag"]["splitter"] == "authors" and ecfg["rag"]["candidates"] == 128


@pytest.mark.engine  # a tiny BERT through transformers and torch
def test_local_cross_encoder_reranker_loads_a_folder(tmp_path):
    """rerank.engine cross_encoder: the real loading and scoring code on a tiny random BERT cross-encoder made here
    (no package ships trained weights offline): one finite score per document, deterministic."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "named", "admiral", "lighthouse", "a"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path)
    rr = validate_config({"evaluation": {"rag": {"rerank": {"enabled": True, "engine": "cross_encoder",
                                                            "model": str(tmp_path)}}}})["evaluation"]["rag"]["rerank"]
    reranker = rag.make_reranker(rr)
    docs = ["the cat named admiral", "a lighthouse", "the cat"]
    scores = reranker.scores("cat named admiral", docs)
    assert len(scores) == 3 and all(isinstance(x, float) and x == x for x in scores)
    assert reranker.scores("cat named admiral", docs) == scores
    out = rag.rerank([[0, 1, 2]], docs, ["cat named admiral"], reranker)
    assert sorted(out[0]) == [0, 1, 2] and out[0][0] == max(range(3), key=lambda i: scores[i])
