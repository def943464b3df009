"""The answer rules of closed-book CoT against the authors' code (issue 21, item 6), table-driven.

The authors' run (github.com/ZitongYang/Synthetic_Continued_Pretraining at 3a8edb5):
- inference/llama.py `llama_forward`: vLLM `SamplingParams(stop=generate_all_answer_strings())`, nothing else;
  an output counts only when `stop_reason` is set, and is kept as `text + stop_reason`;
- utils/prompt_utils.py `generate_all_answer_strings`: `Answer: P.\\n` for every ordering P of 1-4 of ABCD;
- utils/prompt_utils.py `second_last_character`: strip trailing newlines, the character before the period.
`authors_reading` below states those three facts for one raw model stream: the expected values of the table are
written out by hand from them, and the oracle checks the project's rules on streams the table does not list.
"""

from __future__ import annotations

import itertools

import pytest

from workflow_scripts import qa_eval
from workflow_scripts.config import ROOT, load_config, validate_config

pytestmark = pytest.mark.unit

AUTHORS_STOPS = [f"Answer: {''.join(p)}.\n" for r in range(1, 5) for p in itertools.permutations("ABCD", r)]


def authors_reading(stream: str) -> int | None:
    """What the authors' pipeline reads from a model that would write `stream`: vLLM stops at the earliest stop
    string (the text then ends with it); no stop reached -> no attempt; else the letter before the final period."""
    hits = [(stream.find(s), s) for s in AUTHORS_STOPS if s in stream]
    if not hits:
        return None
    start, stop = min(hits)
    kept = stream[:start] + stop           # ith_output.text + stop_reason
    return "ABCD".find(kept.rstrip("\n")[-2])


# (raw stream the model writes, authors' answer, reference_eot, first_match)
CASES = [
    (" Paris is the setting, making C the correct choice.\nAnswer: C.\n\n## Example 7\n", 2, 2, 2),
    ("The correct answer: A, since ...\nAnswer: D.\n", 3, 3, 0),        # the letter of the stop, not the first named
    (" ...\nAnswer: D.", None, 3, 3),                                   # ends without the newline: authors drop it
    (" ...\nAnswer: C", None, None, 2),                                 # cut at max tokens
    (" ...\nAnswer: C. Hmm, or B", None, None, 2),                      # period not followed by a newline
    (" ...\nAnswer: AB.\n", 1, 1, None),                                # second_last_character: B
    (" ...\nAnswer: DCBA.\n", 0, 0, None),
    (" ...\nAnswer: AA.\nAnswer: C.\n", 2, 2, 2),                       # AA. is no stop string; the next one is
    (" ...\nanswer: b.\n", None, None, 1),                              # stops are case-sensitive
    (" ...\n**Answer: B.**\n", None, None, 1),
    # no `\n## Example` stop in the authors' run: a model running on into a next example is read at its answer
    (" I am unsure.\n\n## Example 7\n### Question\n...\nAnswer: B.\n", 1, 1, 1),
    ("", None, None, None),
]


@pytest.mark.parametrize("stream,authors,eot,first", CASES)
def test_rules_read_what_the_authors_code_reads(stream, authors, eot, first):
    assert authors_reading(stream) == authors                  # the table is what their code does
    assert qa_eval.read_answer(stream, "reference") == authors   # an engine that does not stop (reads the first)
    hits = [(stream.find(s), s) for s in AUTHORS_STOPS if s in stream]
    if hits:                                                   # vLLM's text: cut at the stop, the stop kept
        start, stop = min(hits)
        assert qa_eval.read_answer(stream[:start] + stop, "reference") == authors
    assert qa_eval.read_answer(stream, "reference_eot") == eot
    assert qa_eval.read_answer(stream, "first_match") == first


def test_reference_rule_on_generated_streams_matches_the_oracle():
    """Every stream built from a small alphabet of fragments (4^4 = 256) reads the same as the authors' code."""
    parts = ["Answer: B.\n", "Answer: C.", "Answer: AD.\n", " the answer: A\n"]
    n = 0
    for combo in itertools.product(parts, repeat=4):
        stream = "".join(combo)
        assert qa_eval.read_answer(stream, "reference") == authors_reading(stream), stream
        n += 1
    assert n == 256


def test_the_paper_overlay_sends_exactly_the_authors_stops():
    paper = load_config([ROOT / "config.yaml", ROOT / "experiments" / "paper.yaml"])
    ccfg = paper["evaluation"]["cot"]
    assert ccfg["answer_rule"] == "reference" and ccfg["stop"] == []
    assert qa_eval.cot_stops(ccfg, "vllm") == AUTHORS_STOPS        # same strings, same order, nothing else
    assert len(AUTHORS_STOPS) == 64
    # the schema's default keeps this workflow's extra stop (named option), with the same answer stops
    default = validate_config({})["evaluation"]["cot"]
    assert qa_eval.cot_stops(default, "vllm") == AUTHORS_STOPS + ["\n## Example"]
    eot = {**default, "answer_rule": "reference_eot"}
    assert qa_eval.cot_stops(eot, "vllm") == AUTHORS_STOPS + ["\n## Example"]


def test_unknown_rule_is_a_clear_error():
    from workflow_scripts.io_utils import InputError

    with pytest.raises(InputError, match="reference, reference_eot, first_match"):
        qa_eval.read_answer("Answer: A.\n", "authors")
