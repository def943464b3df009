"""Configuration: the YAML files a user passes, merged in order, validated against schemas/config.schema.yaml
with the schema's defaults filled in. Snakemake validates the same schema (rules/common.smk); stage command
lines use this module so that they run without Snakemake.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
from pathlib import Path
from typing import Any

import yaml

from .io_utils import InputError, stable_hash

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = ROOT / "config.yaml"
# Config keys whose default names a file the workflow ships (resources/): see `resolve_shipped_files`.
SHIPPED_FILE_KEYS = (("data", "quality", "url"), ("cpt", "replay", "source"), ("cpt", "probe", "source"),
                     ("instruct", "data", "source"))


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
    import jsonschema  # here, not at import: the stage modules (and scripts/gpu_check.sh) import without it

    base = jsonschema.Draft202012Validator
    validate_props = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # type: ignore[no-untyped-def]
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})


@functools.cache
def _schema() -> dict:
    """The parsed schema, read once per process (libyaml when present): every validation reads it, and parsing its
    2,000 lines in pure Python costs a fifth of a second."""
    return yaml.load(SCHEMA_PATH.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_schema() -> dict:
    """A copy of the schema (the caller may change it)."""
    return copy.deepcopy(_schema())


@functools.cache
def _validator() -> Any:
    """The schema's validator that fills defaults (it only reads the schema, so one serves every call)."""
    return _validator_with_defaults()(_schema())


def schema_defaults(node: dict) -> Any:
    """The defaults of a schema node, objects filled recursively, without jsonschema (scripts/gpu_check.sh runs
    where it may be missing): the schema is the one place a default is written."""
    if node.get("type") == "object" and "properties" in node:
        return {k: schema_defaults(sub) for k, sub in node["properties"].items()}
    return copy.deepcopy(node.get("default"))


def section_defaults(name: str) -> dict:
    """The defaults of one top-level config section (`cpt`, `evaluation`, ...)."""
    return schema_defaults(_schema()["properties"][name])


class ConfigError(InputError):
    """A configuration (files, --config-json, snakemake --config) that fails the schema: one line naming each key."""


