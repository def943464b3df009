"""EntiGraph (Yang et al., ICLR 2025, Appendix H.1): per article, one call for a summary and an entity list, then
relation analysis texts for entity pairs and triples.

Pure parts pinned by tests: robust parsing of the extraction JSON (`parse_extraction`), entity normalisation
(`normalize_entities`), and the seeded, prefix-stable sampling of pairs and triples (`sample_pairs`,
`sample_triples`). `extract_entities` runs the extraction call with bounded retries; `EntiGraph` is the
synthesis method (registered in workflow_scripts/synth_framework.py).

Extraction never stops the workflow: an article whose answer still does not parse after
`synthesis.entigraph.extraction_retries` retries gets an entity file with status `failed` and the reason (its
shard is then empty and the ledger lists it), unless `extraction_fallback: heuristic` is set, in which case
capitalised names from the article stand in for the model's entity list (status `fallback`, no summary record).
That fallback exists for tiny demo generators that cannot follow the JSON instruction; the paper has none.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import random
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from .backends import GenerationRequest
from .estimates import Estimate, article_requests, n_tuples
from .io_utils import AppendOnlyJsonl, stable_hash
from .synth_framework import (Method, Task, generation_hash, generator_name, load_template, prompt_version,
                              read_work_shard, record_id, request_seed, sampling_key, template_task, user_message)

ENTITIES_TEMPLATE = "entigraph_entities"
PAIR_TEMPLATE = "entigraph_pair"
TRIPLE_TEMPLATE = "entigraph_triple"
# The answer's shape as the extraction prompt asks for it: engines that can constrain decoding to a JSON schema (vLLM's
# structured outputs) decode to it; the openai engine asks for JSON mode (response_format json_object).
EXTRACTION_SCHEMA = {"type": "object", "properties": {"summary": {"type": "string"},
                                                     "entities": {"type": "array", "items": {"type": "string"}}},
                     "required": ["summary", "entities"]}
MIN_ENTITIES = 2  # an extraction with fewer entities yields no relation text: it counts as failed and is retried


# ------------------------------------------------------------------------------------------ parsing the answer
_FENCE = re.compile(r"```[ \t]*(?:json|JSON|javascript)?[ \t]*\n?(.*?)```", re.S)
_OPEN_FENCE = re.compile(r"```[ \t]*(?:json|JSON|javascript)?[ \t]*\n?")
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")


def _scan(s: str) -> tuple[int | None, list[str], bool, list[int]]:
    """Scan JSON-ish text from its first '{': (index closing it or None, open brackets, inside a string at the
    end, positions of commas outside strings)."""
    stack: list[str] = []
    in_str = esc = False
    commas: list[int] = []
    for i, ch in enumerate(s):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append(ch)
        elif ch in "}]":
            if stack:
                stack.pop()
            if not stack:
                return i, [], False, commas
        elif ch == ",":
            commas.append(i)
    return None, stack, in_str, commas


def _close(s: str, stack: list[str]) -> str:
    return s + "".join("}" if b == "{" else "]" for b in reversed(stack))


def _loads(s: str) -> Any:
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        pass
    try:  # trailing commas: {"a": [1, 2,],}
        return json.loads(_TRAILING_COMMA.sub(r"\1", s))
    except json.JSONDecodeError:
        pass
    try:  # a Python literal: single quotes, True/None
        return ast.literal_eval(s)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def _objects_in(text: str) -> Iterator[tuple[Any, str]]:
    """Candidate objects in `text`, from each '{' (at most 20): complete ones ("json" when the object is the
    whole text, else "prose"), then truncated ones closed ("repaired-truncated")."""
    starts = [m.start() for m in re.finditer(r"\{", text)][:20]
    for start in starts:
        body = text[start:]
        end, stack, in_str, commas = _scan(body)
        if end is not None:
            obj = _loads(body[: end + 1])
            if obj is not None:
                whole = not text[:start].strip() and not body[end + 1:].strip()
                yield obj, "json" if whole else "prose"
            continue
        # Cut off by the token limit: close what is open. An element cut inside its string is dropped (back to
        # the last comma) rather than kept half-written.
        closed = body.rstrip()
        variants = []
        if not in_str:
            variants.append(_close(closed.rstrip(",:"), stack))
        if commas:
            cut = body[: commas[-1]]
            variants.append(_close(cut, _scan(cut)[1]))
        if in_str:
            variants.append(_close(closed + '"', stack))
        for v in variants:
            obj = _loads(v)
            if obj is not None:
                yield obj, "repaired-truncated"
                break


def _flatten_entities(value: Any) -> list[str]:
    """Entity items from whatever shape the model used: list of strings, a comma/newline-separated string,
    objects with a name, or a dict of categories (people, places, ...) mapping to lists."""
    if value is None:
        return []
    if isinstance(value, str):
        return [p for p in re.split(r"[\n;,]", value) if p.strip()]
    if isinstance(value, dict):
        for key in ("name", "entity", "text", "value"):
            if isinstance(value.get(key), str):
                return [value[key]]
        return [e for v in value.values() for e in _flatten_entities(v)]
    if isinstance(value, (list, tuple)):
        return [e for v in value for e in _flatten_entities(v)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [str(value)]
    return []


def parse_extraction(text: str) -> tuple[dict | None, str]:
    """Parse an extraction answer into {"summary": str, "entities": [str]} (entities not yet normalised).

    Tolerates code fences, prose before or after the object, trailing commas, Python-style quotes, and an
    answer cut off by the token limit. Returns (result, how) where `how` names the repair used
    (json | fenced | repaired-truncated ...), or (None, reason) when nothing usable is found.
    """
    if not text or not text.strip():
        return None, "empty answer"
    candidates: list[tuple[str, str]] = [(m.group(1), "fenced") for m in _FENCE.finditer(text)]
    if text.count("```") % 2 == 1:  # an opening fence whose closing one was cut off
        m = list(_OPEN_FENCE.finditer(text))[-1]
        candidates.append((text[m.end():], "fenced"))
    candidates.append((text, ""))
    found_object = False
    for chunk, where in candidates:
        for obj, how in _objects_in(chunk):
            if not isinstance(obj, dict):
                continue
            found_object = True
            lower = {str(k).strip().lower(): v for k, v in obj.items()}
            if "entities" not in lower:
                continue
            summary = lower.get("summary", "")
            if isinstance(summary, list):
                summary = " ".join(str(s) for s in summary)
            elif not isinstance(summary, str):
                summary = json.dumps(summary, ensure_ascii=False) if summary is not None else ""
            if _PLACEHOLDER.match(summary.strip()):  # the prompt's "<A concise summary of the article>" echoed
                summary = ""
            label = where if (where and how != "repaired-truncated") else how
            return {"summary": summary.strip(), "entities": _flatten_entities(lower["entities"])}, label
    if found_object:
        return None, "JSON object without an 'entities' field"
    return None, "no JSON object in the answer"


# ------------------------------------------------------------------------------------------ entities
_BULLET = re.compile(r"^(?:[-*\u2022\u00b7]+|\d+[.)]|[a-z][.)](?=\s))\s*")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
_PLACEHOLDER = re.compile(r"^(?:entity\s*\d*|\.\.\.|\u2026|etc\.?|<[^>]*>)$", re.I)


def normalize_entity(s: str) -> str:
    """NFKC, single spaces, no list bullet or numbering, no surrounding quotes or trailing punctuation."""
    s = unicodedata.normalize("NFKC", str(s)).translate(_QUOTES)
    s = re.sub(r"\s+", " ", s).strip()
    s = _BULLET.sub("", s)
    s = s.strip(" \"'`\u201c\u201d\u2018\u2019*")
    s = s.rstrip(" .,;:")
    return s.strip()


def normalize_entities(raw: list[Any], max_chars: int = 100) -> tuple[list[str], dict[str, int]]:
    """Normalise and deduplicate (case-insensitively, first spelling kept, order kept). Drops empty items,
    the prompt's own placeholders echoed back (entity1, ...), and items longer than `max_chars` (sentences)."""
    out: list[str] = []
    seen: set[str] = set()
    dropped: Counter[str] = Counter()
    for item in raw:
        e = normalize_entity(item)
        if not e or not any(ch.isalnum() for ch in e):
            dropped["empty"] += 1
        elif _PLACEHOLDER.match(e):
            dropped["placeholder"] += 1
        elif len(e) > max_chars:
            dropped["too_long"] += 1
        elif e.casefold() in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(e.casefold())
            out.append(e)
    return out, dict(dropped)


