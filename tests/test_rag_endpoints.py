"""The RAG endpoint clients (issue 21, item 4) against a local stand-in server on 127.0.0.1.

The stand-in implements the two routes the clients speak: OpenAI's `POST /v1/embeddings` ({model, input} ->
{data: [{index, embedding}]}) and the Cohere/Jina/vLLM rerank route `POST /v1/rerank` ({model, query, documents,
top_n} -> {results: [{index, relevance_score}]}, best first). Its embeddings are normalised hashed bags of words and
its relevance the number of query words a document shares, so the right answers are known.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from workflow_scripts import rag
from workflow_scripts.config import validate_config
from workflow_scripts.io_utils import InputError
from workflow_scripts.rag_endpoints import EndpointEmbedder, EndpointReranker

pytestmark = pytest.mark.unit

PORTS = range(20310, 20330)  # this helper's range (20300-20399)
DIM = 64


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def embed(text: str) -> list[float]:
    v = [0.0] * DIM
    for w in words(text):
        v[int(hashlib.md5(w.encode()).hexdigest(), 16) % DIM] += 1.0
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]


class StandIn(BaseHTTPRequestHandler):
    calls: list[dict] = []
    fail_next: list[int] = []  # HTTP statuses to answer before serving normally

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandIn.calls.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if StandIn.fail_next:
            return self._send(StandIn.fail_next.pop(0), {"error": "try again"})
        if self.path == "/v1/embeddings":
            return self._send(200, {"data": [{"index": i, "embedding": embed(t)} for i, t in
                                             reversed(list(enumerate(body["input"])))]})  # any order: by index
        if self.path == "/v1/rerank":
            q = set(words(body["query"]))
            scores = [len(q & set(words(d))) for d in body["documents"]]
            order = sorted(range(len(scores)), key=lambda i: -scores[i])[:body.get("top_n") or len(scores)]
            return self._send(200, {"results": [{"index": i, "relevance_score": scores[i]} for i in order]})
        self._send(404, {"error": "no such route"})


@pytest.fixture(scope="module")
def server():
    for port in PORTS:
        try:
            srv = ThreadingHTTPServer(("127.0.0.1", port), StandIn)
            break
        except OSError:
            continue
    else:
        pytest.skip(f"no free port in {PORTS.start}-{PORTS.stop - 1} for the stand-in server")
    # shutdown() waits for the serve loop's next poll: 0.05 s, not the default 0.5 s
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def fresh():
    StandIn.calls.clear()
    StandIn.fail_next.clear()


def test_embedder_batches_orders_by_index_and_sends_the_key(server, monkeypatch):
    monkeypatch.setenv("TEST_EMB_KEY", "sk-test")
    e = EndpointEmbedder(server + "/v1", "text-embedding-3-large", "TEST_EMB_KEY", batch_size=2)
    texts = ["apple pie", "tyre change at monza", "one-eyed cat", "glass orchard"]
    assert e.embed(texts) == [embed(t) for t in texts]
    assert [len(c["body"]["input"]) for c in StandIn.calls] == [2, 2]
    assert all(c["auth"] == "Bearer sk-test" and c["body"]["model"] == "text-embedding-3-large"
               for c in StandIn.calls)


def test_reranker_scores_in_document_order_and_retries_transient_errors(server, monkeypatch):
    monkeypatch.delenv("TEST_RR_KEY", raising=False)
    StandIn.fail_next.extend([503])
    r = EndpointReranker(server, "rerank-english-v3.0", "/v1/rerank", "TEST_RR_KEY")
    docs = ["the cat slept", "the one-eyed cat named Admiral", "a lighthouse"]
    assert r.scores("cat named Admiral", docs) == [1.0, 3.0, 0.0]
    assert len(StandIn.calls) == 2 and StandIn.calls[1]["body"]["top_n"] == 3
    assert StandIn.calls[1]["auth"] is None  # no key in the environment: none sent


def test_clear_errors(server):
    with pytest.raises(InputError, match="HTTP 404"):
        EndpointReranker(server, "m", "/nowhere").scores("q", ["d"])
    with pytest.raises(InputError, match="no answer after"):
        import workflow_scripts.rag_endpoints as re_mod

        re_mod._post_json("http://127.0.0.1:9/v1/rerank", {}, None, 1.0, retries=0)


def test_retrieve_with_endpoint_embeddings_and_rerank(server):
    """The authors' pipeline shape on three articles: endpoint embeddings (L2 ranking), all candidates reranked,
    top k; the chunk that answers each question comes first."""
    from test_rag import ARTICLES, QUESTIONS

    from workflow_scripts import qa_eval

    cfg = validate_config({"evaluation": {"rag": {
        "chunk_size": 220, "top_k": 1, "candidates": 6, "retrievers": ["embedding"], "retriever": "embedding",
        "embedding_endpoint": {"base_url": server + "/v1", "model": "emb"},
        "rerank": {"enabled": True, "base_url": server, "model": "rr"}}}})["evaluation"]["rag"]
    chunks = rag.chunk_articles(ARTICLES, 220, 0)
    arts = {a["uid"]: a for a in ARTICLES}
    queries = [qa_eval.render_question(q, arts[q["article_uid"]], False, "\n\n") for q in QUESTIONS]
    rankings = rag.retrieve(chunks, queries, cfg)
    assert set(rankings) == {"embedding", "reranked"}
    for q, ranking, cands in zip(QUESTIONS, rankings["reranked"], rankings["embedding"]):
        assert sorted(ranking) == sorted(cands[:6])               # the same candidates, reordered
        assert q["needle"] in chunks[ranking[0]]["text"]
    reranks = [c for c in StandIn.calls if c["path"] == "/v1/rerank"]
    assert len(reranks) == len(QUESTIONS) and all(len(c["body"]["documents"]) == 6 for c in reranks)
    assert reranks[0]["body"]["query"] == queries[0]              # the query is the rendered question
