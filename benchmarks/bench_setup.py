"""Set-up cost of the demo's environment: pip byte-compiling one file at a time vs compileall on every core.

Side by side in one run, alternating: a fresh virtual environment gets `pip install -r requirements.txt` with pip's
default byte-compilation (`compile`), or with `--no-compile` followed by `python -m compileall -j 0` over
site-packages (`parallel`, what scripts/bootstrap.sh does), or with `--no-compile` alone (`nocompile`: Python
compiles on first import; not used, because PYTHONDONTWRITEBYTECODE, set in many images, makes every job pay it).
Then the imports of a demo job (torch, transformers' Llama class and tokenizer, snakemake, pandas, matplotlib,
scipy) run twice. Wall and CPU seconds (user + system of the child
processes) of each step, and the ratios. pip's download cache should be warm (run the bootstrap once first), so
that the network is not what is measured.

    python benchmarks/bench_setup.py [--repeats 1] [--results-md benchmarks/RESULTS.md]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMPORTS = ("import torch, transformers; from transformers import LlamaForCausalLM, AutoTokenizer; "
           "import snakemake, pandas, matplotlib.pyplot, scipy.optimize")


def timed(cmd: list[str], check: bool = True) -> tuple[float, float]:
    """(wall s, CPU s of the child) of one command; it must succeed unless check is False (compileall reports the
    test files of other Python versions that some packages ship, as pip ignores them)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    subprocess.run(cmd, check=check, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def one_setup(mode: str, base: Path) -> dict:
    venv = base / f"venv-{mode}"
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    extra = ["--no-compile"] if mode in ("nocompile", "parallel") else []
    wall, cpu = timed([py, "-m", "pip", "install", "--quiet", *extra, "-r", "requirements.txt"])
    if mode == "parallel":
        site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                              capture_output=True, text=True).stdout.strip()
        w, c = timed([py, "-m", "compileall", "-q", "-j", "0", site], check=False)
        wall, cpu = wall + w, cpu + c
    install = (wall, cpu)
    first = timed([py, "-c", IMPORTS])
    second = timed([py, "-c", IMPORTS])
    shutil.rmtree(venv, ignore_errors=True)
    return {"mode": mode, "install": install, "first_import": first, "second_import": second}


def table(rows: list[dict]) -> str:
    out = ["| mode | pip install (+ compileall) wall s | CPU s | first import wall s | first import CPU s | "
           "second import CPU s | install + first import CPU s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        total = r["install"][1] + r["first_import"][1]
        out.append(f"| {r['mode']} | {r['install'][0]:.1f} | {r['install'][1]:.1f} | {r['first_import'][0]:.1f} | "
                   f"{r['first_import'][1]:.1f} | {r['second_import'][1]:.1f} | {total:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=["compile", "parallel"], choices=["compile", "parallel", "nocompile"])
    ap.add_argument("--results-md", default=None, help="append the table to this file")
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="bench-setup-"))
    rows = []
    try:
        for _ in range(args.repeats):
            for mode in args.modes:
                rows.append(one_setup(mode, base))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def total(mode: str, i: int) -> float:
        return sum(r["install"][i] + r["first_import"][i] for r in rows if r["mode"] == mode)

    load = os.getloadavg()[0]
    other = args.modes[1] if len(args.modes) > 1 else args.modes[0]
    text = (f"\n{table(rows)}\n\nInstall (+ compileall) + first import, {args.modes[0]} / {other}: "
            f"CPU {total(args.modes[0], 1) / total(other, 1):.2f}x, wall {total(args.modes[0], 0) / total(other, 0):.2f}x "
            f"(load average at the end {load:.1f}).\n")
    print(text)
    if args.results_md:
        with open(args.results_md, "a") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
