"""attnlab: study and change attention in transformer models.

The public API is re-exported lazily so ``import attnlab`` does not import torch or transformers::

    import attnlab
    model, tokenizer = attnlab.load_model("smollm2-135m")  # a LoadedModel (model, tokenizer, facts) unpacks so
    windows = attnlab.load_text(tokenizer, seq_len=512, max_windows=4)
    with attnlab.Session(model, probes=["entropy", "sink", "distance", "norms"]) as session:
        for batch in windows:
            model(**batch)
    table = session.results()
    pattern = attnlab.attention_pattern(model, "To be, or not to be", layers=3, tokenizer=tokenizer)
    figure = pattern.plot(3, 0)   # attnlab.plot_pattern: a matplotlib Figure
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "attnlab.capture.loading",
    "LoadedModel": "attnlab.capture.loading",
    "ModelFacts": "attnlab.facts",
    "RunConfig": "attnlab.config",
    "run_probes": "attnlab.pipeline",
    "load_text": "attnlab.text",
    "Session": "attnlab.capture.session",
    "attention_pattern": "attnlab.capture.patterns",
    "AttentionPattern": "attnlab.capture.patterns",
    "PatternProbe": "attnlab.capture.patterns",
    "plot_pattern": "attnlab.plotting",
    "pattern_html": "attnlab.views",
    "record_head_outputs": "attnlab.capture.head_record",
    "record_head_means": "attnlab.capture.head_record",
    "PROBES": "attnlab.probes",
    "fetch_asset": "attnlab.assets",
    "ASSETS": "attnlab.assets",
    "TokenRoles": "attnlab.roles",
    "given_roles": "attnlab.roles",
    "carve": "attnlab.protocols.carve",
    "CarveResult": "attnlab.protocols.carve",
    "calibrate_vhr": "attnlab.protocols.vhr",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'attnlab' has no attribute {name!r}")
