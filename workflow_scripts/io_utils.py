"""Small I/O helpers shared by every stage: atomic writes, strict JSONL reading, append-only shards, hashes.

Outputs are written to a temporary file in the same folder and renamed into place, so an interrupted run never
leaves a half-written file that Snakemake (or a re-run) would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


_UMASK = os.umask(0)
os.umask(_UMASK)


class InputError(ValueError):
    """Bad input: the message names the file, the line or record, and what to do."""


class EngineUnavailable(InputError, RuntimeError):
    """A generation engine that cannot start here (not installed, no GPU): the message says what to install or
    choose instead. An InputError, so stage command lines print it as one line (exit 2)."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
    return n


def decode_text(data: bytes, name: str | os.PathLike) -> str:
    """UTF-8 bytes of an input file as text, without a leading byte-order mark (editors on Windows write one; it
    is not part of the content). Invalid UTF-8 is an InputError naming the file and byte."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{name}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 input text file (byte-order mark removed); missing or undecodable files are InputErrors."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    return decode_text(data, path)


def iter_jsonl(path: str | os.PathLike, *, allow_truncated_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) from a JSON-lines file, splitting on '\\n' only.

    QuALITY's train file holds U+2028 inside strings, which str.splitlines() would treat as a line break. A
    leading UTF-8 byte-order mark is accepted (`decode_text`).
    A malformed line raises InputError naming the file and line. With `allow_truncated_tail`, a last line
    without its newline that does not parse (a write cut off by a kill) is ignored instead: append-only
    shards use this to resume.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    yield from parse_jsonl(data, path, allow_truncated_tail=allow_truncated_tail)


def parse_jsonl(data: bytes, name: str | os.PathLike, *,
                allow_truncated_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """The records of JSON-lines bytes (a file's, or a zip member's) as `iter_jsonl` yields them; `name` names
    the source in errors."""
    text = decode_text(data, name)
    lines = text.split("\n")
    complete = text.endswith("\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if allow_truncated_tail and i == len(lines) and not complete:
                return
            raise InputError(f"{name}:{i}: malformed JSON ({e.msg} at column {e.colno}); fix or remove that line") from None
        if not isinstance(rec, dict):
            raise InputError(f"{name}:{i}: expected a JSON object per line, got {type(rec).__name__}")
        yield i, rec


def read_json_object(path: str | os.PathLike, producer: str = "an earlier stage") -> dict:
    """Read a JSON file holding one object; a missing or malformed file is an InputError naming it."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found ({producer} writes it)") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object")
    return obj


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [rec for _, rec in iter_jsonl(path)]


class AppendOnlyJsonl:
    """An append-only JSONL shard keyed by record id: a re-run skips ids already present.

    Each record is written as one line with a single write() and flushed + fsynced, so a kill at any moment
    leaves at most one truncated last line; that line is cut off on open (its record is regenerated).
    """

    def __init__(self, path: str | os.PathLike, key: str = "id") -> None:
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ids: set[str] = set()
        if self.path.exists():
            self._repair_tail()
            for _, rec in iter_jsonl(self.path):
                self.ids.add(rec[key])
        self._f = open(self.path, "a", encoding="utf-8")

    def _repair_tail(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(cut)

    def __contains__(self, rec_id: str) -> bool:
        return rec_id in self.ids

    def append(self, rec: dict) -> bool:
        rec_id = rec[self.key]
        if rec_id in self.ids:
            return False
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.ids.add(rec_id)
        return True

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "AppendOnlyJsonl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stable_hash(*parts: Any, n: int = 16) -> str:
    """A short, stable hex digest of JSON-serialisable parts (record ids, config and prompt hashes)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:n]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