_NAME_WORD = r"[A-Z][A-Za-z'\u2019-]*[a-z][A-Za-z'\u2019-]*"
_CAPITALISED = re.compile(rf"\b{_NAME_WORD}(?:[ \t]+{_NAME_WORD})*")  # one line: no name spans a line break
_STOP = frozenset("""a an and as at but by for from he her his i if in it its me my no not of on or our she so that the
their them then there these they this those to was we what when where which who why with you your yes oh well
mr mrs ms dr sir all any after before how one two now here just still very""".split())


def heuristic_entities(text: str, limit: int) -> list[str]:
    """Capitalised names of the article, most frequent first (ties: first appearance). A name must occur at
    least once inside a sentence (not only after . ! ? or a line start), which drops capitalised ordinary
    words; leading function words ("The Ruler", "He'd") and possessives ("Korvin's") are stripped.
    The demo's fallback when the generator cannot produce the JSON entity list."""
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    form: dict[str, str] = {}
    inside: set[str] = set()
    for m in _CAPITALISED.finditer(text):
        words = m.group(0).split()
        sentence_start = not text[: m.start()].rstrip(" \t\"'\u201c\u2018(") or \
            text[: m.start()].rstrip(" \t\"'\u201c\u2018(")[-1] in ".!?\n:;"
        while words and re.split(r"['\u2019]", words[0].lower())[0] in _STOP:
            words, sentence_start = words[1:], False
        if not words:
            continue
        words[-1] = re.sub(r"['\u2019]s?$", "", words[-1])
        name = " ".join(words)
        key = name.casefold()
        counts[key] += 1
        first.setdefault(key, m.start())
        form.setdefault(key, name)
        if not sentence_start:
            inside.add(key)
    ranked = sorted((k for k in counts if k in inside), key=lambda k: (-counts[k], first[k]))
    return [form[k] for k in ranked[:limit]]


