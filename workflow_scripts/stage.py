"""The scaffold of a stage's command line (`python -m workflow_scripts.<stage>`): the argument parser, the config
(--configfile / --config-json / --ops-json, workflow_scripts/config.py), bad input as one line on stderr with exit
status 2, and stats written atomically.

    p = stage.parser("figures", __doc__)       # in a stage's main(argv)
    ...
    args = p.parse_args(argv)
    return stage.run(lambda: do_the_work(args, stage.config(args)))

A stage with subcommands adds them with `stage.subcommand(sub, name, help, config=True)`. Other outcomes a
stage reports with their own exit status (an interrupted training run: 3; an incomplete synthesis shard: 1) are
`exits={ExceptionClass: (label, status)}`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from .config import add_config_args, config_from_args
from .io_utils import InputError, write_json_atomic

EXIT_BAD_INPUT = 2


def parser(stage: str, doc: str | None, config: bool = False) -> argparse.ArgumentParser:
    """The parser of `python -m workflow_scripts.<stage>`, its help the module docstring (kept as written);
    with `config`, the config arguments too."""
    p = argparse.ArgumentParser(prog=f"python -m workflow_scripts.{stage}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if config:
        add_config_args(p)
    return p


def config(args: argparse.Namespace) -> dict:
    """The validated config of this run (schema defaults filled in; see config.config_from_args)."""
    return config_from_args(args)


def error_line(e: BaseException) -> str:
    """The error as one line (a multi-line message, e.g. the config validator's list, joined with "; ")."""
    text = str(e).strip() or type(e).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def subcommand(sub: Any, name: str, help: str, config: bool = False) -> argparse.ArgumentParser:
    """A subcommand of a stage (`sub` from add_subparsers); with `config`, the config arguments too."""
    p = sub.add_parser(name, help=help)
    if config:
        add_config_args(p)
    return p


def run(body: Callable[[], int | None], errors: tuple[type[BaseException], ...] = (InputError,),
        exits: Mapping[type[BaseException], tuple[str, int]] | None = None) -> int:
    """Run a stage's work: its exit status (0 when it returns None), or 2 with `error: <one line>` on stderr
    when it raises one of `errors` (bad input the user can fix; anything else is a bug and keeps its traceback).
    `exits` maps other exceptions to `<label>: <one line>` and their own exit status."""
    exits = dict(exits or {})
    try:
        return body() or 0
    except errors as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except tuple(exits) as e:
        label, status = next(v for k, v in exits.items() if isinstance(e, k))
        print(f"{label}: {error_line(e)}", file=sys.stderr)
        return status


def write_stats(path: str | Path, stats: dict[str, Any]) -> None:
    """A stage's stats or summary JSON, written atomically (a killed job leaves the old file or none)."""
    write_json_atomic(path, stats)
