"""The synthesis framework: what a synthesis method is made of, apart from the runner that executes methods.

- prompts: the user message that shows an article (`render_document`, `user_message`) and prompt versions
  (`prompt_version`); templates are read by workflow_scripts/templates.py;
- tasks and record ids: a `Task` is one planned text, `record_id` its stable id (`request_seed`, `sampling_key`);
- methods: the `Method` base class, `TemplateMethod` (a method made of template files; `rephrase` and `qa` are
  two), and the registry (`get_method`, `method_needs_entities`): built-ins plus the families the config
  declares under `synthesis.families`;
- the engine interface: which engine and generator a run uses (`backend_factory`, `generator_name`) and the
  config hash of every record (`generation_hash`).

Methods (workflow_scripts/entigraph.py, strategies.py, a user's class) import this module only; the runner
(workflow_scripts/synthesis.py: jobs, shards, resume, ledgers, the command line) imports it and the methods,
so the imports have no circle. A new method is one class or template file plus a config entry (docs/synthesis.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .config import config_hash
from .estimates import Estimate, article_requests
from .io_utils import InputError, iter_jsonl, stable_hash
from .job_keys import shaping_part
from .quality import author_first_last
from .templates import load_template, template_path

# How an article is shown to the generator (the user message). Part of every prompt version: changing it
# changes the prompt versions, hence the record ids, so old records are never mixed with new ones.
USER_FORMAT = ('### Document Content:\n"{title}", {author First Last}, {year}.\n {text}'
               '[\n### Entities:\n- {entity}...]')

BUILTIN_METHODS = {
    "entigraph": "workflow_scripts.entigraph:EntiGraph",
    "rephrase": "workflow_scripts.synth_framework:Rephrase",
    "qa": "workflow_scripts.synth_framework:QAFormat",
    "strategies": "workflow_scripts.strategies:Strategies",  # seven strategy prompts in the spirit of SPA
}


# ------------------------------------------------------------------------------------------------ prompts
def prompt_version(system_text: str) -> str:
    """Version hash of a prompt: the system text and the user-message format (recorded in every record)."""
    return stable_hash("prompt", USER_FORMAT, system_text, n=12)


def render_document(article: dict) -> str:
    """`"{title}", {author as First Last}, {year}.\\n {text}` as the reference implementation shows an article.

    User corpora may lack an author or a year: the missing part is left out with its comma
    (`"{title}", {year}.`, `"{title}", {author}.` or `"{title}".`), never printed as "None".
    """
    title = str(article.get("title") or article.get("uid") or "").strip()
    head = [f'"{title}"']
    author = author_first_last(article.get("author"))
    if author:
        head.append(author)
    year = article.get("year")
    if year not in (None, ""):
        head.append(str(year))
    return ", ".join(head) + ".\n " + str(article["text"])


def user_message(article: dict, entities: Iterable[str] = ()) -> str:
    """The user message: the document (reference `### Document Content:` block), then for relation prompts an
    `### Entities:` list with one `- {entity}` per line. The reference builds this in an indented f-string whose
    indentation ends up in the prompt; that whitespace is an artefact and is left out here."""
    msg = "### Document Content:\n" + render_document(article)
    entities = list(entities)
    if entities:
        msg += "\n### Entities:\n" + "\n".join(f"- {e}" for e in entities)
    return msg


# ------------------------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class Task:
    """One planned text of a method for one article: a generation request, or (with `fixed`) a record whose text
    already exists (the EntiGraph summary comes from the extraction call)."""

    kind: str
    template: str
    system: str
    user: str
    prompt_version: str
    entities: tuple[str, ...] = ()
    repeat: int = 0
    max_new_tokens: int | None = None  # None: synthesis.sampling.max_new_tokens
    fixed: dict | None = field(default=None, compare=False)


def template_task(kind: str, template: str, article: dict, entities: Iterable[str] = (), repeat: int = 0,
                  max_new_tokens: int | None = None) -> Task:
    system = load_template(template)
    return Task(kind=kind, template=template, system=system, user=user_message(article, entities),
                prompt_version=prompt_version(system), entities=tuple(entities), repeat=repeat,
                max_new_tokens=max_new_tokens)


def request_seed(base_seed: int, article_uid: str, kind: str, entities: Iterable[str], repeat: int) -> int:
    """A per-request sampling seed (32 bits), derived from the config seed: independent of run order."""
    return int(stable_hash(base_seed, article_uid, kind, list(entities), repeat, n=8), 16)


def sampling_key(sampling: dict, max_new_tokens: int) -> list:
    return [sampling["temperature"], sampling["top_p"], int(max_new_tokens)]


def record_id(article_uid: str, prompt_ver: str, entities: Iterable[str], model: str, seed: int,
              sampling: list) -> str:
    """Stable id of a generated text: article, prompt version, entity tuple, model, sampling seed (+ the sampling
    settings, so that a text made with other temperature or length limits is a different record)."""
    return stable_hash(article_uid, prompt_ver, list(entities), model, seed, sampling, n=20)


# ------------------------------------------------------------------------------------------------ methods
class Method:
    """A prompt family. Subclasses set `needs_entities` and implement `plan`; `settings` is the part of the
    config that defines the method's texts (hashed into every record's config_hash)."""

    needs_entities = False

    def __init__(self, name: str, cfg: dict) -> None:
        self.name = name
        self.cfg = cfg

    def settings(self) -> dict:
        return {}

    def max_new_tokens(self) -> int:
        return int(self.cfg["synthesis"]["sampling"]["max_new_tokens"])

    def plan(self, article: dict, entities_doc: dict | None) -> list[Task]:
        raise NotImplementedError

    def estimate(self, article_tokens: list[float], n_entities: list[int],
                 prompt_tokens: Callable[[str], float]) -> list[Estimate] | None:
        """The planner's estimate of this method's requests: (item, {requests, prompt, cached, completion},
        note) per kind of request, from each article's tokens and entity count; `prompt_tokens(template)` is a
        system prompt's length. None: the method has no request model (the planner says it is not priced)."""
        return None


