"""The strategy-prompt family (method `strategies`): seven fixed learning strategies applied to each whole article.

In the spirit of SPA (Tang et al., "Synthetic data via strategy prompts", arXiv 2603.22213): instead of entity
graphs, a small set of fixed prompts, each asking for the article re-expressed through one way of studying it -
key concepts, a mind map, implications, questions and answers with reasoning, case studies, a discussion, a
teacher's explanation. SPA's own prompts carry no licence and are not used: the seven templates
workflow_scripts/prompts/strategy_*.txt were written for this project. As in SPA, a training document is the
article title, a newline, then the completion; the corpus stage renders it so (corpus.document_format, default
`{title}\\n{text}` for this method), while the synthesis records keep the bare completion.
"""

from __future__ import annotations

from .synth_framework import TemplateMethod

STRATEGIES = ("key_concepts", "mind_map", "implications", "qa_reasoning", "case_studies", "discussion", "teacher")


class Strategies(TemplateMethod):
    """`synthesis.strategies`: which strategies (default all seven), texts per strategy and article, length limit."""

    def __init__(self, name: str, cfg: dict) -> None:
        sc = cfg["synthesis"]["strategies"]
        super().__init__(name, cfg, [f"strategy_{s}" for s in sc["strategies"]], sc["repeats"], sc["max_new_tokens"])
