"""The vllm engine's request assembly and result mapping, driven through a fake `LLM` object.

These run without vLLM (the real engine with the offline model: tests/test_vllm_engine.py). What they pin is
everything the engine decides itself: request order by group, chunking into
LLM.chat / LLM.generate calls, SamplingParams arguments, conversation lists, the RequestOutput -> Completion
mapping with exact token counts, per-request isolation of failures, and that vLLM is never imported at module
import time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from workflow_scripts.backends import GenerationRequest
from workflow_scripts.backends.vllm_backend import (call_inputs, llm_kwargs, plan_calls, run_calls, sampling_kwargs,
                                                    to_completion)

pytestmark = pytest.mark.unit


class FakeParams:
    """Stands in for vllm.SamplingParams: records its keyword arguments."""

    def __init__(self, **kw):
        self.kw = kw


class FakeLLM:
    """Answers like vllm.LLM: one RequestOutput per input, in input order; token ids are one per word here."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[str, list, list]] = []
        self.fail_on = fail_on

    def _out(self, prompt_text: str, params: FakeParams):
        if self.fail_on and self.fail_on in prompt_text:
            raise ValueError("prompt is longer than max_model_len")
        outs = []
        for i in range(params.kw["n"]):
            words = [f"w{j}" for j in range(min(5, params.kw["max_tokens"]))] + ["Answer:", "A.", "more"]
            text = " ".join(words)
            outs.append(SimpleNamespace(text=text, token_ids=list(range(len(words))), finish_reason="length"))
        return SimpleNamespace(prompt_token_ids=list(range(len(prompt_text.split()))), outputs=outs)

    def chat(self, messages, sampling_params=None, use_tqdm=True):
        self.calls.append(("chat", messages, sampling_params))
        return [self._out(" ".join(m["content"] for m in conv), p) for conv, p in zip(messages, sampling_params)]

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.calls.append(("generate", prompts, sampling_params))
        return [self._out(p, sp) for p, sp in zip(prompts, sampling_params)]


def chat(i: int, group: str, **kw) -> GenerationRequest:
    return GenerationRequest(id=f"c{i}", group=group, messages=[{"role": "system", "content": "sys"},
                                                                {"role": "user", "content": f"article {group} req {i}"}],
                             **kw)


def test_sampling_kwargs_carry_seed_n_stop_and_keep_stop_string():
    r = GenerationRequest(id="q", prompt="Q", n=4, temperature=0.1, top_p=0.95, seed=11, max_new_tokens=300,
                          stop=["\nAnswer: A.", "\nAnswer: B."])
    assert sampling_kwargs(r) == {"n": 4, "temperature": 0.1, "top_p": 0.95, "max_tokens": 300, "seed": 11,
                                  "stop": ["\nAnswer: A.", "\nAnswer: B."], "include_stop_str_in_output": True}
    assert sampling_kwargs(GenerationRequest(id="x", prompt="p"))["stop"] is None
    assert "structured_outputs" not in sampling_kwargs(r)


def test_a_json_request_is_decoded_under_structured_outputs():
    """The entity extraction asks for JSON (response_format json_object, the openai engine's JSON mode) and gives
    the shape its prompt asks for (json_schema): vLLM decodes to that schema, or to any JSON object without one."""
    from workflow_scripts.entigraph import EXTRACTION_SCHEMA

    schema = GenerationRequest(id="e", prompt="p", metadata={"response_format": "json_object",
                                                             "json_schema": EXTRACTION_SCHEMA})
    assert sampling_kwargs(schema)["structured_outputs"] == {"json": EXTRACTION_SCHEMA}
    assert EXTRACTION_SCHEMA["required"] == ["summary", "entities"]
    plain = GenerationRequest(id="o", prompt="p", metadata={"response_format": "json_object"})
    assert sampling_kwargs(plain)["structured_outputs"] == {"json_object": True}


