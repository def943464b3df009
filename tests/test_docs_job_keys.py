"""docs/architecture.md "Config keys and jobs" restates workflow_scripts/job_keys.py for readers: its table names
every job of `JOBS`, and its key lists name exactly the declared operational and structural keys, each a key of the
schema. A key or job added to job_keys.py without the docs (or the reverse) fails here."""

from __future__ import annotations

import functools
import inspect
import re
from pathlib import Path

import pytest

from workflow_scripts import job_keys
from workflow_scripts.config import load_config, load_schema

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
SECTION = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8").split("## Config keys and jobs", 1)[1]
SECTION = SECTION.split("\n## ", 1)[0]


@functools.cache
def schema() -> dict:
    return load_schema()


def table() -> dict[str, tuple[str, str]]:
    """job (rule) -> (shaping cell, operational cell) of the table; a row may name several jobs."""
    rows: dict[str, tuple[str, str]] = {}
    for line in SECTION.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 3 or cells[0] in ("job (rule)", "---"):
            continue
        for job in re.sub(r"\s*\(per [^)]*\)", "", cells[0]).split(", "):
            rows[job] = (cells[1], cells[2])
    return rows


def paths(text: str, dotted: bool = False) -> set[str]:
    """The config paths in backticks (`a.{b, c}` expanded to a.b and a.c): dotted ones, and top-level sections
    unless `dotted`; other code in backticks (file names, functions, relative names) is skipped."""
    top = set(schema()["properties"])
    out: set[str] = set()
    for code in re.findall(r"`([^`]+)`", text):
        m = re.fullmatch(r"([\w.<>-]+?)\.?\{([\w, ]+)\}", code)
        names = [f"{m.group(1)}.{k.strip()}" for k in m.group(2).split(",")] if m else [code]
        out |= {n for n in names if re.fullmatch(r"[a-z_]+(\.[\w<>]+)+", n) and not n.endswith(".py")
                or (not dotted and n in top)}
    return out


def in_schema(path: str) -> bool:
    """A schema key (a `<name>` part stands for any key there)."""
    node: dict = schema()
    for part in re.sub(r"<[^>]*>", "<name>", path).split("."):
        props = node.get("properties") or {}
        if part.startswith("<"):
            node = node.get("additionalProperties") or next(iter(props.values()), None) or {}
        elif part in props:
            node = props[part]
        else:
            return False
    return True


def paragraph(start: str, end: str) -> str:
    text = " ".join(SECTION.split())
    return text.split(start, 1)[1].split(end, 1)[0]


def test_the_table_names_every_job_of_the_declaration():
    assert set(table()) == set(job_keys.JOBS)


def test_the_listed_operational_keys_are_the_declared_ones():
    listed = paths(paragraph("Engine keys that are operational:", "Structural keys:"))
    listed |= {p for _, ops in table().values() for p in paths(ops, dotted=True)}
    assert listed == set(job_keys.OPERATIONAL)


def test_the_listed_structural_keys_are_the_declared_ones():
    assert paths(paragraph("Structural keys:", "and the names under")) == set(job_keys.STRUCTURAL)


def test_every_key_the_table_names_is_a_schema_key_and_shaping_keys_are_not_operational():
    for job, (shaping, ops) in table().items():
        for path in paths(shaping) | paths(ops):
            assert in_schema(path), f"{job}: {path} is no key of schemas/config.schema.yaml"
        for path in paths(shaping):
            assert not job_keys.under(path, job_keys.OPERATIONAL), f"{job}: {path} is operational"


def test_a_job_without_operational_keys_says_so():
    """`-` in the operational column exactly for the jobs (of one instance, on the demo) that read none."""
    cfg = load_config()
    for job, (_, ops) in table().items():
        if len(inspect.signature(job_keys.JOBS[job]).parameters) == 1:  # jobs without wildcards
            assert (ops == "-") == (job_keys.operational(cfg, job) == {}), job
