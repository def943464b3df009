"""Real generation with the offline model (SmolLM2-135M-Instruct through the transformers engine) on a tiny
budget: the extraction call and two rephrasings of one short article, then a fully cached re-run. (This
machine class does ~10 tokens/s of prefill for a 135M model under load, so the budget is a handful of tokens.)"""

from __future__ import annotations

import json

import pytest

from workflow_scripts import synthesis as syn
from workflow_scripts.config import validate_config
from workflow_scripts.io_utils import read_jsonl

pytestmark = pytest.mark.engine

pytest.importorskip("workflow_scripts.backends.transformers_backend")

ARTICLE = {"uid": "r1", "title": "The Lighthouse", "author": "Keeper, Anna", "year": 1961,
           "text": "Anna Keeper tended the lighthouse on Gull Island. One stormy night the lamp failed, and Anna "
                   "lit an oil lantern so that the boat Marigold could find the harbour."}


class Shared:
    """One loaded engine for the whole test (the pipeline closes its engine after each article)."""

    def __init__(self, backend) -> None:
        self.backend, self.model = backend, backend.model

    def generate(self, requests):
        return self.backend.generate(requests)

    def close(self) -> None:
        pass


def test_real_model_tiny_budget(smollm_dir, tmp_path):
    cfg = validate_config({
        "models": {"generator": {"source": "path", "name": str(smollm_dir)}},
        "backends": {"transformers": {"num_threads": 1, "batch_size": 2, "progress": False}},
        "synthesis": {"backend": "transformers", "sampling": {"max_new_tokens": 4, "seed": 3},
                      "entigraph": {"max_entities": 3, "extraction_retries": 0, "extraction_max_new_tokens": 8,
                                    "extraction_fallback": "heuristic"},
                      "rephrase": {"styles": ["easy"], "repeats": 2}},
    })
    from workflow_scripts.entigraph import extract_entities

    shared = Shared(syn.backend_factory(cfg)())
    doc = extract_entities(cfg, ARTICLE, tmp_path / "work" / "extraction" / "r1.jsonl", lambda: shared)
    # 8 tokens cannot hold the JSON: the answer is recorded, and the demo's fallback supplies entities.
    (attempt,) = doc["attempts"]
    assert attempt["prompt_tokens"] > 250 and 1 <= attempt["completion_tokens"] <= 8
    if doc["status"] == "fallback":
        assert "Gull Island" in doc["entities"] and "no usable answer after 1 attempt(s)" in doc["reason"]
    else:
        assert doc["status"] == "ok" and doc["entities"]

    out = tmp_path / "rephrase" / "r1.jsonl"
    st = syn.synthesize_article(cfg, "rephrase", ARTICLE, out, tmp_path / "rephrase" / "stats" / "r1.json",
                                make_backend=lambda: shared)
    assert st["failures"] == 0 and st["status"] == "complete" and st["generated"] == 2
    recs = read_jsonl(out)
    assert [r["kind"] for r in recs] == ["rephrase-easy", "rephrase-easy"]
    for r in recs:
        assert r["model"] == str(smollm_dir) and r["finish_reason"] in ("length", "stop")
        assert 1 <= r["completion_tokens"] <= 4 and r["text"].strip()
        assert r["prompt_tokens"] > 100
    assert recs[0]["seed"] != recs[1]["seed"]

    # A re-run is served from the working shard: no engine is built, the shard is identical.
    built = []
    before = out.read_text()
    out.unlink()
    syn.synthesize_article(cfg, "rephrase", ARTICLE, out, tmp_path / "rephrase" / "stats" / "r1.json",
                           make_backend=lambda: built.append(1))
    assert not built and out.read_text() == before
    stats = json.loads((tmp_path / "rephrase" / "stats" / "r1.json").read_text())
    assert stats["reused"] == 2 and stats["completion_tokens"] == sum(r["completion_tokens"] for r in recs)
