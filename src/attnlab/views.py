"""Standalone views of Python results: the report's attention-pattern viewer for one :class:`AttentionPattern`.

    import attnlab
    pattern = attnlab.attention_pattern(loaded, "To be, or not to be", layers=[3, 5])
    attnlab.pattern_html(pattern, heads=[(3, 1), (5, 0)], path="pattern.html")   # open it in a browser

A top-tier module like :mod:`attnlab.pipeline`: it joins capture (the data, :func:`pattern_json`) and report (the
page, :func:`attnlab.report.viewer.viewer_page`), which do not import each other.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from attnlab.capture.pattern_report import pattern_json
from attnlab.capture.patterns import AttentionPattern
from attnlab.config import MAX_PATTERN_HEADS, PATTERN_TOKENS_RANGE, parse_pattern_heads
from attnlab.errors import ConfigError
from attnlab.io_utils import atomic_write_text
from attnlab.report.viewer import viewer_page

__all__ = ["pattern_html"]


def _pairs(pattern: AttentionPattern, heads: Any) -> list[tuple[int, int]]:
    if heads is None:
        return [(layer, head) for layer in pattern.layers for head in pattern.heads]
    if isinstance(heads, str):
        return list(parse_pattern_heads(heads) or ())
    pairs = []
    for pair in heads if isinstance(heads, Iterable) else [heads]:
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair)):
            raise ConfigError(f"heads must be (layer, head) pairs such as [(3, 1), (5, 0)] or '3.1,5.0', "
                              f"got {pair!r}")
        pairs.append((pair[0], pair[1]))
    return pairs


def pattern_html(pattern: AttentionPattern, heads: Any = None, batch: int = 0,
                 path: str | os.PathLike[str] | None = None) -> str:
    """The report's interactive attention viewer for ``pattern`` as one self-contained HTML page (inline CSS and
    script, allowed by the page's Content-Security-Policy hash; nothing is fetched, it works from ``file://``).

    Args:
        pattern: an :class:`attnlab.AttentionPattern` (:func:`attnlab.attention_pattern`).
        heads: None for every recorded (layer, head) pair, or the pairs to show: ``[(3, 1), (5, 0)]`` or
            ``"3.1,5.0"`` (in that order).
        batch: the batch row shown (its real tokens; padding dropped).
        path: if given, the page is also written there atomically (a missing folder is created).

    Returns:
        the page's HTML text. In Jupyter, ``IPython.display.HTML(attnlab.pattern_html(p))`` shows it where the
        notebook allows scripts; a file opened in a browser always works.

    Raises:
        ConfigError (one line): more than 16 heads (pick some with ``heads=``), fewer than 2 or more than 256 real
        tokens, a head/layer/batch not recorded, or a folder that cannot be written.
    """
    pairs = _pairs(pattern, heads)
    if not 1 <= len(pairs) <= MAX_PATTERN_HEADS:
        raise ConfigError(f"pattern_html shows 1..{MAX_PATTERN_HEADS} heads, got {len(pairs)}: "
                          f"choose some with heads=[(layer, head), ...]")
    count = int(pattern.real(batch)[1].sum())
    low, high = PATTERN_TOKENS_RANGE
    if not low <= count <= high:
        raise ConfigError(f"pattern_html shows {low}..{high} tokens, batch row {batch} has {count}: "
                          f"run attention_pattern on {'more' if count < low else 'fewer'} tokens")
    payload = pattern_json(pattern, [(layer, head, "") for layer, head in pairs], "explicit", batch=batch)
    payload["window"] = None
    if not payload["tokens"]:  # recorded without a tokenizer: positions stand in
        payload["tokens"] = [f"#{position}" for position in range(count)]
    page = viewer_page(payload, title=f"attnlab attention pattern: {len(pairs)} head{'s' * (len(pairs) != 1)}, "
                                      f"{count} tokens")
    if path is not None:
        atomic_write_text(path, page)
    return page