class TemplateMethod(Method):
    """System-prompt templates applied to each article, `repeats` times each (rephrase, qa, user families).
    Order: repeat-major, so a cut-off corpus stays balanced across templates."""

    def __init__(self, name: str, cfg: dict, templates: list[str], repeats: int,
                 max_new_tokens: int | None = None) -> None:
        super().__init__(name, cfg)
        if not templates:
            raise InputError(f"synthesis method {name!r}: no templates configured")
        self.templates = list(templates)
        self.repeats = int(repeats)
        self._max_new = max_new_tokens
        for t in self.templates:
            template_path(t)  # fail early, naming the missing file

    def settings(self) -> dict:
        return {"templates": {t: prompt_version(load_template(t)) for t in self.templates},
                "repeats": self.repeats, "max_new_tokens": self._max_new}

    def max_new_tokens(self) -> int:
        return int(self._max_new) if self._max_new else super().max_new_tokens()

    @staticmethod
    def kind_of(template: str) -> str:
        return Path(template).stem.replace("_", "-")

    def plan(self, article: dict, entities_doc: dict | None) -> list[Task]:
        return [template_task(self.kind_of(t), t, article, repeat=r, max_new_tokens=self.max_new_tokens())
                for r in range(self.repeats) for t in self.templates]

    def estimate(self, article_tokens: list[float], n_entities: list[int],
                 prompt_tokens: Callable[[str], float]) -> list[Estimate] | None:
        """`repeats` rewrites of every article per template; each template with the article is a cached prefix."""
        assume = self.cfg["planner"]["assume"]
        mean = assume["rephrase_completion_tokens"]
        new = float(mean if mean is not None else self.max_new_tokens())
        total = {"requests": 0.0, "prompt": 0.0, "cached": 0.0, "completion": 0.0}
        for t in self.templates:
            g = article_requests([self.repeats] * len(article_tokens), article_tokens,
                                 prompt_tokens(t) + float(assume["prompt_overhead_tokens"]), 0.0, new)
            total = {k: total[k] + g[k] for k in total}
        return [("rewrites", total, f"{len(self.templates)} templates x {self.repeats} repeats per article")]


