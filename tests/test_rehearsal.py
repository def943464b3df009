"""experiments/paper-rehearsal.yaml (issue 19): the paper's configuration at toy scale on a CPU. It may change only
sizes, models, devices and paths, never which stages, methods or options run:

- with and without it, Snakemake plans the same set of rules (the dry run of paper.yaml alone and of paper.yaml +
  the rehearsal), except the conversion of the offline packaged model, which stands in for the Hub download the
  paper's models need (no rule: the engines read HF_HOME);
- every key the rehearsal sets is listed below under one of four kinds (size, model, device, path), and every key
  it sets differs from what paper.yaml already says (no silent no-op overrides to hide an option change among).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "experiments" / "paper.yaml"
REHEARSAL = ROOT / "experiments" / "paper-rehearsal.yaml"

# The four kinds of key the rehearsal may override, each with the keys (dotted paths) of that kind. A key not listed
# here fails the test: a new override must be sorted into one of these kinds, or it changes what the paper runs.
KINDS = {
    # how much: counts of articles, questions, samples, entities, tokens, steps, examples; shard sizes
    "size": {
        "data.max_articles", "data.max_article_chars",
        "data.quality.check_official_counts",  # the release's size (265 articles, 4,609 questions): not the sample's
        "backends.vllm.max_model_len",
        "synthesis.sampling.max_new_tokens", "synthesis.entigraph.max_entities", "synthesis.entigraph.max_pairs",
        "synthesis.entigraph.max_triples", "synthesis.entigraph.max_new_tokens",
        "synthesis.entigraph.extraction_max_new_tokens", "synthesis.rephrase.repeats",
        "synthesis.rephrase.max_new_tokens", "synthesis.articles_per_job",
        "cpt.budgets", "cpt.method_budgets.rephrase", "cpt.block_size", "cpt.global_batch", "cpt.micro_batch",
        "cpt.checkpoint_every", "cpt.replay.max_tokens", "cpt.probe.max_tokens",
        "evaluation.max_questions", "evaluation.cot.n", "evaluation.cot.max_new_tokens",
        "instruct.data.max_examples", "instruct.train.block_size", "instruct.train.global_batch",
        "instruct.train.micro_batch", "instruct.summaries.max_articles", "instruct.summaries.max_new_tokens.short",
        "instruct.summaries.max_new_tokens.long", "instruct.judge.split_max_new_tokens", "instruct.judge.max_claims",
        "instruct.examples.max_new_tokens",
    },
    # which model: base, generator, judge, external and instruct starting models, the chat template's source
    "model": {
        "models.base", "models.generator", "evaluation.external_models", "instruct.models",
        "instruct.chat_template_from", "instruct.judge.model",
    },
    # where it runs: engines' device settings, the judge's engine (an API for the paper, a local engine here),
    # threads, processes and each job's scheduler resources
    "device": {
        "backends.vllm.dtype", "backends.vllm.enforce_eager", "backends.vllm.cpu_kvcache_space_gib",
        "synthesis.resources", "cpt.threads", "cpt.resources", "evaluation.resources",
        "instruct.resources", "instruct.summaries.resources", "instruct.judge.engine",
    },
    # where inputs come from: the vendored sample, the offline instruction data, the vendored replay text
    "path": {
        "data.quality.url", "data.quality.sha256", "instruct.data.source", "cpt.replay.source",
    },
}
# Keys whose whole value (a mapping or list) is one setting: not descended into.
LEAF_MAPPINGS = {"models.base", "models.generator", "instruct.judge.model", "synthesis.resources", "cpt.resources",
                 "evaluation.resources", "instruct.resources", "instruct.summaries.resources"}

# The rules the rehearsal may add: the packaged offline model's conversion (stands in for the Hub download).
# Rules it may drop: none (the data download is a rule in both: a local path goes through the same rule).
ADDED = {"convert_packaged_model"}
DROPPED: set[str] = set()


def leaves(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in LEAF_MAPPINGS:
            out.update(leaves(v, key + "."))
        else:
            out[key] = v
    return out


MISSING = object()


def lookup(d: dict, key: str) -> object:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return MISSING
        d = d[part]
    return d


def planned_rules(*configfiles: Path) -> set[str]:
    """The rule names of a dry run (Snakemake's job stats table)."""
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "-q", "rules", "--configfile",
                        *map(str, configfiles)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = r.stdout + r.stderr
    rules = set(re.findall(r"^([a-z_]+)\s+\d+$", table, re.M)) - {"total"}
    assert rules, table[-3000:]
    return rules


@pytest.mark.e2e
def test_the_rehearsal_plans_the_papers_rules():
    paper = planned_rules(PAPER)
    rehearsal = planned_rules(PAPER, REHEARSAL)
    assert rehearsal - paper == ADDED, sorted(rehearsal - paper)
    assert paper - rehearsal == DROPPED, sorted(paper - rehearsal)
    # the stages of the paper are all there: synthesis reports, CPT, CoT QA, RAG, instruction tuning, summaries,
    # the judge, the claims table, the fit and the figure
    for rule in ("cpt", "eval_qa", "eval_rag", "instruct_tune", "summarize", "judge_summaries", "claims_table",
                 "fit_scaling", "plot_scaling", "synthesis_report"):
        assert rule in rehearsal, rule


@pytest.mark.unit
def test_every_override_is_a_size_model_device_or_path_key():
    overlay = yaml.safe_load(REHEARSAL.read_text())
    paper = yaml.safe_load(PAPER.read_text())
    kind_of = {key: kind for kind, keys in KINDS.items() for key in keys}
    assert len(kind_of) == sum(map(len, KINDS.values())), "a key is listed under two kinds"
    overridden = leaves(overlay)
    unsorted = sorted(k for k in overridden if k not in kind_of)
    assert not unsorted, f"keys of the rehearsal that are not a size, model, device or path key: {unsorted}"
    # each override changes something (paper.yaml's value, else the embedded default's, differs)
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    same = sorted(k for k, v in overridden.items()
                  if (lookup(paper, k) if lookup(paper, k) is not MISSING else lookup(config, k)) == v)
    assert not same, f"keys the rehearsal sets to the value they already have: {same}"
    # and the list holds no key the rehearsal does not set (it is the rehearsal's own inventory)
    assert set(kind_of) == set(overridden), sorted(set(kind_of) ^ set(overridden))


@pytest.mark.unit
def test_the_rehearsal_keeps_the_papers_options():
    """The option keys that decide what runs keep paper.yaml's values (spot checks of the ones a shrinking overlay
    is most tempted to change)."""
    overlay = leaves(yaml.safe_load(REHEARSAL.read_text()))
    for key in ("synthesis.methods", "synthesis.backend", "synthesis.entigraph.extraction_fallback",
                "synthesis.entigraph.triple_order", "synthesis.entigraph.extraction_retries",
                "synthesis.rephrase.styles", "cpt.epochs", "cpt.raw_epochs", "cpt.lr", "cpt.fsdp.enabled",
                "cpt.replay.rate", "cpt.replay.heldout_fraction", "cpt.probe.source", "evaluation.modes",
                "evaluation.cot.engine", "evaluation.cot.temperature", "evaluation.cot.select",
                "evaluation.cot.answer_rule", "evaluation.report.split", "evaluation.report.convention",
                "evaluation.rag.enabled", "evaluation.rag.prompt", "instruct.enabled", "instruct.summaries.engine",
                "instruct.train.epochs", "instruct.train.lr"):
        assert key not in overlay, key
