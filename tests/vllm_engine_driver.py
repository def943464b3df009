"""Runs the real vLLM engine once for tests/test_vllm_engine.py (a subprocess: vLLM spawns its engine process,
which needs this `__main__` guard, and keeping it out of the pytest process keeps pytest's memory small).

    python tests/vllm_engine_driver.py SPEC.json

SPEC: {"config": {...}, "articles": PATH, "out": DIR, "cot": {"prompts": [...], "qids": [...]} }. With one engine
start it runs the workflow's own steps: EntiGraph entity extraction of the shard, EntiGraph and Rephrase
synthesis of the shard (the shard functions of workflow_scripts/synthesis.py), then chain-of-thought sampling
of the given prompts (workflow_scripts/qa_eval.cot_records). Writes OUT/driver.json (engine starts, CoT records).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_path: str) -> int:
    from workflow_scripts import qa_eval
    from workflow_scripts import synthesis as syn
    from workflow_scripts.config import validate_config
    from workflow_scripts.io_utils import iter_jsonl, write_json_atomic

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    cfg = validate_config(spec["config"])
    out = Path(spec["out"])
    uids = [str(rec["uid"]) for _, rec in iter_jsonl(spec["articles"])]
    ((shard, shard_uids),) = syn.article_shards(uids, cfg["synthesis"]["articles_per_job"])
    engine = syn.SharedEngine(syn.backend_factory(cfg), "vllm")  # one start for every step below
    try:
        syn.extract_shard(cfg, spec["articles"], shard, shard_uids, out / "entities", out / "work" / "extraction",
                          engine)
        for method in ("entigraph", "rephrase"):
            syn.synthesize_shard(cfg, method, spec["articles"], shard, shard_uids, out / method / "shards" / shard,
                                 out / method / "work", out / "entities", engine)
        cot = spec["cot"]
        ccfg = cfg["evaluation"]["cot"]
        questions = [{"qid": q, "gold": 0} for q in cot["qids"]]
        records = qa_eval.cot_records(engine, cot["prompts"], questions, ccfg, cfg["seed"], None, "vllm")
    finally:
        engine.shutdown()
    write_json_atomic(out / "driver.json", {"shard": shard, "engine_starts": engine.starts,
                                            "engine_startup_seconds": engine.startup_seconds, "cot": records})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
