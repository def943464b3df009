# Synthetic continued pretraining (EntiGraph, Yang et al., ICLR 2025) as one DAG:
# QuALITY articles -> synthesis -> corpora -> CPT at synthetic-token budgets -> closed-book QA -> figures.
# Logic lives in workflow_scripts/; the rules are thin. See README.md and docs/architecture.md.
from snakemake.utils import min_version

from workflow_scripts.config import DEFAULT_CONFIG

min_version("9.0")


# The embedded demo config, found beside this Snakefile (not in the working folder), so that
# `snakemake -s <clone>/Snakefile --directory <project>` runs; a module with `config:` skips it.
configfile: str(DEFAULT_CONFIG)


report: "report/workflow.rst"


# Wildcards shared by every stage (docs/architecture.md).
wildcard_constraints:
    method="[a-z0-9_]+",
    budget=r"\d+|all|r\d+\.\d+",  # a token count, all, or rRATIO (workflow_scripts/budgets.py WILDCARD)
    article="[A-Za-z0-9_.-]+",
    model="[A-Za-z0-9_.-]+",


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/synthesis.smk"
include: "rules/filters.smk"
include: "rules/corpus.smk"
include: "rules/mixture.smk"
include: "rules/replay.smk"
include: "rules/cpt.smk"
include: "rules/evaluation.smk"
include: "rules/figures.smk"
include: "rules/instruct.smk"


rule all:
    default_target: True
    input:
        all_targets(),
