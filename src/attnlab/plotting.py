"""One attention pattern as a heatmap: query rows × key columns, token strings on the ticks.

Built on :class:`matplotlib.figure.Figure` (no pyplot, no global state), from numpy-convertible arrays, so this
module imports no torch: pass a tensor and it goes through ``numpy.asarray`` (CPU tensors convert directly).

    pattern = attnlab.attention_pattern(model, "the cat sat on the mat", layers=3, heads=1, tokenizer=tokenizer)
    figure = pattern.plot(3, 1)                          # or attnlab.plot_pattern(pattern.get(3, 1), tokens)
    figure.savefig("pattern.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from attnlab.errors import ConfigError

__all__ = ["plot_pattern"]


def _label(token: str, width: int = 12) -> str:
    shown = repr(token)[1:-1] if token.strip() != token or not token else token  # make spaces and newlines visible
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def plot_pattern(probs: Any, tokens: Sequence[str] | None = None, *, ax: Any = None, title: str | None = None,
                 max_tokens: int = 64) -> Figure:
    """Draw one head's attention weights as a heatmap and return its Figure.

    Args:
        probs: (q_len, kv_len) array-like of weights (a CPU tensor, numpy array or nested lists); row i = query i,
            column j = key j; the queries are the last q_len keys' tokens.
        tokens: kv_len token strings, or None for index ticks.
        ax: a matplotlib Axes to draw into (its figure is returned); None makes a new ``Figure`` (no pyplot).
        title: the axes title (None: no title).
        max_tokens: draw at most the first ``max_tokens`` keys and the queries among them (≥ 1).

    Returns:
        the matplotlib Figure holding the heatmap (colour = weight, from 0 to max(1, largest weight)).

    Raises:
        ConfigError: probs is not 2-D, tokens do not match kv_len, or max_tokens < 1.
    """
    matrix = np.asarray(probs, dtype=np.float64)
    if matrix.ndim != 2:
        raise ConfigError(f"probs must be 2-D (q_len, kv_len), got shape {matrix.shape}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ConfigError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    q_len, kv_len = matrix.shape
    if tokens is not None and len(tokens) != kv_len:
        raise ConfigError(f"expected {kv_len} tokens (one per key), got {len(tokens)}")
    keys = min(kv_len, max_tokens)
    offset = kv_len - q_len  # query i is token offset + i
    first_query = max(0, -offset)
    queries = [i for i in range(first_query, q_len) if offset + i < keys]
    matrix = matrix[queries][:, :keys] if queries else np.zeros((0, keys))
    labels = [_label(t) for t in tokens[:keys]] if tokens is not None else [str(j) for j in range(keys)]
    size = min(9.0, 2.5 + 0.16 * keys)
    if ax is None:
        figure = Figure(figsize=(size + 1.2, size), dpi=110, layout="constrained")
        ax = figure.add_subplot()
    else:
        figure = ax.figure
    top = max(1.0, float(np.nanmax(matrix))) if matrix.size else 1.0  # probs: 0 … 1
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=top, aspect="auto", interpolation="nearest")
    figure.colorbar(image, ax=ax, label="attention weight")
    ax.set_xticks(range(keys), labels=labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(queries)), labels=[labels[offset + i] for i in queries], fontsize=7)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title)
    return figure
