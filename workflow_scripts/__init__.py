"""Synthetic continued pretraining (EntiGraph) workflow: all stage logic lives in this package.

Every stage module is importable (tests) and runnable on its own (`python -m workflow_scripts.<module> --help`);
the Snakemake rules under rules/ are thin wrappers around those command lines.
"""

__version__ = "0.1.0"
