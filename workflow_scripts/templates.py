"""Prompt templates: the one loader of the text files in workflow_scripts/prompts/ (or a user's file).

Two readings exist because two kinds of file exist, and each keeps its published bytes (their hashes are the
prompt versions recorded with every result, pinned by tests):

- system prompts of the synthesis, judge and summary stages (`load_template(name)`): the file minus its final
  newline, as the prompts were published;
- few-shot prefixes and retrieval templates of the evaluation (`load_template(name, keep_final_newline=True,
  skip_comment_header=True)`): the file verbatim, except leading lines starting with `%%`, comments a user may
  put at the top of their own prefix file.
"""

from __future__ import annotations

from pathlib import Path

from .io_utils import InputError, read_text

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


def template_path(name: str | Path, hint: str = "") -> Path:
    """A template: a file name under workflow_scripts/prompts/ (with or without `.txt`), or a path to a file.

    A name that is a file as given (relative to the working folder, or absolute) is that file; otherwise it is
    looked up in workflow_scripts/prompts/. `hint` ends the error message (which config key to set)."""
    p = Path(name)
    if p.is_file():
        return p
    candidates = [PROMPTS_DIR / p.name] if p.suffix == ".txt" else [PROMPTS_DIR / f"{name}.txt", PROMPTS_DIR / p]
    for path in candidates:
        if path.is_file():
            return path
    known = ", ".join(sorted(q.stem for q in PROMPTS_DIR.glob("*.txt")))
    raise InputError(f"prompt template {str(name)!r} not found ({candidates[0]}); known templates: {known}"
                     + (f"; {hint}" if hint else ""))


def load_template(name: str | Path, *, keep_final_newline: bool = False, skip_comment_header: bool = False,
                  hint: str = "") -> str:
    """The text of template `name` (see template_path): a UTF-8 file, its byte-order mark removed; its final
    newline dropped unless `keep_final_newline`; its leading `%%` lines dropped with `skip_comment_header`."""
    text = read_text(template_path(name, hint))
    if skip_comment_header:
        lines = text.split("\n")
        while lines and lines[0].startswith("%%"):
            lines.pop(0)
        text = "\n".join(lines)
    if not keep_final_newline and text.endswith("\n"):
        text = text[:-1]
    return text
