"""The interactive attention-pattern viewer of the report: ``results["patterns"]`` → the ``patterns`` section.

The section lists the pattern tokens as spans and carries the weights in a ``<script type="application/json"
id="pattern-data">`` block; ``templates/viewer.js`` (inline, allowed by the page's Content-Security-Policy through
the SHA-256 hash of its exact text, see :func:`script_hash`) colours the tokens when one is clicked or hovered.
Without JavaScript the tokens are still listed. Pure: reads only its arguments and the script file.

Format of ``results["patterns"]`` (docs/results.md): ``window`` (int), ``tokens`` (2 ≤ n ≤ 256 strings, the bounds
of ``--pattern-tokens``: :data:`attnlab.config.PATTERN_TOKENS_RANGE`), ``causal`` (bool), ``selection``
(``"auto"``/``"explicit"``), ``heads`` (≤ :data:`attnlab.config.MAX_PATTERN_HEADS`
dicts ``{"layer", "head", "label", "probs"}``; ``probs`` row i = the weights query i puts on keys 0..len-1, of length
i+1 when causal, n otherwise; floats (probabilities, rounded to 4 d.p.) or null).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attnlab.config import MAX_PATTERN_HEADS, PATTERN_TOKENS_RANGE
from attnlab.errors import ConfigError
from attnlab.report.formatting import token_segments, visible_token

__all__ = ["SCALE", "check_patterns", "script_hash", "token_title", "viewer_page", "viewer_payload", "viewer_script",
           "viewer_section"]

SCALE = 10_000
"""Weights travel to the page as integers in units of 1/SCALE (the 4 decimal places of results.json), which keeps
the page about half the size of float text; the script divides them back."""

_SCRIPT = Path(__file__).parent / "templates" / "viewer.js"


@functools.lru_cache(maxsize=1)
def viewer_script() -> str:
    """The viewer's JavaScript, exactly as inlined into the page (the text its CSP hash is taken of)."""
    text = _SCRIPT.read_text(encoding="utf-8")
    if "</" in text or "<!--" in text:  # could end or confuse the <script> element it is inlined into
        raise AssertionError(f"{_SCRIPT.name} must not contain '</' or '<!--'")
    return text


def script_hash(script: str) -> str:
    """The CSP source of an inline script: ``'sha256-<base64 of SHA-256 of its UTF-8 text>'`` (quotes included)."""
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def _bad(message: str) -> ConfigError:
    return ConfigError(f"results 'patterns': {message}")


def check_patterns(patterns: Any) -> None:
    """Raise ConfigError (one line) unless ``patterns`` has the format of the module docstring.

    Checks the types (``causal`` a real bool when given, default true), the bounds (1..:data:`MAX_PATTERN_HEADS`
    heads, :data:`PATTERN_TOKENS_RANGE` tokens) and every row's length (i+1 for query i when causal, n otherwise);
    values must be finite numbers in [0, 1] or null.
    """
    if not isinstance(patterns, Mapping):
        raise _bad(f"expected an object, got {type(patterns).__name__}")
    tokens, heads = patterns.get("tokens"), patterns.get("heads")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise _bad("'tokens' must be a list of strings")
    low, high = PATTERN_TOKENS_RANGE
    if not low <= len(tokens) <= high:
        raise _bad(f"{len(tokens)} tokens; expected {low}..{high}")
    if not isinstance(heads, list) or not 1 <= len(heads) <= MAX_PATTERN_HEADS:
        raise _bad(f"'heads' must be a list of 1..{MAX_PATTERN_HEADS} heads")
    causal = patterns.get("causal", True)
    if not isinstance(causal, bool):
        raise _bad(f"'causal' must be true or false, got {causal!r}")
    n = len(tokens)
    for number, head in enumerate(heads):
        where = f"heads[{number}]"
        if not isinstance(head, Mapping):
            raise _bad(f"{where} is a {type(head).__name__}, expected an object")
        for key in ("layer", "head"):
            if isinstance(head.get(key), bool) or not isinstance(head.get(key), int) or head[key] < 0:
                raise _bad(f"{where}.{key} must be a non-negative integer, got {head.get(key)!r}")
        probs = head.get("probs")
        if not isinstance(probs, list) or len(probs) != n:
            raise _bad(f"{where}.probs must have one row per token ({n})")
        for query, row in enumerate(probs):
            width = query + 1 if causal else n
            if not isinstance(row, list) or len(row) != width:
                raise _bad(f"{where}.probs[{query}] must be a list of {width} weights "
                           f"({'keys 0..query, causal' if causal else 'every key'})")
            for value in row:
                if value is None:
                    continue
                if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                        or not -1e-6 <= value <= 1 + 1e-6):
                    raise _bad(f"{where}.probs[{query}] holds {value!r}; expected weights in [0, 1] or null")


