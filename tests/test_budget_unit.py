"""cpt.budget_unit (issue 21, item 3): fraction budgets reproduce the authors' prefix sizes exactly.

The authors (github.com/ZitongYang/Synthetic_Continued_Pretraining, data/cptdata.py `_MemmapDataset.__init__` and
`__len__`): `self.ids = self.ids[:int(len(self.ids)*subsample_ratio)]`, then `int(len(self.ids)/self.block_size)`
blocks of 2048 (the partial last block dropped); their corpus file holds 599,385,906 tokens
(data/tokenize_entigraph.py). `authors_prefix` below slices a zero-memory array of that exact length the same way.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from workflow_scripts import budgets, layout
from workflow_scripts.aggregate import budget_fraction, summary_rows
from workflow_scripts.config import ROOT, ConfigError, check_budgets, load_config, validate_config
from workflow_scripts.corpus import budget_tokens
from workflow_scripts.fit_scaling import read_accuracy_table
from workflow_scripts.io_utils import InputError

pytestmark = pytest.mark.unit

AUTHORS_TOTAL = 599_385_906
PAPER_RATIOS = [0.0004, 0.0007, 0.001, 0.0013, 0.0016, 0.0019, 0.002, 0.0025, 0.004, 0.006, 0.008, 0.01, 0.012,
                0.014, 0.018, 0.02, 0.03, 0.05, 0.055, 0.065, 0.085, 0.1, 0.15, 0.25, 0.35, 0.42, 0.45, 0.52, 0.55,
                0.65, 0.72, 0.75, 0.82, 0.91, 0.97, 0.99, 1.0]


def authors_prefix(ids: np.ndarray, subsample_ratio: float, block_size: int = 2048) -> tuple[int, int]:
    """(tokens, blocks) of the authors' _MemmapDataset on `ids`."""
    kept = ids[:int(len(ids) * subsample_ratio)]
    return len(kept), int(len(kept) / block_size)


