"""EntiGraph's pure parts: robust parsing of the extraction answer, entity normalisation, and the seeded,
cap-respecting, prefix-stable sampling of entity pairs and triples."""

from __future__ import annotations

import itertools
import math

import pytest

from workflow_scripts.entigraph import (heuristic_entities, normalize_entities, parse_extraction, permutation_prefix,
                                        sample_pairs, sample_triples, tuple_seed, unrank_combination)

pytestmark = pytest.mark.unit

GOOD = {"summary": "S.", "entities": ["Korvin", "Tr'en"]}

# answer -> (expected summary/entities or None, expected `how` or failure reason)
PARSE_TABLE = [
    ('{"summary": "S.", "entities": ["Korvin", "Tr\'en"]}', GOOD, "json"),
    ('```json\n{"summary": "S.", "entities": ["Korvin", "Tr\'en"]}\n```', GOOD, "fenced"),
    ('```\n{"summary": "S.", "entities": ["Korvin", "Tr\'en"]}\n```\nAnything else?', GOOD, "fenced"),
    ('Here is the analysis:\n{"summary": "S.", "entities": ["Korvin", "Tr\'en"]}\nI hope it helps.', GOOD, "prose"),
    ('{"summary": "S.", "entities": ["Korvin", "Tr\'en",],}', GOOD, "json"),  # trailing commas
    ("{'summary': 'S.', 'entities': ['Korvin', \"Tr'en\"]}", GOOD, "json"),  # Python-style quotes
    ('{"Summary": "S.", "Entities": "Korvin, Tr\'en"}', GOOD, "json"),  # capitalised keys, comma string
    ('{"summary": "S.", "entities": {"people": ["Korvin"], "places": ["Tr\'en"]}}', GOOD, "json"),  # categories
    ('{"summary": "S.", "entities": [{"name": "Korvin"}, {"name": "Tr\'en"}]}', GOOD, "json"),
    ('{"summary": "S.", "entities": ["Korvin", "Tr\'en", "Ru', GOOD, "repaired-truncated"),  # cut mid-entity
    ('```json\n{"summary": "S.", "entities": ["Korvin", "Tr\'en"', GOOD, "repaired-truncated"),  # open fence
    ('{"note": 1} then {"summary": "S.", "entities": ["Korvin", "Tr\'en"]}', GOOD, "prose"),  # second object
    ('{"summary": "<A concise summary of the article>", "entities": ["Korvin", "Tr\'en"]}',
     {"summary": "", "entities": ["Korvin", "Tr'en"]}, "json"),  # the format's placeholder echoed back
    ('{"summary": "S.", "topics": ["x"]}', None, "JSON object without an 'entities' field"),
    ("The article is about Korvin and the Tr'en.", None, "no JSON object in the answer"),
    ('{"summary": "S.", "entities": [', {"summary": "S.", "entities": []}, "repaired-truncated"),
    ("", None, "empty answer"),
]


@pytest.mark.parametrize("answer,expected,how", PARSE_TABLE)
def test_parse_extraction_table(answer, expected, how):
    parsed, got_how = parse_extraction(answer)
    assert got_how == how
    if expected is None:
        assert parsed is None
    else:
        parsed["entities"], _ = normalize_entities(parsed["entities"])
        assert parsed == expected


def test_normalize_entities_dedups_and_cleans():
    raw = ["  Korvin ", "1. The Ruler", "- korvin", '"Tr\'en"', "entity1", "...", "x" * 101, "Tr\u2019en", "",
           "cell.", 42, "Comity  of\nPlanets"]
    ents, dropped = normalize_entities(raw, max_chars=100)
    assert ents == ["Korvin", "The Ruler", "Tr'en", "cell", "42", "Comity of Planets"]
    assert dropped == {"duplicate": 2, "placeholder": 1, "too_long": 1, "empty": 2}


def test_heuristic_entities_rank_capitalised_names():
    text = "The Tr'en held Korvin. Korvin asked the Ruler. He'd lie. But the Ruler lied. Korvin smiled. LOST IN SPACE."
    assert heuristic_entities(text, 3) == ["Korvin", "Ruler", "Tr'en"]


def test_unrank_combination_matches_itertools():
    for n, k in [(5, 2), (6, 3), (7, 1), (4, 4)]:
        ranked = [unrank_combination(i, n, k) for i in range(math.comb(n, k))]
        assert ranked == list(itertools.combinations(range(n), k))
    with pytest.raises(ValueError):
        unrank_combination(10, 5, 2)


def test_permutation_prefix_is_a_seeded_prefix_stable_permutation():
    full = permutation_prefix(50, 50, seed=7)
    assert sorted(full) == list(range(50))
    assert permutation_prefix(50, 10, seed=7) == full[:10]  # a smaller cap is a prefix of a larger one
    assert permutation_prefix(50, 10, seed=7) == permutation_prefix(50, 10, seed=7)
    assert permutation_prefix(50, 10, seed=8) != full[:10]
    assert permutation_prefix(3, 10, seed=1) and len(permutation_prefix(3, 10, seed=1)) == 3


def test_pairs_and_triples_respect_caps_and_are_deterministic():
    ents = [f"e{i}" for i in range(12)]
    assert sample_pairs(ents, None, 1) == list(itertools.combinations(ents, 2))  # all, in the reference order
    pairs = sample_pairs(ents, 10, 1)
    assert len(pairs) == 10 and len(set(pairs)) == 10 and pairs == sample_pairs(ents, 10, 1)
    assert all(a in ents and b in ents and ents.index(a) < ents.index(b) for a, b in pairs)
    assert sample_pairs(ents, 1000, 1) == list(itertools.combinations(ents, 2))
    triples = sample_triples(ents, 25, 3)
    assert len(triples) == 25 and len(set(triples)) == 25 and triples == sample_triples(ents, 25, 3)
    assert sample_triples(ents, 5, 3) == triples[:5]
    assert set(sample_triples(ents, None, 3)) == set(itertools.combinations(ents, 3))
    assert sample_triples(ents, None, 3) != list(itertools.combinations(ents, 3))  # shuffled, as the reference
    assert sample_triples(ents[:2], 5, 3) == [] and sample_pairs(ents[:1], None, 3) == []
    assert sample_triples(ents, 0, 3) == []
    # per-article seeds differ, so articles with the same entity count get different samples
    assert tuple_seed(42, "a", "triples") != tuple_seed(42, "b", "triples")
    # a large entity list is sampled without enumerating all C(400, 3) = 10.6M triples
    big = [f"x{i}" for i in range(400)]
    assert len(set(sample_triples(big, 1000, 1))) == 1000