# ------------------------------------------------------------------------------------------ pairs and triples
def permutation_prefix(total: int, k: int, seed: int) -> list[int]:
    """The first k items of a seeded uniform random permutation of range(total), in O(k) (a lazy Fisher-Yates
    shuffle). Prefix-stable: the first k of a longer prefix are the same k, so raising a cap keeps every tuple
    already generated and only adds new ones."""
    rng = random.Random(seed)
    swapped: dict[int, int] = {}
    out: list[int] = []
    for i in range(min(k, total)):
        j = rng.randrange(i, total)
        vi, vj = swapped.get(i, i), swapped.get(j, j)
        swapped[j] = vi
        out.append(vj)
    return out


def unrank_combination(index: int, n: int, k: int) -> tuple[int, ...]:
    """The `index`-th k-combination of range(n) in lexicographic order (itertools.combinations order)."""
    if not 0 <= index < math.comb(n, k):
        raise ValueError(f"combination index {index} out of range for C({n},{k})")
    out: list[int] = []
    x = 0
    for slot in range(k):
        while True:
            c = math.comb(n - x - 1, k - slot - 1)
            if index < c:
                out.append(x)
                x += 1
                break
            index -= c
            x += 1
    return tuple(out)


def tuple_seed(seed: int, article_uid: str, what: str) -> int:
    return int(stable_hash(seed, article_uid, what, n=12), 16)


def sample_tuples(entities: list[str], k: int, cap: int | None, seed: int, shuffle_all: bool) -> list[tuple[str, ...]]:
    """k-entity tuples: all of them in lexicographic order when uncapped and not `shuffle_all`, else the first
    `cap` (or all) of a seeded random order."""
    n = len(entities)
    total = math.comb(n, k)
    if total == 0:
        return []
    if (cap is None or cap >= total) and not shuffle_all:
        idx: list[int] = list(range(total))
    else:
        idx = permutation_prefix(total, total if cap is None else min(cap, total), seed)
    return [tuple(entities[i] for i in unrank_combination(j, n, k)) for j in idx]


def sample_pairs(entities: list[str], cap: int | None, seed: int) -> list[tuple[str, ...]]:
    """All pairs in the reference order (i < j) by default; with a cap, a seeded sample of that many."""
    return sample_tuples(entities, 2, cap, seed, shuffle_all=False)


def sample_triples(entities: list[str], cap: int | None, seed: int) -> list[tuple[str, ...]]:
    """The first `cap` triples of a seeded shuffle of all triples (the reference shuffles triples with seed 42
    and generates until stopped; the cap makes that stopping point a setting)."""
    return sample_tuples(entities, 3, cap, seed, shuffle_all=True)


def reference_triples(entities: list[str], cap: int | None, seed: int = 42) -> list[tuple[str, ...]]:
    """The authors' triple order (data/entigraph.py of their repository): all i < j < k triples in lexicographic
    order, shuffled by Python's `random` seeded with `seed` (42 there, the same for every article), first `cap`.
    Not prefix-stable in the entity list, and O(C(E,3)) memory; `triple_order: reference` selects it."""
    triples = list(itertools.combinations(entities, 3))
    random.Random(seed).shuffle(triples)
    return triples if cap is None else triples[:cap]