@pytest.mark.parametrize("ratio", PAPER_RATIOS)
def test_fraction_prefix_equals_the_authors_on_their_corpus_size(ratio):
    ids = np.broadcast_to(np.int32(0), (AUTHORS_TOTAL,))  # their file's length, no memory
    label = budgets.budget_label(ratio, "fraction")
    n, capped = budget_tokens(AUTHORS_TOTAL, label, allow_cap=False)
    assert (n, n // 2048) == authors_prefix(ids, ratio) and not capped
    assert budgets.parse_budget(label) == ("fraction", ratio)  # the label reads back to the very same float


def test_fraction_prefix_on_a_real_corpus_of_known_size(tmp_path):
    """A memory-mapped corpus of 100,003 tokens: the training prefix is the authors' slice, token for token."""
    path = tmp_path / "tokens.npy"
    np.save(path, np.arange(100_003, dtype=np.uint32))
    ids = np.load(path, mmap_mode="r")
    for ratio in (0.0004, 0.0013, 0.07, 0.333, 0.99, 1.0):
        n, _ = budget_tokens(len(ids), budgets.budget_label(ratio, "fraction"), allow_cap=False)
        assert np.array_equal(ids[:n], ids[:int(len(ids) * ratio)])
        assert n // 16 == authors_prefix(ids, ratio, 16)[1]
    with pytest.raises(InputError, match="at least one token"):
        budget_tokens(100, "r0.001", allow_cap=False)  # int(0.1) = 0 tokens


@pytest.mark.parametrize("value,unit,label", [
    (455000000, "tokens", "455000000"), (4096.0, "tokens", "4096"), ("all", "fraction", "all"),
    (0.0004, "fraction", "r0.0004"), (1, "fraction", "r1.0"), (1e-05, "fraction", "r0.00001"),
    (0.3185, "fraction", "r0.3185"),
])
def test_labels(value, unit, label):
    assert budgets.budget_label(value, unit) == label
    # every label fits the Snakefile's budget wildcard (the constant is spelled there)
    assert re.fullmatch(budgets.WILDCARD, label)
    assert f'budget=r"{budgets.WILDCARD}"' in (ROOT / "Snakefile").read_text()


@pytest.mark.parametrize("value,unit", [(1.5, "tokens"), (0, "fraction"), (1.2, "fraction"), (3, "percent")])
def test_bad_values_are_one_line_errors(value, unit):
    with pytest.raises(InputError):
        budgets.budget_label(value, unit)


def test_config_check_and_layout_under_the_fraction_unit():
    cfg = validate_config({"cpt": {"budget_unit": "fraction", "budgets": [0.25, 0.5, 1.0]},
                           "synthesis": {"methods": ["entigraph"]}})
    check_budgets(cfg)  # no block check for fractions: the corpus size is known only at training time
    assert layout.cpt_models(cfg) == [("raw", "all"), ("entigraph", "r0.25"), ("entigraph", "r0.5"),
                                      ("entigraph", "r1.0")]
    assert layout.model_dir("entigraph-r0.25", cfg) == "results/models/entigraph/r0.25"
    assert layout.parse_model_id("entigraph-r0.25") == ("entigraph", None)  # tokens come from its train summary
    assert layout.budget_of("entigraph-r0.25-instruct") == "r0.25"
    assert layout.rag_models(cfg) == ["base", "entigraph-r1.0"]
    with pytest.raises(ConfigError, match="cpt.budgets.*fraction"):
        check_budgets(validate_config({"cpt": {"budget_unit": "fraction", "budgets": [0.5, 2]},
                                       "synthesis": {"methods": ["entigraph"]}}))
    with pytest.raises(ConfigError, match="whole number"):
        check_budgets(validate_config({"cpt": {"budgets": [4096.5]}, "synthesis": {"methods": ["entigraph"]}}))


def test_the_overlays_state_their_unit():
    paper = load_config([ROOT / "config.yaml", ROOT / "experiments" / "paper.yaml"])
    assert paper["cpt"]["budget_unit"] == "tokens"
    assert "budget_unit" in (ROOT / "experiments" / "paper.yaml").read_text()  # the comment stating why
    frac = load_config([ROOT / "config.yaml", ROOT / "experiments" / "paper.yaml",
                        ROOT / "experiments" / "paper-fraction.yaml"])
    check_budgets(frac)
    assert frac["cpt"]["budget_unit"] == "fraction" and frac["cpt"]["budgets"] == PAPER_RATIOS
    # the same 37 points: ratio x 455M is paper.yaml's token list
    assert [round(r * 455e6) for r in frac["cpt"]["budgets"]] == paper["cpt"]["budgets"]
    ids = layout.eval_models(frac)
    assert "entigraph-r0.0004" in ids and "entigraph-r1.0" in ids
    assert all(re.fullmatch(budgets.WILDCARD, layout.budget_of(m)) for m in ids if layout.budget_of(m))


def test_table_and_axis_of_a_fraction_model(tmp_path):
    models = tmp_path / "models"
    (models / "entigraph" / "r0.25").mkdir(parents=True)
    (models / "entigraph" / "r0.25" / "train_summary.json").write_text(
        '{"budget_tokens": 2500, "corpus_total_tokens": 10000, "budget": "r0.25"}')
    block = {"accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 100}
    rows = summary_rows({"model": "entigraph-r0.25", "modes": {"loglik": block}}, models)
    assert rows[0]["budget_tokens"] == 2500 and rows[0]["budget_fraction"] == 0.25 and rows[0]["kind"] == "cpt"
    assert rows[0]["budget"] == "r0.25" and rows[0]["headline"] and rows[0]["value"] == 0.5
    assert budget_fraction({"budget_tokens": 455, "corpus_total_tokens": 599}) == 455 / 599
    table = tmp_path / "t.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    assert read_accuracy_table(table)["tokens"].iloc[0] == 2500
    frac = read_accuracy_table(table, x_axis="fraction", fraction_scale=455e6)
    assert frac["tokens"].iloc[0] == pytest.approx(0.25 * 455e6)
