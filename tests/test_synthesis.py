"""Synthesis (issue 3): prompts as published, record ids and shards, the method registry, failures, the report.

The engine here is FakeBackend, a deterministic stand-in that answers like a model would (scripted extraction
answers, texts built from the request); the real model runs in test_synthesis_real.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from pathlib import Path

import pytest

from workflow_scripts import synthesis as syn
from workflow_scripts.backends import Completion
from workflow_scripts.config import validate_config
from workflow_scripts.io_utils import read_jsonl
from workflow_scripts.synth_report import compression_ratio, distinct_n, entity_coverage, source_overlap, words

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PAPER_PROMPTS = Path("/work/shared/reference/paper_prompts.md")

ARTICLE = {"uid": "a1", "title": "Lost in Translation", "author": "Janifer, Laurence M.", "year": 1972,
           "text": "Korvin sat in the cell of the Tr'en. The Tr'en were efficient, and Korvin lied to the Ruler."}
ARTICLE2 = {"uid": "a2", "title": "Captain Chaos", "author": "Bond, Nelson S.", "year": 1957,
            "text": "Captain Chaos flew the ship Mercury to Venus. Ellen and the captain argued on Venus."}


class FakeBackend:
    """A deterministic engine. Extraction answers come from `EXTRACTION[uid]` (a list, one per attempt; the last
    repeats); other texts are built from the request. A request naming the entity FAIL returns an error.
    `constructed` counts instances, so tests can assert that a cached run never builds an engine."""

    name = "fake"
    constructed = 0
    EXTRACTION: dict[str, list[str]] = {}
    calls: list[str] = []
    attempts: dict[str, int] = {}

    def __init__(self, model: str = "fake", **settings) -> None:
        type(self).constructed += 1
        self.model = model

    def generate(self, requests):
        for req in requests:
            type(self).calls.append(req.id)
            user = req.messages[-1]["content"]
            uid = req.metadata.get("article_uid")
            kind = req.metadata.get("kind")
            if kind == "extraction":
                answers = self.EXTRACTION.get(uid) or ['{"summary": "s", "entities": ["x", "y"]}']
                i = type(self).attempts.get(uid, 0)  # the n-th extraction call of this article gets answer n
                type(self).attempts[uid] = i + 1
                text = answers[min(i, len(answers) - 1)]
            else:
                ents = re.findall(r"^- (.+)$", user, re.M)
                if "FAIL" in ents:
                    yield Completion(id=req.id, texts=[], prompt_tokens=5, completion_tokens=0, finish_reasons=[],
                                     model=self.model, error="simulated engine failure")
                    continue
                words_ = re.findall(r"\w+", user.split("### Entities:")[0])[req.seed % 7:][:12]
                text = f"{kind}: {' and '.join(ents) or 'article'} -- {' '.join(words_)} (seed {req.seed})"
            yield Completion(id=req.id, texts=[text], prompt_tokens=len(user) // 4,
                             completion_tokens=len(text.split()), finish_reasons=["stop"], model=self.model)

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def _reset_fake():
    FakeBackend.constructed = 0
    FakeBackend.EXTRACTION = {}
    FakeBackend.calls = []
    FakeBackend.attempts = {}
    yield


def make_cfg(**synthesis) -> dict:
    base = {"methods": ["entigraph", "rephrase"], "sampling": {"max_new_tokens": 32},
            "entigraph": {"max_triples": 3, "extraction_retries": 2}}
    base.update(synthesis)
    return validate_config({"models": {"generator": {"source": "hf", "name": "fake-model"}}, "synthesis": base})


def factory():
    return FakeBackend


def write_articles(tmp_path: Path, articles=(ARTICLE, ARTICLE2)) -> Path:
    p = tmp_path / "articles.jsonl"
    p.write_text("".join(json.dumps(a) + "\n" for a in articles), encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------------- prompts
PAIR_PROMPT = """You will act as a knowledge analyzer tasked with dissecting an article provided by the user. Your role involves two main objectives:
1. Rephrasing Content: The user will identify two specific entities mentioned in the article. You are required to rephrase the content of the article twice:
    * Once, emphasizing the first entity.
    * Again, emphasizing the second entity.