class Rephrase(TemplateMethod):
    """The Rephrase baseline (paper Appendix H.2): easy / medium / hard styles, `rephrase.repeats` each."""

    def __init__(self, name: str, cfg: dict) -> None:
        rc = cfg["synthesis"]["rephrase"]
        super().__init__(name, cfg, [f"rephrase_{s}" for s in rc["styles"]], rc["repeats"], rc["max_new_tokens"])


class QAFormat(TemplateMethod):
    """The QA-format baseline (paper Appendix E): the article rewritten as question-answer pairs."""

    def __init__(self, name: str, cfg: dict) -> None:
        qc = cfg["synthesis"]["qa"]
        super().__init__(name, cfg, ["qa"], qc["repeats"], qc["max_new_tokens"])


def _load_object(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not attr:
        raise InputError(f"{path!r}: expected 'package.module:Name'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise InputError(f"cannot load {path!r} ({e})") from None


def get_method(name: str, cfg: dict) -> Method:
    """The method `name`: a family declared in synthesis.families (templates or a class), else a built-in."""
    families = cfg["synthesis"].get("families") or {}
    if name in families:
        spec = families[name]
        if spec.get("module"):
            return _load_object(spec["module"])(name, cfg)
        return TemplateMethod(name, cfg, spec.get("templates") or [], spec.get("repeats", 1),
                              spec.get("max_new_tokens"))
    if name in BUILTIN_METHODS:
        return _load_object(BUILTIN_METHODS[name])(name, cfg)
    raise InputError(f"unknown synthesis method {name!r}; built-in: {', '.join(BUILTIN_METHODS)}; "
                     "declare new ones under synthesis.families (docs/synthesis.md)")


def method_needs_entities(name: str, cfg: dict) -> bool:
    """Whether `name` reads the EntiGraph entity files (the rules add them as inputs)."""
    families = cfg["synthesis"].get("families") or {}
    if name in families:
        spec = families[name]
        return bool(spec.get("needs_entities")) or bool(
            spec.get("module") and getattr(_load_object(spec["module"]), "needs_entities", False))
    return name == "entigraph"


# ------------------------------------------------------------------------------------------------ engines
def generator_name(cfg: dict) -> str:
    """The generator's name as recorded in records and ids (the API model for the openai backend)."""
    backend = cfg["synthesis"]["backend"]
    settings = (cfg.get("backends") or {}).get(backend) or {}
    if backend in ("openai", "openai_batch") and settings.get("model"):
        return str(settings["model"])
    return str(cfg["models"]["generator"]["name"])


def backend_settings(cfg: dict) -> dict:
    """Engine settings (config `backends.<engine>`) plus the generator model."""
    from .backends import engine_settings
    from .models import model_location

    settings = engine_settings(cfg, cfg["synthesis"]["backend"])
    settings.setdefault("model", model_location(cfg["models"]["generator"]))
    return settings


def backend_factory(cfg: dict, engine: str | None = None) -> Callable[[], Any]:
    """A function that builds the engine on first need (a fully cached run never loads the model). `engine`
    ('package.module:Class') plugs in an engine that is not in backends/ (and the tests' fakes)."""

    def make() -> Any:
        if engine:
            return _load_object(engine)(**backend_settings(cfg))
        from .backends import get_backend

        return get_backend(cfg["synthesis"]["backend"], backend_settings(cfg))

    return make


def generation_hash(cfg: dict, method: Method | None = None) -> str:
    """config_hash of a record: everything that shapes its text (generator, engine, sampling, the method)."""
    backend = cfg["synthesis"]["backend"]
    return config_hash({"generator": cfg["models"]["generator"], "backend": backend,
                        "backend_settings": shaping_part(cfg, f"backends.{backend}") or {},
                        "sampling": cfg["synthesis"]["sampling"],
                        "method": method.settings() if method else None})


# ------------------------------------------------------------------------------------------------ records
def default_work_path(output: str | Path) -> Path:
    output = Path(output)
    return output.parent / "work" / output.name


def read_work_shard(path: Path) -> dict[str, dict]:
    """Records of a working shard by id (a last line cut off by a kill is ignored)."""
    if not path.exists():
        return {}
    return {rec["id"]: rec for _, rec in iter_jsonl(path, allow_truncated_tail=True)}