def test_plan_orders_by_group_and_splits_chat_from_plain():
    reqs = [chat(0, "A"), chat(1, "B"), GenerationRequest(id="p0", prompt="few-shot q0"), chat(2, "A"),
            chat(3, "B"), GenerationRequest(id="p1", prompt="few-shot q1"), chat(4, "A")]
    calls = plan_calls(reqs, chunk_size=4)
    assert [(k, [r.id for r in rs]) for k, rs in calls] == [
        ("chat", ["c0", "c2", "c4", "c1"]),  # group A adjacent, then B (groups in order of first appearance)
        ("chat", ["c3"]), ("generate", ["p0", "p1"]),
    ]
    assert call_inputs("chat", [reqs[0]]) == [[{"role": "system", "content": "sys"},
                                               {"role": "user", "content": "article A req 0"}]]
    assert call_inputs("generate", [reqs[2]]) == ["few-shot q0"]
    with pytest.raises(ValueError):
        plan_calls(reqs, chunk_size=0)


def test_run_calls_maps_outputs_with_exact_token_counts_and_stop_cut():
    llm = FakeLLM()
    reqs = [chat(0, "A", max_new_tokens=3), GenerationRequest(id="p", prompt="one two three", n=2,
                                                              stop=["Answer: A."], temperature=0.1, seed=5),
            chat(1, "A")]
    got = {c.id: c for c in run_calls(llm, FakeParams, reqs, "gen-model", chunk_size=10, use_tqdm=False)}
    assert set(got) == {"c0", "c1", "p"}
    assert [k for k, _, _ in llm.calls] == ["chat", "generate"]
    c0 = got["c0"]
    assert c0.prompt_tokens == len("sys article A req 0".split()) and c0.completion_tokens == 3 + 3
    assert c0.text == "w0 w1 w2 Answer: A. more" and c0.finish_reason == "length" and c0.model == "gen-model"
    p = got["p"]
    assert p.texts == ["w0 w1 w2 w3 w4 Answer: A."] * 2 and p.finish_reasons == ["stop", "stop"]
    assert p.prompt_tokens == 3 and p.completion_tokens == 2 * 8
    params = llm.calls[1][2][0]
    assert params.kw["seed"] == 5 and params.kw["n"] == 2 and params.kw["include_stop_str_in_output"] is True


def test_failing_call_is_isolated_per_request():
    llm = FakeLLM(fail_on="req 1")
    reqs = [chat(i, "A") for i in range(3)] + [GenerationRequest(id="bad", prompt="x", messages=[])]
    got = {c.id: c for c in run_calls(llm, FakeParams, reqs, "m", chunk_size=8, use_tqdm=False)}
    assert set(got) == {"c0", "c1", "c2", "bad"}
    assert got["c0"].error is None and got["c2"].error is None
    assert "max_model_len" in got["c1"].error and got["c1"].texts == []
    assert "exactly one" in got["bad"].error
    assert len(llm.calls) == 1 + 3  # the batch, then each request alone


def test_to_completion_without_outputs_is_an_error():
    out = SimpleNamespace(prompt_token_ids=[1, 2], outputs=[])
    c = to_completion(GenerationRequest(id="e", prompt="p"), out, "m")
    assert c.error and c.prompt_tokens == 2


def test_llm_kwargs_turn_on_prefix_caching():
    kw = llm_kwargs("org/model", 4, 0.85, 8192, "bfloat16", True, False, 42)
    assert kw == {"model": "org/model", "tensor_parallel_size": 4, "gpu_memory_utilization": 0.85,
                  "dtype": "bfloat16", "enable_prefix_caching": True, "enforce_eager": False, "seed": 42,
                  "max_model_len": 8192}
    assert "max_model_len" not in llm_kwargs("m", 1, 0.9, None, "auto", True, False, 0)


def test_module_import_does_not_import_vllm_and_constructor_explains():
    """Importing the module never imports vLLM; without vLLM (hidden here when it is installed) the constructor
    names the command that installs it."""
    code = ("import sys; import workflow_scripts.backends.vllm_backend as v; assert 'vllm' not in sys.modules\n"
            "sys.modules['vllm'] = None  # as if not installed\n"
            "try:\n    v.VLLMBackend(model='m')\nexcept RuntimeError as e:\n    print('ERR', e)\n")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    assert "ERR the vllm backend needs the vLLM engine" in out.stdout
    assert "`bash scripts/bootstrap.sh --vllm`" in out.stdout