2. Analyzing Interactions: Discuss how the two specified entities interact within the context of the article.

Your responses should provide clear segregation between the rephrased content and the interaction analysis. Ensure each section of the output include sufficient context, ideally referencing the article's title to maintain clarity about the discussion's focus.
Here is the format you should follow for your response:

### Discussion of <title> in relation to <entity1>
<Rephrased content focusing on the first entity>

### Discussion of <title> in relation to <entity2>
<Rephrased content focusing on the second entity>

### Discussion of Interaction between <entity1> and <entity2> in context of <title>
<Discussion on how the two entities interact within the article>"""

EASY_PROMPT = ("You are an assistant to help read a article and then rephrase it in simpler terms. The user will provide "
               "you with an article with title, year, content. You need to generate a paraphrase of the same article "
               "using a very small vocabulary and extremely simple sentences that a toddler will understand. Remember "
               "to keep the meaning and every content of the article intact, including the title, year, etc.")

# sha256 of each template's text (the paper's prompts, Appendix H.1 / H.2 / E)
TEMPLATE_SHA256 = {
    "entigraph_entities": "d8d88a514c6e26e749a8b798f0b7ed632c760ad82c6801e862038dd8d5b928b6",
    "entigraph_pair": "e5d7ea509531729d40d6fb74079bfa1d92828cc4e3c85b0f331f50a118824d32",
    "entigraph_triple": "23bc6553e6968a280f1c2f2bf9fc83a38973a54eb25e5fe819c9a4d716fda950",
    "rephrase_easy": "2a1cf2441b4e1128710e3bfcfbdbd8a569dedc7f5d86e2064af89360bb65c02a",
    "rephrase_medium": "41ef1d3afc90e43da72bd85ce902bd2e1711882ed5525dcaf6d056c3bd979a82",
    "rephrase_hard": "25eccb5a7601089bc38d775d308da01cda26ba5692d1d475ceef8e568ef54c9a",
    "qa": "d2c319cefea304fd95222341252a96ee43ff326c65b554f5876fdc3452a72ea3",
}


def test_templates_are_the_papers_text():
    for name, digest in TEMPLATE_SHA256.items():
        assert hashlib.sha256(syn.load_template(name).encode()).hexdigest() == digest, name
    if PAPER_PROMPTS.exists():  # the protocol transcription, where this checkout has it
        blocks = re.findall(r"````text\n(.*?)\n````", PAPER_PROMPTS.read_text(encoding="utf-8"), re.S)
        assert [syn.load_template(n) for n in TEMPLATE_SHA256] == blocks[:7]


def test_rendered_relation_prompt_equals_paper_and_reference_user_format():
    from workflow_scripts.entigraph import EntiGraph

    cfg = make_cfg(entigraph={"max_triples": 0})
    doc = {"status": "ok", "summary": "", "summary_record": None, "entities": ["Korvin", "Tr'en"],
           "max_new_tokens": 16}
    (task,) = EntiGraph("entigraph", cfg).plan(ARTICLE, doc)
    assert task.kind == "pair" and task.entities == ("Korvin", "Tr'en")
    assert task.system == PAIR_PROMPT
    assert task.user == ('### Document Content:\n"Lost in Translation", Laurence M. Janifer, 1972.\n '
                         + ARTICLE["text"] + "\n### Entities:\n- Korvin\n- Tr'en")
    easy = syn.get_method("rephrase", cfg).plan(ARTICLE, None)[0]
    assert easy.kind == "rephrase-easy" and easy.system == EASY_PROMPT
    assert easy.user == '### Document Content:\n"Lost in Translation", Laurence M. Janifer, 1972.\n ' + ARTICLE["text"]


@pytest.mark.parametrize("author,year,head", [
    (None, 2001, '"T", 2001.'), ("Plain Name", None, '"T", Plain Name.'), ("", "", '"T".'),
    ("Hugo, Victor", "1862", '"T", Victor Hugo, 1862.'),
])
def test_document_header_without_author_or_year(author, year, head):
    assert syn.render_document({"title": "T", "author": author, "year": year, "text": "body"}) == head + "\n body"


def test_prompt_version_tracks_the_template(tmp_path):
    v = syn.prompt_version(syn.load_template("rephrase_easy"))
    assert v == syn.prompt_version(EASY_PROMPT) and len(v) == 12
    assert syn.prompt_version(EASY_PROMPT + " ") != v
    custom = tmp_path / "mine.txt"
    custom.write_text("Rewrite the article as a poem.\n")
    assert syn.load_template(str(custom)) == "Rewrite the article as a poem."


# ------------------------------------------------------------------------------------------- registry
def test_registry_builtins_families_and_unknown(tmp_path):
    tpl = tmp_path / "poem_style.txt"
    tpl.write_text("Rewrite the article as a poem.\n")
    cfg = make_cfg(families={"poem": {"templates": [str(tpl)], "repeats": 2},
                             "graph": {"module": "workflow_scripts.entigraph:EntiGraph"}})
    assert isinstance(syn.get_method("entigraph", cfg), syn.Method)
    tasks = syn.get_method("poem", cfg).plan(ARTICLE, None)
    assert [(t.kind, t.repeat) for t in tasks] == [("poem-style", 0), ("poem-style", 1)]
    assert syn.method_needs_entities("graph", cfg) and syn.method_needs_entities("entigraph", cfg)
    assert not syn.method_needs_entities("poem", cfg) and not syn.method_needs_entities("rephrase", cfg)
    qa = syn.get_method("qa", cfg).plan(ARTICLE, None)
    assert [t.kind for t in qa] == ["qa"] and "question and answer format" in qa[0].system
    with pytest.raises(syn.InputError, match="unknown synthesis method 'nope'"):
        syn.get_method("nope", cfg)
    with pytest.raises(syn.InputError, match="prompt template 'missing_one' not found"):
        syn.get_method("x", make_cfg(families={"x": {"templates": ["missing_one"]}}))


def test_methods_command_lists_registry(capsys):
    assert syn.main(["methods", "--config-json", json.dumps({"synthesis": {"methods": ["qa"]}})]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"entigraph", "rephrase", "qa"} and out["qa"]["configured"]
    hard = syn.prompt_version(syn.load_template("rephrase_hard"))
    assert out["rephrase"]["settings"]["templates"]["rephrase_hard"] == hard


# ------------------------------------------------------------------------------------------- synthesis runs
def extract(cfg, tmp_path, article):
    from workflow_scripts.entigraph import extract_entities

    return extract_entities(cfg, article, tmp_path / "work" / "extraction" / f"{article['uid']}.jsonl", factory())


def test_entigraph_and_rephrase_shards_records_and_resume(tmp_path):
    cfg = make_cfg()
    FakeBackend.EXTRACTION = {"a1": ['```json\n{"summary": "Korvin tricks the Tr\'en.", '
                                     '"entities": ["Korvin", "Tr\'en", "the Ruler", "cell", "korvin",],}\n```']}
    doc = extract(cfg, tmp_path, ARTICLE)
    assert doc["status"] == "ok" and doc["entities"] == ["Korvin", "Tr'en", "the Ruler", "cell"]
    assert doc["dropped_entities"] == {"duplicate": 1} and doc["parse"] == "fenced"
    out, stats = tmp_path / "entigraph" / "a1.jsonl", tmp_path / "entigraph" / "stats" / "a1.json"
    st = syn.synthesize_article(cfg, "entigraph", ARTICLE, out, stats, doc, make_backend=factory())
    recs = read_jsonl(out)
    kinds = [r["kind"] for r in recs]
    assert kinds == ["summary"] + ["pair"] * 6 + ["triple"] * 3  # C(4,2) pairs, 3 of C(4,3) triples
    assert recs[0]["text"] == "Korvin tricks the Tr'en." and recs[0]["entities"] == []
    fields = {"id", "method", "kind", "article_uid", "entities", "text", "prompt_tokens", "completion_tokens",
              "model", "finish_reason", "prompt_version", "seed", "config_hash"}
    assert all(fields <= set(r) for r in recs)
    assert len({r["id"] for r in recs}) == len(recs)
    assert {r["prompt_version"] for r in recs if r["kind"] == "pair"} == {syn.prompt_version(PAIR_PROMPT)}
    assert st["generated"] == 9 and st["reused"] == 0 and st["status"] == "complete"
    assert st["requests"] == 9  # the summary's request is the extraction's
    before = out.read_text()

    # A re-run makes no call and builds no engine; the shard is byte-identical.
    FakeBackend.constructed = 0
    out.unlink()
    st2 = syn.synthesize_article(cfg, "entigraph", ARTICLE, out, stats, doc, make_backend=factory())
    assert FakeBackend.constructed == 0 and st2["reused"] == 10 and out.read_text() == before

    # Raising the triple cap keeps the 3 triples already generated and adds only new ones (prefix-stable order).
    cfg5 = make_cfg(entigraph={"max_triples": 4, "extraction_retries": 2})
    st3 = syn.synthesize_article(cfg5, "entigraph", ARTICLE, out, stats, doc, make_backend=factory())
    recs5 = read_jsonl(out)
    assert st3["generated"] == 1 and [r["id"] for r in recs5][:10] == [r["id"] for r in recs]

    # Rephrase: one record per style, kinds and templates as configured.
    rout = tmp_path / "rephrase" / "a1.jsonl"
    syn.synthesize_article(cfg, "rephrase", ARTICLE, rout, tmp_path / "rephrase" / "stats" / "a1.json",
                           make_backend=factory())
    assert [r["kind"] for r in read_jsonl(rout)] == ["rephrase-easy", "rephrase-medium", "rephrase-hard"]


def test_record_ids_depend_on_what_makes_the_text(tmp_path):
    base = dict(article_uid="a1", prompt_ver="v", entities=("x", "y"), model="m", seed=1, sampling=[1.0, 1.0, 8])
    rid = syn.record_id(**base)
    for k, v in [("article_uid", "a2"), ("prompt_ver", "w"), ("entities", ("y", "x")), ("model", "n"),
                 ("seed", 2), ("sampling", [1.0, 1.0, 9])]:
        assert syn.record_id(**{**base, k: v}) != rid, k
    assert syn.record_id(**base) == rid
    # repeats get distinct seeds, hence distinct records
    cfg = make_cfg(rephrase={"styles": ["easy"], "repeats": 3})
    out = tmp_path / "r.jsonl"
    syn.synthesize_article(cfg, "rephrase", ARTICLE, out, tmp_path / "r.stats.json", make_backend=factory())
    recs = read_jsonl(out)
    assert len(recs) == 3 and len({r["seed"] for r in recs}) == 3 and len({r["id"] for r in recs}) == 3


def test_failed_requests_block_publication_until_retried(tmp_path):
    cfg = make_cfg(entigraph={"max_triples": 0})
    doc = {"status": "ok", "summary": "", "summary_record": None, "entities": ["A", "B", "FAIL"], "max_new_tokens": 8}
    out, stats = tmp_path / "e" / "a1.jsonl", tmp_path / "e" / "stats" / "a1.json"
    with pytest.raises(syn.SynthesisIncomplete, match="2 of 3 planned texts have no record"):
        syn.synthesize_article(cfg, "entigraph", ARTICLE, out, stats, doc, make_backend=factory())
    assert not out.exists() and not stats.exists()
    inc = json.loads(stats.with_suffix(".incomplete.json").read_text())
    assert inc["failures"] == 2 and inc["failed_requests"][0]["error"] == "simulated engine failure"
    assert len(read_jsonl(syn.default_work_path(out))) == 1  # the finished one is kept
    # Allowed failures: the shard is published without them and the ledger counts them.
    cfg_ok = make_cfg(entigraph={"max_triples": 0}, max_failed_fraction=0.7)
    st = syn.synthesize_article(cfg_ok, "entigraph", ARTICLE, out, stats, doc, make_backend=factory())
    assert st["records"] == 1 and st["failures"] == 2 and st["reused"] == 1 and st["generated"] == 0


# ------------------------------------------------------------------------------------------- extraction
def test_extraction_retries_then_succeeds_and_is_cached(tmp_path):
    cfg = make_cfg()
    FakeBackend.EXTRACTION = {"a1": [
        "I cannot do JSON, sorry.",
        '{"summary": "<A concise summary of the article>", "entities": ["entity1", "Korvin", "entity2"]}',
        '{"summary": "ok", "entities": ["entity1", "Korvin", "Ruler"]}']}
    doc = extract(cfg, tmp_path, ARTICLE)
    assert doc["status"] == "ok" and doc["entities"] == ["Korvin", "Ruler"] and doc["summary"] == "ok"
    assert [a["outcome"] for a in doc["attempts"]] == [
        "no JSON object in the answer",
        "1 usable entity in the answer, fewer than the 2 a pair needs (dropped: {'placeholder': 2})", "ok"]
    assert doc["dropped_entities"] == {"placeholder": 1}
    assert doc["summary_record"]["seed"] == doc["attempts"][2]["seed"] != doc["attempts"][0]["seed"]
    assert doc["summary_record"]["model"] == "fake-model"
    FakeBackend.constructed = 0
    assert extract(cfg, tmp_path, ARTICLE) == doc and FakeBackend.constructed == 0


def test_failed_extraction_is_recorded_and_does_not_block_other_articles(tmp_path, capsys):
    """Through the command line, as the rules call it: a1 never answers JSON, a2 does."""
    articles = write_articles(tmp_path)
    FakeBackend.EXTRACTION = {"a1": ["Here are the entities: Korvin, the Tr'en."],
                              "a2": ['Sure! {"summary": "A flight.", "entities": ["Captain Chaos", "Venus", "Ellen"]}'
                                     ' Hope this helps.']}
    cfg = json.dumps({"models": {"generator": {"source": "hf", "name": "fake-model"}},
                      "synthesis": {"sampling": {"max_new_tokens": 16},
                                    "entigraph": {"max_triples": 1, "extraction_retries": 1}}})
    synth = tmp_path / "synth" / "entigraph"
    engine = f"{__name__}:FakeBackend"
    for uid in ("a1", "a2"):
        assert syn.main(["extract", "--articles", str(articles), "--article", uid, "--output",
                         str(synth / "entities" / f"{uid}.json"), "--engine", engine, "--config-json", cfg]) == 0
    d1 = json.loads((synth / "entities" / "a1.json").read_text())
    assert d1["status"] == "failed" and len(d1["attempts"]) == 2 and d1["entities"] == []
    assert "no usable answer after 2 attempt(s); last: no JSON object in the answer" in d1["reason"]
    assert d1["attempts"][0]["answer_preview"].startswith("Here are the entities")
    for uid in ("a1", "a2"):
        assert syn.main(["synthesize", "--method", "entigraph", "--articles", str(articles), "--article", uid,
                         "--entities", str(synth / "entities" / f"{uid}.json"), "--output", str(synth / f"{uid}.jsonl"),
                         "--stats", str(synth / "stats" / f"{uid}.json"), "--engine", engine,
                         "--config-json", cfg]) == 0
    assert read_jsonl(synth / "a1.jsonl") == []
    assert [r["kind"] for r in read_jsonl(synth / "a2.jsonl")] == ["summary", "pair", "pair", "pair", "triple"]
    assert syn.main(["report", "--method", "entigraph", "--articles", str(articles), "--synth-dir", str(synth),
                     "--entities-dir", str(synth / "entities"), "--ledger", str(synth / "ledger.json"),
                     "--report", str(synth / "report.json"), "--table", str(synth / "report.csv"),
                     "--config-json",
                     json.dumps({"synthesis": {"prices": {"input_per_mtok": 10, "output_per_mtok": 30}}})]) == 0
    ledger = json.loads((synth / "ledger.json").read_text())
    assert ledger["extraction"]["failed"] == 1 and ledger["extraction"]["ok"] == 1
    assert ledger["extraction"]["failed_articles"][0]["article_uid"] == "a1"
    assert ledger["requests"] == 4 + 3  # 4 relation calls + 3 extraction attempts (2 for a1, 1 for a2)
    a2 = read_jsonl(synth / "a2.jsonl")
    pt = sum(r["prompt_tokens"] for r in a2[1:]) + ledger["extraction"]["prompt_tokens"]
    ct = sum(r["completion_tokens"] for r in a2[1:]) + ledger["extraction"]["completion_tokens"]
    assert (ledger["prompt_tokens"], ledger["completion_tokens"]) == (pt, ct)
    assert ledger["cost"]["total"] == pytest.approx((pt * 10 + ct * 30) / 1e6)
    report = json.loads((synth / "report.json").read_text())
    assert report["records"] == 5 and report["tokens"] == sum(r["completion_tokens"] for r in a2)
    assert report["by_article"]["a1"] == {"records": 0, "tokens": 0, "extraction": "failed", "entities": 0}
    assert 0 < report["entity_coverage"] <= 1 and 0 < report["distinct_1"] <= 1
    assert report["prefixes"] and report["prefixes"][-1]["tokens"] == report["tokens"]
    table = (synth / "report.csv").read_text().splitlines()
    assert table[0].startswith("method,kind,records,tokens,distinct_1") and table[1].startswith("entigraph,all,5,")


def test_extraction_fallback_heuristic(tmp_path):
    cfg = make_cfg(entigraph={"extraction_retries": 0, "extraction_fallback": "heuristic", "max_entities": 3})
    FakeBackend.EXTRACTION = {"a1": ["no json"]}
    doc = extract(cfg, tmp_path, ARTICLE)
    assert doc["status"] == "fallback" and doc["entities"] == ["Korvin", "Tr'en", "Ruler"]
    assert "heuristic entities" in doc["reason"]
    out = tmp_path / "a1.jsonl"
    syn.synthesize_article(cfg, "entigraph", ARTICLE, out, tmp_path / "a1.stats.json", doc, make_backend=factory())
    assert [r["kind"] for r in read_jsonl(out)][:1] == ["pair"]  # no summary record without a model summary


# ------------------------------------------------------------------------------------------- report metrics
def test_report_metrics_on_known_texts():
    toks = [words("the cat the cat"), words("a dog")]
    assert distinct_n(toks, 1) == pytest.approx(4 / 6)  # the, cat, a, dog / 6 words
    assert distinct_n(toks, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat the), (a dog)
    assert distinct_n([["x"]], 2) is None
    texts = ["abc " * 200, "xyz"]
    raw = "\n".join(texts).encode()
    assert compression_ratio(texts) == pytest.approx(len(raw) / len(zlib.compress(raw, 9)))
    assert compression_ratio(["abc " * 200]) > compression_ratio([os.urandom(400).hex()])
    recs = [{"article_uid": "a", "text": "one two three four"}, {"article_uid": "a", "text": "nine ten eleven"}]
    src = {"a": set(zip(*(words("zero one two three five")[i:] for i in range(2))))}
    assert source_overlap(recs, src, 2) == pytest.approx(2 / 5)  # (one two), (two three) of 3 + 2 bigrams
    assert entity_coverage(recs, {"a": ["Two", "seven"], "b": ["x"]}) == 0.5  # b has no records: not counted
