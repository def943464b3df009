"""Configuration: the YAML files a user passes, merged in order, validated against schemas/config.schema.yaml
with the schema's defaults filled in. Snakemake validates the same schema (rules/common.smk); stage command
lines use this module so that they run without Snakemake.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .io_utils import stable_hash

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = ROOT / "config.yaml"


def deep_merge(base: dict, over: dict) -> dict:
    """Merge `over` into a copy of `base`: dicts recursively, everything else replaced (as Snakemake does)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _validator_with_defaults() -> type:
    base = jsonschema.Draft202012Validator
    validate_props = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # type: ignore[no-untyped-def]
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))


def validate_config(cfg: dict) -> dict:
    """Fill defaults in place and raise a readable error naming the offending key."""
    validator = _validator_with_defaults()(load_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {'.'.join(str(p) for p in e.absolute_path) or '<top>'}: {e.message}" for e in errors[:10]]
        raise ValueError("invalid configuration:\n" + "\n".join(lines))
    return cfg


def load_config(configfiles: list[str | Path] | None = None, overrides: dict | None = None) -> dict:
    """Merge YAML files in order (default: config.yaml), then `overrides`, then validate with defaults."""
    cfg: dict = {}
    for path in configfiles or [DEFAULT_CONFIG]:
        with open(path, encoding="utf-8") as f:
            cfg = deep_merge(cfg, yaml.safe_load(f) or {})
    if overrides:
        cfg = deep_merge(cfg, overrides)
    return validate_config(cfg)


def method_budgets(cfg: dict, method: str) -> list[int]:
    """Synthetic-token budgets a method is trained at: cpt.method_budgets[method] if given, else cpt.budgets."""
    cpt = cfg.get("cpt", {})
    per_method = cpt.get("method_budgets") or {}
    return [int(b) for b in per_method.get(method, cpt.get("budgets", []))]


def check_budgets(cfg: dict) -> None:
    """Fail at planning time, not hours later in a CPT job: every budget must fill at least one block."""
    cpt = cfg.get("cpt", {})
    block = int(cpt.get("block_size", 1))
    from .derived import trained_methods

    methods = trained_methods(cfg)
    small = sorted({(m, b) for m in methods for b in method_budgets(cfg, m) if b < block})
    if small:
        listed = ", ".join(f"{m} {b}" for m, b in small)
        raise ValueError(f"cpt budgets shorter than one block of cpt.block_size={block} tokens: {listed}; "
                         "raise them (cpt.budgets / cpt.method_budgets) or lower cpt.block_size")


def config_hash(section: Any) -> str:
    """Hash recorded with every output, so a result names the settings that made it."""
    return stable_hash(section, n=12)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configfile", nargs="+", default=None, metavar="YAML",
                        help="config files merged in order (default: the repository's config.yaml)")
    parser.add_argument("--config-json", default=None, metavar="JSON",
                        help="config values (a JSON object shaped like the config) merged last; the Snakemake "
                             "rules pass the sections a stage needs this way")


def config_from_args(args: argparse.Namespace) -> dict:
    overrides = json.loads(args.config_json) if args.config_json else None
    if overrides is not None and args.configfile is None:
        # A rule passes the resolved sections it needs: start from the defaults alone, not config.yaml.
        return validate_config(copy.deepcopy(overrides))
    return load_config(args.configfile, overrides)