def token_title(position: int, token: str) -> str:
    """A token span's tooltip, ``position 3 · 'tok'`` (the text viewer.js restores when nothing is chosen)."""
    return f"position {position} · '{visible_token(token)}'"


def viewer_payload(patterns: Mapping[str, Any]) -> str:
    """The page's data block: JSON safe to place between ``<script type="application/json">`` tags.

    ``{"tokens": [visible token strings], "causal": bool, "scale": SCALE, "heads": [{"layer", "head", "label",
    "w": rows of integer weights in 1/SCALE units or null}]}``. ``<``, ``>`` and ``&`` are written as ``\\u003c``,
    ``\\u003e``, ``\\u0026`` so no token can close the element (JSON.parse reads them back unchanged).
    """
    data = {
        "tokens": [visible_token(token) for token in patterns["tokens"]],
        "causal": patterns.get("causal", True),
        "scale": SCALE,
        "heads": [{"layer": head["layer"], "head": head["head"], "label": str(head.get("label") or ""),
                   "w": [[None if v is None else round(v * SCALE) for v in row] for row in head["probs"]]}
                  for head in patterns["heads"]],
    }
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


def viewer_section(results: Mapping[str, Any]) -> dict[str, Any] | None:
    """Template context of the ``patterns`` section, or None when ``results`` has no ``patterns``.

    Keys: ``window``, ``causal``, ``selection``, ``count`` (tokens), ``heads`` (option labels), ``tokens`` (display
    segments and titles of each span), ``data`` (:func:`viewer_payload`), ``script`` (:func:`viewer_script`) and
    ``hash`` (its CSP source). Raises ConfigError if ``patterns`` is malformed (:func:`check_patterns`).
    """
    patterns = results.get("patterns")
    if patterns is None:
        return None
    check_patterns(patterns)
    script = viewer_script()
    heads = []
    for head in patterns["heads"]:
        text = f"layer {head['layer']} · head {head['head']}"
        heads.append(f"{text} — {head['label']}" if head.get("label") else text)
    return {
        "window": patterns.get("window", 0),  # None: not from a run's windows (a standalone page)
        "causal": patterns.get("causal", True),
        "selection": str(patterns.get("selection") or ""),
        "count": len(patterns["tokens"]),
        "heads": heads,
        "tokens": [{"segments": token_segments(token), "title": token_title(pos, token)}
                   for pos, token in enumerate(patterns["tokens"])],
        "data": viewer_payload(patterns),
        "script": script,
        "hash": script_hash(script),
    }


def viewer_page(patterns: Mapping[str, Any], title: str = "attnlab attention pattern") -> str:
    """A self-contained HTML page holding only the viewer (inline CSS and the viewer's script, allowed by the
    page's Content-Security-Policy through its hash; no network): ``patterns`` in the format of the module
    docstring (``window`` None: the caption names no window). Raises ConfigError as :func:`check_patterns`."""
    from attnlab.report.render import template_environment  # render imports this module

    section = viewer_section({"patterns": patterns})
    return template_environment().get_template("viewer_page.html.j2").render(title=title, patterns=section)
