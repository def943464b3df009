"""The RAG baseline (issue 5): chunking, BM25 and offline-embedding retrieval, fusion, recall@k, prompt order."""

from __future__ import annotations

import functools
import json
import re

import pytest

from workflow_scripts import qa_eval, rag
from workflow_scripts.config import validate_config

# Three small articles; each paragraph is about one distinctive thing, so the chunk that answers a question is known.
ARTICLES = [
    {"uid": "lighthouse", "title": "The Keeper of Skerry Light", "author": "Mallory, Edith", "year": 1931, "text": (
        "Old Tobias kept the lamp of Skerry Light for forty winters and never once let the flame go out.\n\n"
        "Every evening he climbed the one hundred and twelve iron steps, trimmed the wick, and polished the great "
        "Fresnel lens until it threw its beam twenty miles across the grey water.\n\n"
        "His only companion was a one-eyed cat named Admiral, who slept on the logbook and hunted the mice that "
        "lived in the oil store beneath the stairs.\n\n"
        "When the supply boat failed to come in the storm of 1899, Tobias burned the furniture of his cottage to "
        "keep the light alive, and the fishing fleet came home safe.")},
    {"uid": "orchard", "title": "The Glass Orchard", "author": "Vance, Mira", "year": 1958, "text": (
        "In the valley of Ostrava the botanist Helena Kral grew apple trees inside enormous greenhouses of blown "
        "glass, which the villagers called the glass orchard.\n\n"
        "Her rarest variety was a golden winter apple that ripened only in January and tasted faintly of honey "
        "and cinnamon; she named it the Ostrava Sun.\n\n"
        "A frost in the spring of 1952 cracked half of the greenhouse panes, and Helena spent her savings on "
        "Venetian glassmakers who rebuilt the roofs in a single summer.")},
    {"uid": "race", "title": "Forty Laps at Monza", "author": None, "year": None, "text": (
        "The driver Luca Benedetti won the rain-soaked race at Monza after changing his tyres on lap thirty-one, "
        "a gamble his engineers had argued against.\n\n"
        "His car, a red prototype with a twelve-cylinder engine, had been rebuilt overnight after a crash in "
        "qualifying, and the mechanics slept under the pit wall.\n\n"
        "After the race Benedetti gave his trophy to the youngest mechanic, a seventeen-year-old apprentice from "
        "Turin named Paolo.")},
]
QUESTIONS = [  # (question, options, gold, article, a phrase of the chunk that answers it)
    {"qid": "q1", "article_uid": "lighthouse", "question": "What was the name of the keeper's cat?",
     "options": ["Admiral", "Captain", "Tobias", "Skerry"], "gold": 0, "needle": "one-eyed cat named Admiral"},
    {"qid": "q2", "article_uid": "orchard", "question": "In which month did the golden winter apple ripen?",
     "options": ["March", "January", "July", "October"], "gold": 1, "needle": "ripened only in January"},
    {"qid": "q3", "article_uid": "race", "question": "Who received the trophy after the race at Monza?",
     "options": ["The engineer", "Luca's mother", "A young mechanic named Paolo", "The team owner"], "gold": 2,
     "needle": "gave his trophy to the youngest mechanic"},
]
CHUNK = 220


def rag_cfg(**kw) -> dict:
    return validate_config({"evaluation": {"rag": {"chunk_size": CHUNK, "top_k": 1, "candidates": 10, **kw}}})[
        "evaluation"]["rag"]


@pytest.mark.unit
def test_split_text_respects_size_and_keeps_the_text():
    text = ARTICLES[0]["text"] + "\n\n" + "word " * 300 + "\n" + "x" * 700
    chunks = rag.split_text(text, 200, 0)
    assert all(0 < len(c) <= 200 for c in chunks)
    squash = lambda s: re.sub(r"\s+", "", s)  # noqa: E731
    assert squash("".join(chunks)) == squash(text)  # nothing lost or duplicated without overlap
    assert rag.split_text("Paragraph one.\n\nParagraph two.", 1024, 0) == ["Paragraph one.\n\nParagraph two."]


