"""Evaluation: perplexity, next-token accuracy, passkey retrieval and multiple choice for a model and its variants.

``attnlab eval`` is a thin wrapper around :func:`run_eval`; the searches (ZeroTuning's γ, ACT's heads) are in
:mod:`attnlab.evaluation.search`. Names are re-exported lazily so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvalConfig": "attnlab.evaluation.config",
    "EvalSpec": "attnlab.evaluation.config",
    "TASKS": "attnlab.evaluation.config",
    "run_eval": "attnlab.evaluation.runner",
    "evaluate_variants": "attnlab.evaluation.runner",
    "plan_windows": "attnlab.evaluation.lm_tasks",
    "score_tokens": "attnlab.evaluation.lm_tasks",
    "build_prompt": "attnlab.evaluation.passkey",
    "ChoiceItem": "attnlab.evaluation.choice",
    "load_choice_items": "attnlab.evaluation.choice",
    "score_choices": "attnlab.evaluation.choice",
    "CHOICE_TASKS": "attnlab.evaluation.choice_tasks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'attnlab.evaluation' has no attribute {name!r}")
