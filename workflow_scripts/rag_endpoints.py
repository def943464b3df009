"""HTTP clients of the RAG baseline's optional services (docs/evaluation.md, "RAG as the authors ran it").

- `EndpointEmbedder`: embeddings from any OpenAI-compatible `POST {base_url}/embeddings` (OpenAI, vLLM's
  `--task embed`, a local llama.cpp or text-embeddings-inference server). The authors embedded with OpenAI's
  text-embedding-3-large (inference/retrieval.py get_cached_langchain_embedding_model).
- `EndpointReranker`: any rerank endpoint of the Cohere / Jina / vLLM shape: `POST {base_url}{path}` with
  `{model, query, documents, top_n}`, answering `{results: [{index, relevance_score}, ...]}`. The authors reranked
  all 128 retrieved chunks with Cohere's rerank-english-v3.0 (inference/retrieval.py rerank_with_cohere) and took
  the top k by score.

Keys come from the environment variable a config names (never logged or written). Transient failures (connection
errors, 429, 5xx) are retried with exponential backoff; anything else stops with one line naming the endpoint.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

from .io_utils import InputError

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def _post_json(url: str, body: dict, key_env: str | None, timeout_s: float, retries: int = 5,
               backoff_s: float = 1.0) -> Any:
    """POST a JSON body and return the decoded JSON answer (retrying transient failures)."""
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(key_env) if key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode("utf-8")
    last = ""
    for attempt in range(retries + 1):
        req = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:200]
            if e.code not in RETRY_STATUS:
                hint = f"; is {key_env} set?" if e.code in (401, 403) and key_env else ""
                raise InputError(f"{url}: HTTP {e.code} {detail!r}{hint}") from None
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            last = str(getattr(e, "reason", e))
        except json.JSONDecodeError:
            raise InputError(f"{url}: the answer is not JSON") from None
        if attempt < retries:
            time.sleep(backoff_s * 2 ** attempt)
    raise InputError(f"{url}: no answer after {retries + 1} tries ({last}); check the endpoint (base_url)")


class EndpointEmbedder:
    """Embeddings of an OpenAI-compatible /embeddings endpoint, requested `batch_size` texts at a time."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, batch_size: int = 128,
                 timeout_s: float = 120.0) -> None:
        self.url = base_url.rstrip("/") + "/embeddings"
        self.model, self.key_env, self.batch_size, self.timeout_s = model, api_key_env, batch_size, timeout_s

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out: list[list[float]] = []
        for i in range(0, len(texts), self.batch_size):
            batch = list(texts[i:i + self.batch_size])
            ans = _post_json(self.url, {"model": self.model, "input": batch}, self.key_env, self.timeout_s)
            try:
                rows = sorted(ans["data"], key=lambda d: d["index"])
                vecs = [list(map(float, d["embedding"])) for d in rows]
            except (KeyError, TypeError, ValueError):
                raise InputError(f"{self.url}: expected {{data: [{{index, embedding}}]}}, got {str(ans)[:120]!r}") \
                    from None
            if len(vecs) != len(batch):
                raise InputError(f"{self.url}: {len(vecs)} embeddings for {len(batch)} inputs")
            out.extend(vecs)
        return out


class EndpointReranker:
    """Relevance scores of a Cohere/Jina/vLLM-style rerank endpoint: one request per query, every candidate
    scored (top_n = all, as the authors left it unset)."""

    def __init__(self, base_url: str, model: str, path: str = "/v1/rerank", api_key_env: str | None = None,
                 timeout_s: float = 120.0) -> None:
        self.url = base_url.rstrip("/") + "/" + path.lstrip("/")
        self.model, self.key_env, self.timeout_s = model, api_key_env, timeout_s

    def scores(self, query: str, documents: Sequence[str]) -> list[float]:
        """One score per document, in the documents' order (higher is more relevant)."""
        if not documents:
            return []
        ans = _post_json(self.url, {"model": self.model, "query": query, "documents": list(documents),
                                    "top_n": len(documents)}, self.key_env, self.timeout_s)
        scores: list[float | None] = [None] * len(documents)
        try:
            for r in ans["results"]:
                scores[int(r["index"])] = float(r["relevance_score"])
        except (KeyError, TypeError, ValueError, IndexError):
            raise InputError(f"{self.url}: expected {{results: [{{index, relevance_score}}]}}, got "
                             f"{str(ans)[:120]!r}") from None
        if any(x is None for x in scores):
            raise InputError(f"{self.url}: scores for {sum(x is not None for x in scores)} of {len(documents)} "
                             "documents")
        return [float(x) for x in scores]  # type: ignore[arg-type]


def rerank_order(scores: Sequence[float]) -> list[int]:
    """Candidate positions sorted by rerank score, highest first, ties in retrieval order (the authors'
    RetrievalAndRerankResults.get_rerank_results_for_top_k: a stable sort on the score, reversed)."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])