# ------------------------------------------------------------------------------------------ extraction
def extract_entities(cfg: dict, article: dict, work_path: str | Path, make_backend: Callable[[], Any]) -> dict:
    """Step 1 of EntiGraph for one article: the summary and entity list, as the entity file's content.

    Each attempt has its own seed; answers are cached in `work_path` by request id, so a re-run repeats no call.
    Engine errors are not cached (they are retried on the next run).
    """
    syn = cfg["synthesis"]
    ec = syn["entigraph"]
    sampling = syn["sampling"]
    uid = str(article["uid"])
    system = load_template(ENTITIES_TEMPLATE)
    pv = prompt_version(system)
    user = user_message(article)
    model = generator_name(cfg)
    max_new = int(ec["extraction_max_new_tokens"])
    skey = sampling_key(sampling, max_new)
    cached = read_work_shard(Path(work_path))
    attempts: list[dict] = []
    result: dict | None = None
    how = ""
    dropped: dict[str, int] = {}
    n_raw = 0
    backend = None
    try:
        with AppendOnlyJsonl(work_path) as work:
            for attempt in range(1 + int(ec["extraction_retries"])):
                seed = request_seed(sampling["seed"], uid, "extraction", (), attempt)
                rid = record_id(uid, pv, (), model, seed, skey)
                rec = cached.get(rid)
                if rec is None:
                    backend = backend or make_backend()
                    req = GenerationRequest(
                        id=rid, messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                        group=uid, max_new_tokens=max_new, temperature=float(sampling["temperature"]),
                        top_p=float(sampling["top_p"]), seed=seed,
                        metadata={"method": "entigraph", "kind": "extraction", "article_uid": uid,
                                  "response_format": "json_object", "json_schema": EXTRACTION_SCHEMA})
                    c = next(iter(backend.generate([req])), None)
                    rec = {"id": rid, "attempt": attempt, "seed": seed, "text": c.text if c else "",
                           "error": c.error if c else "no completion returned by the engine",
                           "prompt_tokens": c.prompt_tokens if c else 0,
                           "completion_tokens": c.completion_tokens if c else 0,
                           "finish_reason": c.finish_reason if c else "error", "model": model}
                    if not rec["error"]:
                        work.append(rec)
                info = {k: rec[k] for k in ("attempt", "id", "seed", "prompt_tokens", "completion_tokens",
                                            "finish_reason")}
                if rec.get("error"):
                    parsed, how = None, f"engine error: {rec['error']}"
                else:
                    parsed, how = parse_extraction(rec["text"])
                entities: list[str] = []
                if parsed is not None:
                    entities, dropped = normalize_entities(parsed["entities"], int(ec["max_entity_chars"]))
                    n_raw = len(parsed["entities"])
                    if len(entities) < MIN_ENTITIES:
                        how = (f"{len(entities)} usable entit{'y' if len(entities) == 1 else 'ies'} in the answer, "
                               f"fewer than the {MIN_ENTITIES} a pair needs (dropped: {dropped or 'none'})")
                if parsed is not None and len(entities) >= MIN_ENTITIES:
                    info["outcome"] = "ok"
                    info["parse"] = how
                    attempts.append(info)
                    result = {"summary": parsed["summary"], "entities": entities, "record": rec}
                    break
                info["outcome"] = how
                info["answer_preview"] = (rec.get("text") or "")[:300]
                attempts.append(info)
    finally:
        if backend is not None:
            backend.close()

    doc: dict[str, Any] = {
        "article_uid": uid, "title": article.get("title"), "status": "ok", "reason": None,
        "summary": "", "entities": [], "n_raw_entities": n_raw, "dropped_entities": dropped,
        "parse": None, "attempts": attempts, "prompt_version": pv, "model": model, "max_new_tokens": max_new,
        "config_hash": generation_hash(cfg), "prompt_tokens": sum(a["prompt_tokens"] for a in attempts),
        "completion_tokens": sum(a["completion_tokens"] for a in attempts), "summary_record": None,
    }
    if result is not None:
        rec = result["record"]
        doc.update(summary=result["summary"], entities=result["entities"], parse=attempts[-1]["parse"],
                   summary_record={k: rec[k] for k in ("seed", "prompt_tokens", "completion_tokens",
                                                       "finish_reason", "model")})
        return doc
    last = attempts[-1]["outcome"] if attempts else "none"
    reason = f"no usable answer after {len(attempts)} attempt(s); last: {last}"
    if ec["extraction_fallback"] == "heuristic":
        limit = int(ec["max_entities"] or 20)
        doc.update(status="fallback", entities=heuristic_entities(str(article["text"]), limit),
                   reason=reason + "; heuristic entities from the article (synthesis.entigraph.extraction_fallback)")
        if doc["entities"]:
            return doc
    doc.update(status="failed", entities=[], reason=reason)
    return doc


