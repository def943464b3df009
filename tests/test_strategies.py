"""The strategy-prompt family (issue 14): seven templates written by this project (in the spirit of SPA, arXiv
2603.22213), one text per strategy and article, documents rendered as "{title}\\n{completion}" by the corpus stage
(also for a filtered variant of the method), and a real run of two strategies on the offline model."""

from __future__ import annotations

import json

import pytest

from workflow_scripts.config import load_config, validate_config
from workflow_scripts.corpus import build_corpus, load_corpus, load_tokenizer
from workflow_scripts.io_utils import InputError, read_jsonl, write_jsonl_atomic
from workflow_scripts.strategies import STRATEGIES
from workflow_scripts.synthesis import get_method, load_template, synthesize_article

ARTICLE = {"uid": "30029", "title": "Lost in Translation", "author": "Janifer, Laurence M.", "year": 1972,
           "text": "Korvin was a prisoner of the Tr'en, a people who never lie. He escaped by asking the Ruler "
                   "questions that could not be answered without a contradiction."}


@pytest.mark.unit
def test_seven_distinct_strategy_prompts_are_planned_once_each():
    cfg = load_config(overrides={"synthesis": {"methods": ["strategies"]}})
    texts = [load_template(f"strategy_{s}") for s in STRATEGIES]
    assert len(STRATEGIES) == 7 and len(set(texts)) == 7 and all(len(t) > 200 for t in texts)
    tasks = get_method("strategies", cfg).plan(ARTICLE, None)
    assert [t.kind for t in tasks] == [f"strategy-{s.replace('_', '-')}" for s in STRATEGIES]
    assert all(t.user.startswith('### Document Content:\n"Lost in Translation"') for t in tasks)
    assert len({t.prompt_version for t in tasks}) == 7
    two = load_config(overrides={"synthesis": {"strategies": {"strategies": ["mind_map", "teacher"], "repeats": 2}}})
    assert len(get_method("strategies", two).plan(ARTICLE, None)) == 4


def records(method: str, **kw) -> list[dict]:
    return [{"id": f"r{i}", "method": method, "kind": "strategy-teacher", "article_uid": "30029",
             "text": f"Lesson {i} about Korvin.", **kw} for i in range(3)]


@pytest.mark.engine
@pytest.mark.parametrize("method,extra", [("strategies", {}),
                                          ("strategies_judge", {"source_method": "strategies"})])
def test_documents_are_title_newline_completion(tmp_path, smollm_dir, method, extra):
    arts = tmp_path / "articles.jsonl"
    write_jsonl_atomic(arts, [ARTICLE])
    shard = tmp_path / "s.jsonl"
    write_jsonl_atomic(shard, records(method, **extra))
    cfg = validate_config({"seed": 1})
    m = build_corpus(method, [shard], str(smollm_dir), tmp_path / "c", cfg, articles=arts)
    tokens, _ = load_corpus(tmp_path / "c")
    text = load_tokenizer(str(smollm_dir)).decode(list(tokens))
    assert m["document_format"] == "{title}\n{text}"
    docs = sorted(text.split("<|endoftext|>"))[1:]
    assert docs == [f"Lost in Translation\nLesson {i} about Korvin." for i in range(3)]
    with pytest.raises(InputError, match="pass --articles"):
        build_corpus(method, [shard], str(smollm_dir), tmp_path / "d", cfg)


@pytest.mark.engine
def test_other_methods_keep_their_texts_and_their_corpus_hash(tmp_path, smollm_dir):
    shard = tmp_path / "s.jsonl"
    write_jsonl_atomic(shard, records("entigraph"))
    a = build_corpus("entigraph", [shard], str(smollm_dir), tmp_path / "a", validate_config({"seed": 1}))
    b = build_corpus("entigraph", [shard], str(smollm_dir), tmp_path / "b",
                     validate_config({"seed": 1, "corpus": {"document_format": {"rephrase": "{title}: {text}"}}}))
    assert a["document_format"] is None and a["config_hash"] == b["config_hash"]


@pytest.mark.engine
def test_two_strategies_on_the_offline_model(tmp_path, smollm_dir):
    cfg = load_config(overrides={
        "models": {"generator": {"source": "path", "name": str(smollm_dir)}},
        "backends": {"transformers": {"device": "cpu", "progress": False}},
        "synthesis": {"methods": ["strategies"], "strategies": {"strategies": ["key_concepts", "teacher"],
                                                                 "max_new_tokens": 8}}})
    out = tmp_path / "30029.jsonl"
    stats = synthesize_article(cfg, "strategies", ARTICLE, out, tmp_path / "stats.json")
    recs = read_jsonl(out)
    assert stats["records"] == 2 and {r["kind"] for r in recs} == {"strategy-key-concepts", "strategy-teacher"}
    assert all(r["text"].strip() and 0 < r["completion_tokens"] <= 8 for r in recs)
    assert json.loads((tmp_path / "stats.json").read_text())["status"] == "complete"
