"""Pure helpers shared by the engines: stop strings, per-sample seeds, group order, prompt prefixes."""

from __future__ import annotations

import pytest

from workflow_scripts.backends import GenerationRequest
from workflow_scripts.backends.common import (apply_stop, longest_common_prefix, order_by_group, sample_seed,
                                              validate_request)

pytestmark = pytest.mark.unit


def test_apply_stop_cuts_after_earliest_match_and_keeps_it():
    text = "Step 1: the captain lies.\nAnswer: B. Then\nAnswer: C."
    assert apply_stop(text, ["\nAnswer: C.", "\nAnswer: B."]) == ("Step 1: the captain lies.\nAnswer: B.", True)
    assert apply_stop(text, ["\nAnswer: D."]) == (text, False)
    assert apply_stop(text, []) == (text, False)
    assert apply_stop(text, [""]) == (text, False)
    # same start: the longer (more specific) stop wins
    assert apply_stop("xx Answer: A. yy", ["Answer:", "Answer: A."]) == ("xx Answer: A.", True)


def test_sample_seed_is_stable_distinct_and_63_bit():
    seeds = {sample_seed(s, i) for s in range(20) for i in range(5)}
    assert len(seeds) == 100
    assert sample_seed(3, 1) == sample_seed(3, 1)
    assert all(0 <= s < 2 ** 63 for s in seeds)


def test_order_by_group_is_stable_with_groups_adjacent():
    reqs = [GenerationRequest(id=i, prompt="p", group=g) for i, g in
            [("a1", "A"), ("n1", None), ("b1", "B"), ("a2", "A"), ("n2", None), ("b2", "B")]]
    assert [r.id for r in order_by_group(reqs)] == ["a1", "a2", "n1", "n2", "b1", "b2"]


def test_longest_common_prefix():
    assert longest_common_prefix([[1, 2, 3, 4], [1, 2, 3], [1, 2, 9]]) == 2
    assert longest_common_prefix([[1, 2], [1, 2]]) == 2
    assert longest_common_prefix([[5], [6]]) == 0
    assert longest_common_prefix([]) == 0


def test_validate_request():
    assert validate_request(GenerationRequest(id="ok", prompt="p")) is None
    assert "exactly one" in validate_request(GenerationRequest(id="x"))
    assert "n must" in validate_request(GenerationRequest(id="x", prompt="p", n=0))
    assert "top_p" in validate_request(GenerationRequest(id="x", prompt="p", top_p=0))
    assert "messages" in validate_request(GenerationRequest(id="x", messages=[{"role": "user"}]))


def test_schema_documents_exactly_the_engine_settings():
    """config.schema.yaml `backends.<engine>` and the engine constructors agree on keys and defaults, and the demo
    config validates (defaults filled in)."""
    import inspect
    from pathlib import Path

    import yaml
    from snakemake.utils import validate

    from workflow_scripts.backends.openai_backend import OpenAIBackend
    from workflow_scripts.backends.transformers_backend import TransformersBackend
    from workflow_scripts.backends.vllm_backend import VLLMBackend

    root = Path(__file__).resolve().parent.parent
    schema = yaml.safe_load((root / "schemas" / "config.schema.yaml").read_text())["properties"]["backends"]
    assert schema["additionalProperties"] is False
    for name, cls in [("transformers", TransformersBackend), ("vllm", VLLMBackend), ("openai", OpenAIBackend)]:
        sub = schema["properties"][name]
        assert sub["additionalProperties"] is False
        params = dict(inspect.signature(cls.__init__).parameters)
        params.pop("self")
        assert set(sub["properties"]) | {"model"} == set(params), name
        for key, spec in sub["properties"].items():
            assert spec.get("description"), (name, key)
            if key not in ("model", "extra_body"):  # model is added by the caller; extra_body None == {}
                assert spec["default"] == params[key].default, (name, key)
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    validate(cfg, str(root / "schemas" / "config.schema.yaml"))
    assert cfg["backends"]["transformers"]["max_prefix_reuse"] is True
    assert cfg["backends"]["openai"]["api_key_env"] == "OPENAI_API_KEY"
