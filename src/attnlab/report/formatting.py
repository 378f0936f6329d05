"""Display helpers of the report: tokens shown visibly, numbers for tables, layer ranges, attention paths.

Pure functions of their arguments (HTML escaping is left to the Jinja2 template, which autoescapes).
"""

from __future__ import annotations

import math
import unicodedata
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

_MARKERS = {"\n": "↵", "\t": "→"}


def token_segments(token: str) -> list[tuple[str, bool]]:
    """Split ``token`` into ``(text, is_marker)`` pieces for display.

    Newline becomes ``↵``, tab ``→``, other control characters ``\\x`` + two hex digits (C0/C1) and invisible
    format or unassigned characters ``\\u`` + four hex digits (e.g. bidi overrides); those pieces have
    ``is_marker=True``. The empty token is ``∅``. HTML escaping is left to the template.
    """
    if token == "":
        return [("∅", True)]
    segments: list[tuple[str, bool]] = []
    for char in token:
        if char in _MARKERS:
            piece, marker = _MARKERS[char], True
        elif unicodedata.category(char) == "Cc":
            piece, marker = f"\\x{ord(char):02x}", True
        elif unicodedata.category(char) in ("Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            piece, marker = f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}", True
        else:
            piece, marker = char, False
        if segments and segments[-1][1] == marker:
            segments[-1] = (segments[-1][0] + piece, marker)
        else:
            segments.append((piece, marker))
    return segments


def visible_token(token: Any) -> str:
    """``token`` as one plain string with the markers of :func:`token_segments` (still to be HTML-escaped)."""
    return "".join(text for text, _ in token_segments(str(token)))


def format_number(value: Any) -> str:
    """Numbers for tables: ``—`` for missing/NaN, integers as is, floats with 3 significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}"


def layer_ranges(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0–2, 5, 7–8"``."""
    layers = sorted(set(layers))
    parts: list[str] = []
    start = prev = None
    for layer in [*layers, None]:
        if layer is not None and prev is not None and layer == prev + 1:
            prev = layer
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}–{prev}")
        start = prev = layer
    return ", ".join(parts)


def summarise_paths(paths: Mapping[str, Any]) -> list[str]:
    """``{"0": "blocked_eager", "1": "blocked_eager"}`` → ``["blocked_eager: layers 0–1"]``."""
    groups: dict[str, list[int]] = defaultdict(list)
    for layer, path in paths.items():
        try:
            groups[str(path)].append(int(layer))
        except (TypeError, ValueError):
            continue
    return [f"{path}: layer{'s' if len(ls) > 1 else ''} {layer_ranges(ls)}" for path, ls in sorted(groups.items())]
