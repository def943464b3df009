"""The transformers engine against the reference it must match: one-request-at-a-time `model.generate`.

Runs on the tiny random Llama (same tokenizer and chat template as SmolLM2) and, for one short prompt, on the real
offline SmolLM2-135M-Instruct. One torch thread: the test machine's cores are shared.
"""

from __future__ import annotations

import pytest

from workflow_scripts.backends import GenerationRequest, get_backend
from workflow_scripts.backends.transformers_backend import TransformersBackend



@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch is imported here, not at collection: collecting the unit tier loads no torch."""
    import torch

    torch.set_num_threads(1)

ARTICLE = ("The freighter Clementine left Ganymede with a crew of four: Captain Ilse Varga, the engineer Tomas Reyes, "
           "the navigator Priya Nand and a maintenance robot called Boltz. Halfway to Ceres a micrometeor breached "
           "the hydroponics bay, and the crew argued for two days about whether to turn back. ")


def chat(i: int, entities: str, group: str = "art-1", **kw) -> GenerationRequest:
    return GenerationRequest(
        id=f"r{i}", group=group,
        messages=[{"role": "system", "content": "You are an analyst of fiction. Answer in one paragraph."},
                  {"role": "user", "content": f"Article:\n{ARTICLE}\n\nDiscuss how {entities} relate in the article."}],
        **kw)


ENTITIES = ["Ilse Varga", "Boltz and the hydroponics bay", "Tomas Reyes", "Ceres",
            "Priya Nand, Ganymede and the micrometeor"]


def reference_generate(backend: TransformersBackend, req: GenerationRequest) -> tuple[str, int]:
    """Plain `model.generate`, one request at a time, greedy: the behaviour the engine must reproduce."""
    import torch

    ids = backend.encode(req)
    out = backend.lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=req.max_new_tokens, do_sample=False,
                              pad_token_id=backend.tokenizer.pad_token_id)
    new = out[0, len(ids):].tolist()
    return backend.tokenizer.decode(new, skip_special_tokens=True), len(new)


@pytest.fixture(scope="module")
def varied_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama re-initialised with larger weights (initializer_range 0.3). The conftest model's greedy
    output is a run of newlines whatever the prompt, which would hide a wrong position id or mask; this one's
    continuation depends on every prompt token."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.initializer_range = 0.3
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("varied-llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(varied_model_dir) -> TransformersBackend:
    return TransformersBackend(model=str(varied_model_dir), batch_size=3, device="cpu", progress=False)


@pytest.mark.engine
@pytest.mark.parametrize("reuse,batch_size", [(True, 3), (False, 3), (True, 1)])
def test_greedy_matches_one_at_a_time_generate(tiny, reuse, batch_size):
    tiny.max_prefix_reuse, tiny.batch_size = reuse, batch_size
    reqs = [chat(i, e, max_new_tokens=12, temperature=0.0) for i, e in enumerate(ENTITIES)]
    got = {c.id: c for c in tiny.generate(reqs)}
    assert sorted(got) == sorted(r.id for r in reqs)
    for r in reqs:
        text, n_new = reference_generate(tiny, r)
        c = got[r.id]
        assert c.error is None
        assert c.text == text, (r.id, reuse, batch_size)
        assert c.completion_tokens == n_new
        assert c.prompt_tokens == len(tiny.encode(r))
        assert c.finish_reason in {"stop", "length"}
    assert len({c.text for c in got.values()}) == len(reqs), "each entity list leads to its own continuation"
    tiny.max_prefix_reuse, tiny.batch_size = True, 3


@pytest.mark.engine
def test_prefix_reuse_prefills_shared_prefix_once(tiny):
    reqs = [chat(i, e, max_new_tokens=2, temperature=0.0) for i, e in enumerate(ENTITIES)]
    prompts = [tiny.encode(r) for r in reqs]
    full = sum(len(p) for p in prompts)
    counts = {}
    for reuse in (False, True):
        tiny.max_prefix_reuse = reuse
        tiny.stats["prefilled_tokens"] = 0
        list(tiny.generate(reqs))
        counts[reuse] = tiny.stats["prefilled_tokens"]
    tiny.max_prefix_reuse = True
    assert counts[False] == full
    # system prompt + article are long; only the entity instructions (plus left padding inside a batch, which
    # is not counted) are fed per row once the shared prefix is cached.
    assert counts[True] < full / 2


@pytest.mark.engine
def test_stop_string_cuts_after_first_match_and_keeps_it(tiny):
    base = GenerationRequest(id="p", prompt="Question: what happened on the Clementine?\nReasoning:",
                             max_new_tokens=24, temperature=0.0)
    free = next(iter(tiny.generate([base])))
    assert free.finish_reason == "length" and len(free.text) > 20
    stop = free.text[10:14]  # a piece the greedy continuation is known to produce
    first = free.text.find(stop)
    stopped = next(iter(tiny.generate([GenerationRequest(id="q", prompt=base.prompt, max_new_tokens=24,
                                                         temperature=0.0, stop=["never-produced", stop])])))
    assert stopped.text == free.text[:first + len(stop)]
    assert stopped.text.endswith(stop)
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens < free.completion_tokens


@pytest.mark.engine
def test_seeded_samples_reproducible_and_independent_of_batch(tiny):
    def sampled(seed: int, i: int = 0) -> GenerationRequest:
        return GenerationRequest(id=f"s{seed}-{i}", prompt="Once upon a time on Ganymede", n=3, seed=seed,
                                 max_new_tokens=8, temperature=1.0, top_p=0.9)

    alone = next(iter(tiny.generate([sampled(7)])))
    again = next(iter(tiny.generate([sampled(7)])))
    assert alone.texts == again.texts and len(alone.texts) == 3
    assert len(set(alone.texts)) > 1, "the n samples of one request must differ"
    assert 8 * alone.finish_reasons.count("length") <= alone.completion_tokens <= 3 * 8
    crowd = {c.id: c for c in tiny.generate([chat(9, "Boltz", max_new_tokens=5, temperature=0.0), sampled(7),
                                               sampled(8)])}
    assert crowd["s7-0"].texts == alone.texts
    assert crowd["s8-0"].texts != alone.texts


@pytest.mark.engine
def test_length_counts_and_prompt_counts(tiny):
    reqs = [GenerationRequest(id="a", prompt="The crew of the Clementine", max_new_tokens=6, temperature=1.0,
                              n=2, seed=1),
            chat(1, "Ceres", max_new_tokens=6, temperature=1.0, seed=2)]
    got = {c.id: c for c in tiny.generate(reqs)}
    for r in reqs:
        c = got[r.id]
        assert c.prompt_tokens == len(tiny.encode(r))
        n_len = c.finish_reasons.count("length")
        assert c.completion_tokens >= 6 * n_len and c.completion_tokens <= 6 * r.n
    # the plain prompt is tokenized as is (no chat template)
    assert got["a"].prompt_tokens == len(tiny.tokenizer("The crew of the Clementine")["input_ids"])


@pytest.mark.engine
def test_bad_requests_become_errors_without_losing_others(tiny):
    too_long = GenerationRequest(id="long", prompt="word " * 5000, max_new_tokens=4)  # tiny model: 4096 positions
    both = GenerationRequest(id="both", prompt="x", messages=[{"role": "user", "content": "y"}])
    good = [chat(i, e, max_new_tokens=3, temperature=0.0) for i, e in enumerate(ENTITIES[:2])]
    got = {c.id: c for c in tiny.generate([too_long, good[0], both, good[1]])}
    assert set(got) == {"long", "both", "r0", "r1"}
    assert "no room" in got["long"].error and got["long"].texts == []
    assert "exactly one" in got["both"].error
    assert got["r0"].error is None and got["r1"].error is None and got["r0"].completion_tokens == 3


@pytest.mark.engine
def test_failing_batch_is_retried_per_request(tiny, monkeypatch):
    """A batch that raises (say, out of memory) is rerun request by request; nothing is lost or duplicated."""
    real = TransformersBackend._run_batch
    calls = {"n": 0}

    def flaky(self, batch, pending, group_prefix):
        calls["n"] += 1
        if len(batch) > 1:
            raise RuntimeError("simulated out of memory")
        yield from real(self, batch, pending, group_prefix)

    monkeypatch.setattr(TransformersBackend, "_run_batch", flaky)
    reqs = [chat(i, e, max_new_tokens=4, temperature=0.0) for i, e in enumerate(ENTITIES)]
    got = [c for c in tiny.generate(reqs)]
    monkeypatch.setattr(TransformersBackend, "_run_batch", real)
    assert sorted(c.id for c in got) == sorted(r.id for r in reqs)
    assert all(c.error is None for c in got)
    for r in reqs:
        assert next(c for c in got if c.id == r.id).text == reference_generate(tiny, r)[0]


@pytest.mark.engine
def test_generate_yields_before_everything_is_done(tiny):
    tiny.batch_size = 1
    it = tiny.generate([chat(i, e, max_new_tokens=4, temperature=0.0) for i, e in enumerate(ENTITIES)])
    before = tiny.stats["completion_tokens"]
    first = next(it)
    assert first.error is None
    assert tiny.stats["completion_tokens"] - before == first.completion_tokens  # only the first request ran
    rest = list(it)
    tiny.batch_size = 3
    assert len(rest) == len(ENTITIES) - 1


@pytest.mark.engine
def test_get_backend_builds_engine_from_settings(tiny_model_dir):
    b = get_backend("transformers", {"model": str(tiny_model_dir), "batch_size": 2, "device": "cpu",
                                     "dtype": "float32", "max_prefix_reuse": False, "progress": False})
    assert isinstance(b, TransformersBackend) and b.batch_size == 2 and not b.max_prefix_reuse
    b.close()


@pytest.mark.engine
def test_real_model_greedy_matches_generate(smollm_dir):
    """SmolLM2-135M-Instruct, two short chats in one batch with prefix reuse vs plain model.generate."""
    b = TransformersBackend(model=str(smollm_dir), batch_size=2, device="cpu", progress=False)
    reqs = [GenerationRequest(id=f"q{i}", group="g", max_new_tokens=8, temperature=0.0,
                              messages=[{"role": "system", "content": "You are a concise assistant."},
                                        {"role": "user", "content": q}])
            for i, q in enumerate(["Name a planet.", "Name a colour of the sky at night."])]
    got = {c.id: c for c in b.generate(reqs)}
    for r in reqs:
        text, n_new = reference_generate(b, r)
        assert got[r.id].text == text and got[r.id].completion_tokens == n_new
        assert text.strip(), "the real model answers something"
    b.close()