def validate_config(cfg: dict) -> dict:
    """Fill defaults in place and raise ConfigError, one line naming each offending key (at most 10)."""
    errors = sorted(_validator().iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        parts = [f"{'.'.join(str(p) for p in e.absolute_path) or '<top>'}: {e.message}" for e in errors[:10]]
        more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
        raise ConfigError("invalid configuration: " + "; ".join(parts) + more +
                          " (schemas/config.schema.yaml documents every key)")
    cpt = cfg.get("cpt") or {}
    if cpt.get("compare_adapter") and cpt["adapter"]["kind"] != "none":
        raise ConfigError(f"cpt.compare_adapter adds LoRA twins of the full-parameter CPT models, but "
                          f"cpt.adapter.kind is {cpt['adapter']['kind']}: set cpt.adapter.kind: none (the twins take "
                          "cpt.adapter's other settings) or cpt.compare_adapter: false")
    return resolve_shipped_files(cfg)


def resolve_shipped_files(cfg: dict, workdir: str | Path = ".") -> dict:
    """Point the file keys of SHIPPED_FILE_KEYS at the workflow's own copy when they name a relative path that the
    working folder lacks but the workflow ships (the demo's `resources/...`), in place. A relative path is the
    user's file first, as in Snakemake; the fallback lets the defaults work when the workflow runs from another
    folder (`snakemake -s <clone>/Snakefile --directory <project>`) or as a module."""
    for keys in SHIPPED_FILE_KEYS:
        parent = cfg
        for k in keys[:-1]:
            parent = parent.get(k) if isinstance(parent, dict) else None
        value = parent.get(keys[-1]) if isinstance(parent, dict) else None
        if not isinstance(value, str) or not value or "://" in value or Path(value).is_absolute():
            continue
        if not (Path(workdir) / value).exists() and (ROOT / value).exists():
            parent[keys[-1]] = str(ROOT / value)
    return cfg


def with_defaults(cfg: dict) -> dict:
    """A validated copy of a (possibly partial) config with the schema's defaults filled in: how a stage function
    called from Python reads keys it was not given, so that defaults live only in the schema."""
    return validate_config(copy.deepcopy(cfg))


def load_config(configfiles: list[str | Path] | None = None, overrides: dict | None = None) -> dict:
    """Merge YAML files in order (default: config.yaml), then `overrides`, then validate with defaults."""
    cfg: dict = {}
    for path in configfiles or [DEFAULT_CONFIG]:
        try:
            with open(path, encoding="utf-8-sig") as f:
                loaded = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config sections at the top")
        cfg = deep_merge(cfg, loaded)
    if overrides:
        cfg = deep_merge(cfg, overrides)
    return validate_config(cfg)


def method_budgets(cfg: dict, method: str) -> list[int | float]:
    """Budgets a method is trained at: cpt.method_budgets[method] if given, else cpt.budgets; token counts (int)
    or, with cpt.budget_unit: fraction, fractions of the method's corpus (float; workflow_scripts/budgets.py)."""
    cpt = cfg.get("cpt", {})
    per_method = cpt.get("method_budgets") or {}
    values = per_method.get(method, cpt.get("budgets", []))
    if cpt.get("budget_unit", "tokens") == "fraction":
        return [float(b) for b in values]
    return [int(b) if float(b).is_integer() else b for b in values]


def check_budgets(cfg: dict) -> None:
    """Fail at planning time, not hours later in a CPT job: every budget fits cpt.budget_unit, and (token budgets)
    fills at least one block. A fraction's size is known once the corpus is built: train.py checks it then."""
    from .budgets import check_budget_values
    from .derived import trained_methods

    cpt = cfg.get("cpt", {})
    block = int(cpt.get("block_size", 1))
    unit = cpt.get("budget_unit", "tokens")
    methods = trained_methods(cfg)
    for m in methods:
        try:
            check_budget_values(method_budgets(cfg, m), unit,
                                f"cpt.method_budgets.{m}" if m in (cpt.get("method_budgets") or {}) else "cpt.budgets")
        except InputError as e:
            raise ConfigError(str(e)) from None
    if unit == "fraction":
        return
    small = sorted({(m, b) for m in methods for b in method_budgets(cfg, m) if b < block})
    if small:
        listed = ", ".join(f"{m} {b}" for m, b in small)
        raise ConfigError(f"cpt budgets shorter than one block of cpt.block_size={block} tokens: {listed}; "
                         "raise them (cpt.budgets / cpt.method_budgets) or lower cpt.block_size")


VLLM_SETUP = "bash scripts/bootstrap.sh --vllm"


def vllm_users(cfg: dict) -> list[str]:
    """The config keys that make a run use the vllm engine (synthesis.backend, evaluation.cot.engine when chain-of-
    thought is scored, in closed-book QA or in an enabled RAG baseline)."""
    ev = cfg.get("evaluation") or {}
    cot = (ev.get("cot") or {}).get("engine", "transformers") == "vllm"
    rag = ev.get("rag") or {}
    users = []
    if (cfg.get("synthesis") or {}).get("backend") == "vllm":
        users.append("synthesis.backend")
    if cot and ("cot" in (ev.get("modes") or []) or (rag.get("enabled") and "cot" in (rag.get("modes") or []))):
        users.append("evaluation.cot.engine")
    return users


def missing_engine_message(cfg: dict) -> str | None:
    """One line when the config needs vLLM and this interpreter cannot import it (checked before any job runs,
    since the rules run `python -m workflow_scripts.<stage>` with this interpreter); None when all is well."""
    import importlib.util

    users = vllm_users(cfg)
    if not users or importlib.util.find_spec("vllm") is not None:
        return None
    return (f"this config uses the vllm engine ({' and '.join(users)}) but vLLM is not installed in this "
            f"environment; build it with `{VLLM_SETUP}`, then run again")


def config_hash(section: Any) -> str:
    """Hash recorded with every output, so a result names the settings that made it."""
    return stable_hash(section, n=12)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--configfile, --config-json and --ops-json, as every stage's command line takes them."""
    parser.add_argument("--configfile", nargs="+", default=None, metavar="YAML",
                        help="config files merged in order (default: the repository's config.yaml)")
    parser.add_argument("--config-json", default=None, metavar="JSON",
                        help="config values (a JSON object shaped like the config) merged last; the Snakemake "
                             "rules pass the keys that shape a job's outputs this way (workflow_scripts/job_keys.py)")
    parser.add_argument("--ops-json", default=None, metavar="JSON",
                        help="operational config values (threads, logging, engine start-up) merged after "
                             "--config-json; the rules pass them apart so that changing them reruns nothing")


def _json_arg(text: str | None, flag: str) -> dict | None:
    """A JSON-object command-line value, or None; anything else is a one-line ConfigError."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag}: expected a JSON object shaped like the config")
    return value


def config_from_args(args: argparse.Namespace) -> dict:
    """The validated config of a stage run: --configfile (default config.yaml) or, when a rule passes
    --config-json alone, the schema defaults; then --config-json and --ops-json merged over it. A bad one is a
    ConfigError (one line)."""
    overrides = _json_arg(args.config_json, "--config-json")
    ops = _json_arg(getattr(args, "ops_json", None), "--ops-json")
    if ops:
        overrides = deep_merge(overrides or {}, ops)
    if overrides is not None and args.configfile is None:
        # A rule passes the resolved sections it needs: start from the defaults alone, not config.yaml.
        return validate_config(copy.deepcopy(overrides))
    return load_config(args.configfile, overrides)
