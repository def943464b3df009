"""Issue 15 with real models and the real engine: the instruction corpus and tuning through train.py on the tiny
model (SmolLM2's tokenizer and chat template), a base model without a chat template, and summaries, examples and the
judge on the transformers backend (a random tiny model's answers are unparseable: they must be counted)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from workflow_scripts import claims, instruct, summaries
from workflow_scripts.config import load_config

pytestmark = pytest.mark.engine

ARTICLES = [{"uid": "a1", "title": "Lost in Translation", "author": "Janifer, Laurence M.", "year": 1972,
             "text": "Korvin was a prisoner of the Tr'en. He escaped by answering their questions."},
            {"uid": "a2", "title": "Captain Chaos", "author": "Nourse, Alan E.", "year": 1953,
             "text": "The captain of the ship made many mistakes, and the crew loved him anyway."}]


def _cfg(**instruct_over):
    over = {"seed": 1, "cpt": {"block_size": 64, "global_batch": 2, "micro_batch": 2, "lr": 1e-4, "threads": 1,
                               "replay": {"rate": 0.1, "source": "resources/replay/jaywalker.txt"}},
            "backends": {"transformers": {"batch_size": 4, "progress": False, "num_threads": 1}},
            "instruct": {"data": {"source": "gutenberg", "max_examples": 6},
                         "summaries": {"max_new_tokens": {"short": 8, "long": 8}},
                         "judge": {"split_max_new_tokens": 16, "max_claims": 4},
                         "examples": {"max_new_tokens": 8}, **instruct_over}}
    return load_config(overrides=over)


def test_corpus_and_tune_through_train_py(tmp_path, tiny_model_dir):
    cfg = _cfg()
    m = instruct.build_instruct_corpus(cfg, str(tiny_model_dir), tmp_path / "corpus")
    assert m["n_records"] == 6 and m["instruct_data"]["examples"] == 6
    assert m["tokenizer"]["bos"] is None and m["tokenizer"]["eos"] is None  # the template marks the turns
    tokens = np.load(tmp_path / "corpus" / "tokens.npy")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tok.decode(tokens[:m["records"]["offsets"][1]])
    assert text.startswith("<|im_start|>") and "<|im_start|>assistant" in text and not text.endswith("<|endoftext|>")
    out = tmp_path / "base" / "instruct"
    assert instruct.tune(cfg, tmp_path / "corpus", str(tiny_model_dir), out, tmp_path / "work") == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["method"] == "instruct" and summary["epochs"] == 1 and summary["replay_rate"] == 0.0
    assert summary["tokens_seen"] == (m["total_tokens"] // 64) * 64 and np.isfinite(summary["final_loss"])
    assert json.loads((out / "instruct.json").read_text())["start_model"] == str(tiny_model_dir)
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template


def test_a_base_model_without_template_takes_it_from_chat_template_from(tmp_path, tiny_model_dir):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    tc = json.loads((bare / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tc))
    for f in bare.glob("chat_template.*"):
        f.unlink()
    with pytest.raises(instruct.InputError, match="instruct.chat_template_from"):
        instruct.chat_tokenizer(str(bare), None)
    tok = instruct.chat_tokenizer(str(bare), str(tiny_model_dir))
    assert instruct.render(tok, instruct.gutenberg_examples()[:1])[0]["text"].startswith("<|im_start|>")


def test_summaries_examples_and_judge_on_the_transformers_engine(tmp_path, tiny_model_dir):
    cfg = _cfg(judge={"split_max_new_tokens": 16, "max_claims": 4,
                      "model": {"source": "path", "name": str(tiny_model_dir)}})
    arts = tmp_path / "articles.jsonl"
    arts.write_text("".join(json.dumps(a) + "\n" for a in ARTICLES))
    qs = tmp_path / "questions.jsonl"
    qs.write_text(json.dumps({"article_uid": "a1", "question": "Why did Korvin escape?"}) + "\n")
    out = tmp_path / "s.jsonl"
    recs = summaries.summarize(cfg, "base-instruct", str(tiny_model_dir), arts, out)
    assert [(r["article_uid"], r["prompt"]) for r in recs] == [("a1", "short"), ("a1", "long"), ("a2", "short"),
                                                               ("a2", "long")]
    assert all(r["error"] is None and r["completion_tokens"] > 0 for r in recs)
    assert recs[0]["prompt_text"] == "Summarize the article Lost in Translation by Laurence M. Janifer for me."
    # a rerun resumes from the work file: the same records, nothing regenerated
    assert summaries.summarize(cfg, "base-instruct", str(tiny_model_dir), arts, out, backend=object()) == recs
    ex = summaries.examples(cfg, "base-instruct", str(tiny_model_dir), arts, qs, tmp_path / "e.jsonl",
                            tmp_path / "e.html")
    assert [e["kind"] for e in ex] == ["explicit reference", "implicit reference", "cross-article"]
    assert "cross-article" in (tmp_path / "e.html").read_text()
    articles = claims.load_articles_map(arts)
    items = claims.load_items(out, None, articles)
    s = claims.judge_file(cfg, items, articles, tmp_path / "c.jsonl", tmp_path / "c.json")
    judged = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(judged) == 4 and all(j["answers"].get("split") is not None for j in judged)
    for prompt in ("short", "long"):
        b = s["by_prompt"][prompt]
        # every summary is accounted for: scored, unparseable or failed
        assert b["summaries"] == 2 == b["summaries_scored"] + b["summaries_unparseable"] + b["summaries_failed"]
    assert s["judge"] == str(tiny_model_dir) and s["prompt_version"] == claims.prompt_version(claims.judge_prompts())