# ------------------------------------------------------------------------------------------ the method
class EntiGraph(Method):
    """The EntiGraph corpus of one article: its summary (from extraction) + relation texts of entity pairs and
    triples (paper Appendix H.1). Plan order: summary, pairs, triples."""

    needs_entities = True

    def __init__(self, name: str, cfg: dict) -> None:
        super().__init__(name, cfg)
        self.ec = cfg["synthesis"]["entigraph"]

    def settings(self) -> dict:
        return {"templates": {t: prompt_version(load_template(t))
                              for t in (ENTITIES_TEMPLATE, PAIR_TEMPLATE, TRIPLE_TEMPLATE)},
                **{k: self.ec[k] for k in ("max_entities", "max_pairs", "max_triples", "max_new_tokens")},
                # only when set, so that the default's settings (and what depends on them) stay as they were
                **({"triple_order": self.ec["triple_order"]} if self.ec["triple_order"] != "seeded" else {})}

    def max_new_tokens(self) -> int:
        return int(self.ec["max_new_tokens"]) if self.ec["max_new_tokens"] else super().max_new_tokens()

    def plan(self, article: dict, entities_doc: dict | None) -> list[Task]:
        if not entities_doc or entities_doc.get("status") not in ("ok", "fallback"):
            return []
        uid = str(article["uid"])
        seed = int(self.cfg["synthesis"]["sampling"]["seed"])
        entities = list(entities_doc.get("entities") or [])
        if self.ec["max_entities"]:
            entities = entities[: int(self.ec["max_entities"])]
        tasks: list[Task] = []
        summary = entities_doc.get("summary_record")
        if entities_doc.get("status") == "ok" and summary and entities_doc.get("summary"):
            system = load_template(ENTITIES_TEMPLATE)
            tasks.append(Task(kind="summary", template=ENTITIES_TEMPLATE, system=system,
                              user=user_message(article), prompt_version=prompt_version(system),
                              max_new_tokens=int(entities_doc["max_new_tokens"]),
                              fixed={"text": entities_doc["summary"], **summary}))
        new = self.max_new_tokens()
        for pair in sample_pairs(entities, self.ec["max_pairs"], tuple_seed(seed, uid, "pairs")):
            tasks.append(template_task("pair", PAIR_TEMPLATE, article, pair, max_new_tokens=new))
        triples = (reference_triples(entities, self.ec["max_triples"], seed) if self.ec["triple_order"] == "reference"
                   else sample_triples(entities, self.ec["max_triples"], tuple_seed(seed, uid, "triples")))
        for triple in triples:
            tasks.append(template_task("triple", TRIPLE_TEMPLATE, article, triple, max_new_tokens=new))
        return tasks

    def estimate(self, article_tokens: list[float], n_entities: list[int],
                 prompt_tokens: Callable[[str], float]) -> list[Estimate] | None:
        """One extraction request per article, then relation requests for min(C(E,k), cap) entity tuples
        (k = 2, 3); a relation prompt is the article prefix plus the tuple's entity names."""
        assume = self.cfg["planner"]["assume"]
        extra, n_art = float(assume["prompt_overhead_tokens"]), len(article_tokens)
        ent_new = assume["entity_completion_tokens"]
        ent_new = float(ent_new if ent_new is not None else self.ec["extraction_max_new_tokens"])
        rel_new = assume["completion_tokens"]
        rel_new = float(rel_new if rel_new is not None else self.max_new_tokens())
        cap_e = self.ec["max_entities"]
        entities = [min(e, int(cap_e)) if cap_e else e for e in n_entities]
        groups: list[Estimate] = [
            ("entities + summary", article_requests([1] * n_art, article_tokens,
                                                    prompt_tokens(ENTITIES_TEMPLATE) + extra, 0.0, ent_new),
             "1 extraction request per article (the summary is its text)")]
        for k, name, template in ((2, "pairs", PAIR_TEMPLATE), (3, "triples", TRIPLE_TEMPLATE)):
            cap = self.ec[f"max_{name}"]
            groups.append((f"relations, entity {name}",
                           article_requests([n_tuples(e, k, cap) for e in entities], article_tokens,
                                            prompt_tokens(template) + extra, k * float(assume["tokens_per_entity"]),
                                            rel_new),
                           f"min(C(E,{k}), {cap if cap is not None else 'all'}) per article"))
        return groups
