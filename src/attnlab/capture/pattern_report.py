"""The report viewer's data: which heads to show and the results.json ``"patterns"`` object (docs/patterns.md).

:func:`report_patterns` runs :func:`attnlab.capture.patterns.attention_pattern` on the first window's first
``pattern_tokens`` tokens and keeps the heads named by ``--pattern-heads`` (or picked by :func:`pick_heads`);
:mod:`attnlab.report.viewer` draws the result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from attnlab.capture.patterns import AttentionPattern, attention_pattern
from attnlab.config import MAX_PATTERN_HEADS, PATTERN_TOKENS_RANGE, parse_pattern_heads
from attnlab.errors import UnsupportedModelError
from attnlab.facts import ModelFacts
from attnlab.params import check_indices
from attnlab.stats.entropy import normalised_entropy, row_entropy

__all__ = ["SINK_EPSILON", "check_pattern_heads", "head_scores", "pattern_json", "pick_heads", "report_patterns"]

logger = logging.getLogger(__name__)

SINK_EPSILON = 0.3
"""α₀ at or above which a head counts as a sink (the sink probe's ε, Gu et al.)."""


def check_pattern_heads(facts: ModelFacts, pattern_heads: str) -> tuple[tuple[int, int], ...] | None:
    """The explicit ``(layer, head)`` pairs of ``pattern_heads`` checked against the model (None for auto/none).

    Raises ConfigError ``"pattern_heads: layer must be in 0..N-1, got 40"`` (or head)."""
    pairs = parse_pattern_heads(pattern_heads)
    for layer, head in pairs or ():
        check_indices("pattern_heads: layer", layer, facts.num_layers)
        check_indices("pattern_heads: head", head, facts.num_heads)
    return pairs


def head_scores(pattern: AttentionPattern) -> tuple[Tensor, Tensor]:
    """``(alpha0, entropy)`` (layers_sel, heads_sel) float64 of batch row 0's real tokens: mean weight on key 0
    over query rows ≥ 1, and mean normalised entropy (row entropy / log(keys the row may see)) over rows ≥ 1."""
    query_valid, key_valid = pattern.real(0)
    probs = pattern.probs[0][:, :, query_valid][..., key_valid].double()  # (L, H, n_q, n_k)
    n_q, n_k = probs.shape[-2:]
    rows = probs[:, :, 1:] if n_q > 1 else probs
    alpha0 = rows[..., 0].mean(dim=-1)
    first = n_k - n_q + (1 if n_q > 1 else 0)  # real-token position of the first row used
    seen = torch.arange(first, n_k) + 1 if pattern.causal else torch.full((rows.shape[2],), n_k)
    entropy = normalised_entropy(row_entropy(rows), seen)  # NaN for a row that sees one key (a 1-token pattern)
    return alpha0, entropy.mean(dim=-1)


def pick_heads(pattern: AttentionPattern, count: int = 4) -> list[tuple[int, int, str]]:
    """``(layer, head, label)`` of at most ``2 · count`` heads: up to ``count`` sinks, the heads with the largest
    mean α₀ among those with α₀ ≥ :data:`SINK_EPSILON` (``"sink α₀=0.93"``), then the remaining slots filled
    by the lowest mean normalised entropy among the other, non-sink heads (``"entropy 0.12"``: 0 = all weight on
    one key, 1 = uniform). A model without sinks (BERT) gets only low-entropy heads; on models with many dormant
    heads the sharpest heads are sinks too, and the viewer would otherwise show the same all-on-key-0 pattern eight
    times."""
    alpha0, entropy = (score.reshape(-1) for score in head_scores(pattern))
    num_heads = len(pattern.heads)

    def pair(flat: int) -> tuple[int, int]:
        return pattern.layers[flat // num_heads], pattern.heads[flat % num_heads]

    picked = [(*pair(flat), f"sink α₀={alpha0[flat]:.2f}")
              for flat in torch.argsort(alpha0, descending=True, stable=True)[:count].tolist()
              if float(alpha0[flat]) >= SINK_EPSILON]
    slots = 2 * count - len(picked)
    for flat in torch.argsort(entropy, stable=True).tolist():
        if slots == 0:
            break
        if float(alpha0[flat]) < SINK_EPSILON and math.isfinite(float(entropy[flat])):
            picked.append((*pair(flat), f"entropy {entropy[flat]:.2f}"))
            slots -= 1
    return picked


def pattern_json(pattern: AttentionPattern, chosen: Sequence[tuple[int, int, str]], selection: str,
                 batch: int = 0) -> dict[str, Any]:
    """The results.json ``"patterns"`` object (docs/patterns.md) for batch row ``batch`` of ``pattern`` (its real
    tokens; ``tokens`` is [] without a tokenizer). ConfigError for a layer/head/batch that was not recorded."""
    heads = []
    for layer, head, label in chosen[:MAX_PATTERN_HEADS]:
        matrix = pattern.get(layer, head, batch).tolist()
        offset = len(matrix[0]) - len(matrix) if matrix else 0
        rows = [[round(w, 4) for w in (row[: offset + i + 1] if pattern.causal else row)]
                for i, row in enumerate(matrix)]
        heads.append({"layer": layer, "head": head, "label": label, "probs": rows})
    return {"window": 0, "tokens": pattern.tokens_of(batch) or [], "causal": pattern.causal, "selection": selection,
            "heads": heads}


def report_patterns(loaded: Any, windows: Any, pattern_heads: str, pattern_tokens: int,
                    block_size: int = 128) -> dict[str, Any] | None:
    """The report viewer's ``"patterns"`` object: the first ``pattern_tokens`` tokens of the first window, run
    alone in one extra forward pass (all heads for ``"auto"``, then the chosen ones kept; only the named heads for
    ``"L.H,..."``); None for ``"none"``, a window shorter than 2 tokens, or a model the Session refuses (logged).
    A first window shorter than ``pattern_tokens`` (``--seq-len`` below ``--pattern-tokens``) caps it, with one
    warning line.

    Args:
        loaded: a LoadedModel. windows: an :class:`attnlab.text.Windows` (``windows.windows[0]["ids"]``).
        pattern_heads: ``"auto"`` | ``"none"`` | ``"L.H,L.H"``. pattern_tokens: at most this many tokens.
        block_size: query rows per block of the eager kernel (the run's ``block_size``).

    Raises:
        ConfigError: an explicit head outside the model (checked first).
    """
    pairs = check_pattern_heads(loaded.facts, pattern_heads)
    if pattern_heads == "none" or not windows.windows:
        return None
    ids = windows.windows[0]["ids"][:pattern_tokens]
    if len(ids) < PATTERN_TOKENS_RANGE[0]:
        logger.warning("no attention patterns for the report viewer: the first window has %d token(s)", len(ids))
        return None
    if len(ids) < pattern_tokens:
        logger.warning("pattern_tokens %d capped at %d: the first window has %d tokens (--seq-len)",
                       pattern_tokens, len(ids), len(ids))
    layers = None if pairs is None else sorted({layer for layer, _ in pairs})
    heads = None if pairs is None else sorted({head for _, head in pairs})
    try:
        pattern = attention_pattern(loaded, torch.tensor([ids], dtype=torch.long), layers=layers, heads=heads,
                                    block_size=block_size)
    except UnsupportedModelError as error:
        logger.warning("no attention patterns for the report viewer: %s", error)
        return None
    if pairs is None:
        return pattern_json(pattern, pick_heads(pattern), "auto")
    return pattern_json(pattern, [(layer, head, "") for layer, head in pairs], "explicit")