@pytest.mark.unit
def test_split_text_overlap_shares_text_between_neighbours():
    text = " ".join(f"w{i:03d}" for i in range(200))  # 200 words of 4 characters
    chunks = rag.split_text(text, 100, 30)
    assert all(len(c) <= 100 for c in chunks)
    for a, b in zip(chunks, chunks[1:]):
        shared = set(a.split()) & set(b.split())
        assert 4 <= len(shared) <= 7, (a, b)  # about 30 characters = 6 words of 5 (with the space)
    assert chunks[0].startswith("w000") and chunks[-1].endswith("w199")
    with pytest.raises(ValueError):
        rag.split_text(text, 100, 100)


@pytest.mark.unit
def test_chunks_carry_title_author_year():
    chunks = rag.chunk_articles(ARTICLES, CHUNK, 0)
    first = chunks[0]["text"]
    assert first.startswith("Title: The Keeper of Skerry Light\nAuthor: Edith Mallory\nYear Written: 1931\n\n")
    race = next(c for c in chunks if c["article_uid"] == "race")["text"]
    assert race.startswith("Title: Forty Laps at Monza\n\n")  # no author, no year
    assert len({c["id"] for c in chunks}) == len(chunks) > len(ARTICLES)


@functools.lru_cache(maxsize=None)
def retrieved(bm25_only: bool) -> tuple[list[dict], dict[str, list[list[int]]]]:
    """The chunks and every retriever's rankings of the questions (BM25's alone: no embedding model loaded)."""
    chunks = rag.chunk_articles(ARTICLES, CHUNK, 0)
    arts = {a["uid"]: a for a in ARTICLES}
    queries = [qa_eval.render_question(q, arts[q["article_uid"]], thought_process=False) for q in QUESTIONS]
    return chunks, rag.retrieve(chunks, queries, rag_cfg(retrievers=["bm25"], retriever="bm25") if bm25_only
                                else rag_cfg())


# The dense retrievers load a real embedding model through torch (sentence-transformers): the engine tier.
@pytest.mark.parametrize("name", [pytest.param("bm25", marks=pytest.mark.unit),
                                  pytest.param("embedding", marks=pytest.mark.engine),
                                  pytest.param("hybrid", marks=pytest.mark.engine)])
def test_retrieval_finds_the_answering_chunk(name):
    chunks, rankings = retrieved(name == "bm25")
    for q, ranking in zip(QUESTIONS, rankings[name]):
        assert q["needle"] in chunks[ranking[0]]["text"], (name, q["qid"], chunks[ranking[0]]["text"])
    assert rag.recall_at_k(rankings[name], chunks, [q["article_uid"] for q in QUESTIONS], 1) == 1.0


@pytest.mark.unit
def test_recall_at_k_and_fusion():
    chunks = [{"article_uid": u} for u in ("a", "a", "b", "c")]
    rankings = [[2, 0, 1], [3, 2, 1]]
    assert rag.recall_at_k(rankings, chunks, ["a", "a"], 1) == 0.0
    assert rag.recall_at_k(rankings, chunks, ["a", "a"], 2) == 0.5
    assert rag.recall_at_k(rankings, chunks, ["a", "a"], 3) == 1.0
    assert rag.fuse_rankings([[1, 2, 3], [3, 1, 2]]) == [1, 3, 2]


@pytest.mark.unit
def test_most_relevant_chunk_comes_last():
    ctx = rag.rag_context(["BEST", "SECOND", "THIRD"])
    assert ctx == "### Contexts\n*Context 1*\nTHIRD\n\n*Context 2*\nSECOND\n\n*Context 3*\nBEST\n\n"


@pytest.mark.engine
def test_rag_run_end_to_end(tmp_path, tiny_model_dir):
    qp, ap = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    qp.write_text("".join(json.dumps({k: v for k, v in q.items() if k != "needle"}) + "\n" for q in QUESTIONS))
    ap.write_text("".join(json.dumps(a) + "\n" for a in ARTICLES))
    cfg = validate_config({"evaluation": {"device": "cpu", "ci": {"bootstrap": 0},
                                          "rag": {"enabled": True, "chunk_size": CHUNK, "top_k": 2,
                                                  "retrievers": ["bm25"], "retriever": "bm25"}}})
    s = rag.run(cfg, "base", str(tiny_model_dir), str(qp), str(ap), tmp_path / "r.jsonl", tmp_path / "r.json")
    assert s["retrieval"]["recall_at_k"] == {"bm25": 1.0} and s["n"] == 3
    recs = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert all(len(r["retrieved"]) == 2 and r["gold_article_retrieved"] for r in recs)
    assert all(len(r["loglik"]["option_logprob"]) == 4 for r in recs)
