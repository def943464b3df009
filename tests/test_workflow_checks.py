"""The workflow's checks before any job, each one line naming the key and what to do (issue 20): a config that
fails the schema stops parsing with a WorkflowError (not sys.exit), and a missing general-text file (replay,
probe) stops a real run before its first job while a dry run still plans."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflow_scripts.config import load_config
from workflow_scripts.replay import HELDOUT, general_text_sources, missing_sources

ROOT = Path(__file__).resolve().parent.parent


def cfg_with(**cpt) -> dict:
    return load_config(overrides={"cpt": cpt})


@pytest.mark.unit
def test_general_text_sources_are_the_files_the_jobs_read(tmp_path):
    demo = load_config()
    assert general_text_sources(demo) == {"cpt.replay.source": demo["cpt"]["replay"]["source"],
                                          "cpt.probe.source": demo["cpt"]["probe"]["source"]}
    assert missing_sources(demo) == []  # the demo's vendored stories
    off = cfg_with(replay={"rate": 0.0, "source": "gone.txt"}, probe={"source": HELDOUT})
    assert general_text_sources(off) == {}  # no replay, the probe from the replay source's held-out part
    mixed = load_config(overrides={"cpt": {"replay": {"rate": 0.0, "source": "gone.txt"}},
                                   "mixtures": {"mix": {"sources": {"entigraph": 0.5, "replay": 0.5}}}})
    assert general_text_sources(mixed)["cpt.replay.source"] == "gone.txt"  # a mixture draws on it


@pytest.mark.unit
def test_a_missing_general_text_file_is_one_line_naming_key_and_file(tmp_path):
    cfg = cfg_with(replay={"rate": 0.1, "source": str(tmp_path / "gone")}, probe={"source": str(tmp_path / "p.txt")})
    replay, probe = missing_sources(cfg)
    assert replay.startswith(f"cpt.replay.source {tmp_path / 'gone'}: no such file or folder; download it once")
    assert probe.startswith(f"cpt.probe.source {tmp_path / 'p.txt'}: no such file or folder; give a local")
    assert "\n" not in replay + probe
    (tmp_path / "p.txt").write_text("a probe text")
    assert missing_sources(cfg) == [replay]


def snakemake(work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
                           str(work), "--cores", "1", *args], cwd=work, capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_a_missing_replay_file_stops_a_run_before_any_job_and_a_dry_run_plans(tmp_path):
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump({"cpt": {"replay": {"rate": 0.1, "source": "gone.txt"}}}))
    args = ["--configfile", str(ROOT / "config.yaml"), "overlay.yaml", "--", "results/models/raw/all"]
    assert snakemake(tmp_path, "-n", *args).returncode == 0
    r = snakemake(tmp_path, *args)
    out = r.stdout + r.stderr
    errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert r.returncode != 0 and "Traceback" not in out, out[-2000:]
    assert errors == ["error: cpt.replay.source gone.txt: no such file or folder; download it once and point the "
                      "source at the local files (python -m workflow_scripts.replay prepare turns the RedPajama "
                      "sample's jsonl files into that form; docs/cpt.md)"]
    assert not (tmp_path / "results").exists()  # no job ran
    # a run with no job that reads general text (the data download) is not stopped by it
    zip_only = [*args[:-1], "results/data/quality/QuALITY.v1.0.1.zip"]
    r = snakemake(tmp_path, *zip_only)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    assert (tmp_path / "results/data/quality/QuALITY.v1.0.1.zip").is_file()


@pytest.mark.e2e
def test_an_invalid_config_stops_parsing_with_one_workflow_error_line(tmp_path):
    r = snakemake(tmp_path, "-n", "--config", "seed=abc")
    out = r.stdout + r.stderr  # Snakemake prints a parsing error on either, depending on its logger's set-up
    assert r.returncode != 0 and "Traceback" not in out and "SystemExit" not in out, out[-2000:]
    assert "WorkflowError" in out
    lines = [ln for ln in out.splitlines() if "invalid configuration" in ln]
    assert lines == ["invalid configuration: seed: 'abc' is not of type 'integer' "
                     "(schemas/config.schema.yaml documents every key)"], out[-2000:]
