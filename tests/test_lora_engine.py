"""LoRA CPT of the real offline model (SmolLM2-135M-Instruct, issue 21 item 2): a short run trains, merges and is
scored by the closed-book QA scorer, and the merged model scores every option as the base model with the adapter
applied by peft does (evaluation may read either)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_eval import write_inputs
from test_train import PROBE, STORY, corpus_dir, read_log  # noqa: F401  (corpus_dir is a fixture)
from workflow_scripts import memory as M
from workflow_scripts import qa_eval
from workflow_scripts import train as T
from workflow_scripts.config import validate_config

pytestmark = pytest.mark.engine


def test_a_lora_run_of_the_135m_model_trains_merges_and_is_scored(corpus_dir, smollm_dir, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from workflow_scripts.models import load_base_model

    cfg = validate_config({"seed": 3, "cpt": {
        "block_size": 64, "global_batch": 2, "micro_batch": 1, "epochs": 1, "threads": 2, "checkpoint_every": 0,
        "log_every": 100, "replay": {"rate": 0.0, "source": str(STORY)}, "probe": {"source": str(PROBE),
                                                                                    "max_tokens": 64},
        "adapter": {"kind": "lora", "rank": 8, "alpha": 16, "lr": 1e-3}}})
    out = tmp_path / "entigraph" / "256-lora"
    s = T.train(cfg, corpus_dir, 256, str(smollm_dir), out, tmp_path / "work")
    assert s["steps"] == 2 and len(read_log(out / "train_log.csv")) == 2 and np.isfinite(s["final_loss"])
    # 30 layers x rank 8 x (in + out) of q, k, v, o (576+576, 576+192 twice, 576+576) and the MLP (3 x (576+1536)),
    # as the memory planner counts an adapter
    shape = M.ModelShape.from_hf_config(json.loads((smollm_dir / "config.json").read_text()))
    assert s["adapter"]["trainable_parameters"] == 30 * 8 * 10176 == shape.lora_params(cfg["cpt"]["adapter"])
    probe = s["forgetting_probe"]
    assert probe["loss_after"] != probe["loss_before"]
    merged = load_file(out / "model.safetensors")
    base = load_base_model(str(smollm_dir)).state_dict()
    moved = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert moved and all(k.endswith("_proj.weight") for k in moved)  # attention and MLP projections only

    qp, ap = write_inputs(tmp_path)
    ecfg = validate_config({"evaluation": {"modes": ["loglik"], "device": "cpu", "ci": {"bootstrap": 200}},
                            "backends": {"transformers": {"device": "cpu", "progress": False}}})
    summary = qa_eval.run(ecfg, "entigraph-256-lora", str(out), str(qp), str(ap), tmp_path / "q.jsonl",
                          tmp_path / "q.json")
    assert summary["n"] == 3 and summary["model"] == "entigraph-256-lora" and 0 <= summary["accuracy"] <= 1
    recs = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]

    # the same questions scored by the base model with the adapter applied (not merged): peft's LoRA layers inside
    # the transformers model the scorer drives (it calls the decoder and the head itself)
    applied = PeftModel.from_pretrained(load_base_model(str(smollm_dir)), out / "adapter").eval().get_base_model()
    assert type(applied.model.layers[0].self_attn.q_proj).__module__.startswith("peft")
    _, tok = qa_eval.load_local_model(str(out), {"device": "cpu", "dtype": "float32"})
    scorer = qa_eval.LoglikScorer(applied, tok, qa_eval.load_prompt_template())
    questions = [json.loads(line) for line in qp.read_text().splitlines()]
    articles = {a["uid"]: a for a in map(json.loads, ap.read_text().splitlines())}
    contexts = [qa_eval.render_question(q, articles[q["article_uid"]]) for q in questions]
    ref = qa_eval.loglik_records(scorer, contexts, questions, ecfg["evaluation"]["loglik"])
    for r, a in zip(recs, ref):
        assert r["loglik"]["option_logprob"] == pytest.approx(a["option_logprob"], abs=2e-3)
