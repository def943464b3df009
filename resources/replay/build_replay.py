"""Rebuild the vendored general texts of resources/replay/ from the vendored QuALITY sample.

Two Project Gutenberg stories of the 15-article sample (resources/quality/) that the demo's article selection
(data.max_articles: 3, the first three articles of the sample) does not use:
- jaywalker.txt: "Jaywalker", Ross Rocklynne (1950), Project Gutenberg ebook #51027: the replay source.
- reluctant_heroes.txt: "The Reluctant Heroes", Frank M. Robinson (1970), Project Gutenberg ebook #51483: the
  held-out text of the forgetting probe.
- paragraphs.jsonl: both stories cut at blank lines, one {"text": paragraph} record per paragraph (295): a
  many-document replay source, so that the paper's `cpt.probe.source: replay:heldout` with its 1% held out has
  documents to hold out (experiments/paper-rehearsal.yaml).

    python resources/replay/build_replay.py          # write the three files
    python resources/replay/build_replay.py --check  # byte-compare with the files here
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ZIP = HERE.parent / "quality" / "QuALITY.v1.0.1.zip"
MEMBER = "QuALITY.v1.0.1/QuALITY.v1.0.1.htmlstripped.dev"
FILES = {"51027": "jaywalker.txt", "51483": "reluctant_heroes.txt"}
PARAGRAPHS = "paragraphs.jsonl"


def build() -> dict[str, str]:
    with zipfile.ZipFile(ZIP) as z:
        lines = z.read(MEMBER).decode("utf-8").split("\n")
    out = {}
    for line in lines:
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec["article_id"] in FILES:
            assert rec["source"] == "Gutenberg", rec["article_id"]
            out[FILES[rec["article_id"]]] = rec["article"].strip() + "\n"
    assert set(out) == set(FILES.values()), sorted(out)
    paragraphs = [p.strip() for name in FILES.values() for p in re.split(r"\n[ \t]*\n", out[name]) if p.strip()]
    out[PARAGRAPHS] = "".join(json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in paragraphs)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with the files here instead of writing")
    args = p.parse_args()
    texts = build()
    if args.check:
        bad = [n for n, t in texts.items() if (HERE / n).read_text(encoding="utf-8") != t]
        print("mismatch: " + ", ".join(bad) if bad else "ok")
        return 1 if bad else 0
    for name, text in texts.items():
        (HERE / name).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
