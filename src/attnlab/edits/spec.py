"""Edit specs: the ``NAME:key=value,...`` strings of the CLI and YAML configs.

Grammar: ``name`` or ``name:key=value,key=value``. Values are read as int, then float, then ``true``/``false``,
else kept as strings. Lists (``layers``, ``heads``, ``sink_positions``) join items with ``+`` and allow inclusive
ranges with ``-``: ``layers=0-3+7`` is layers 0, 1, 2, 3, 7. Several edits compose with ``+`` between specs only in
the CLI's ``--edit`` (see ``parse_edit_list``); here one spec is one edit.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from attnlab.edits import EDITS
from attnlab.edits.base import Edit
from attnlab.errors import ConfigError

LIST_PARAMS = ("layers", "heads", "sink_positions")


def _parse_scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def _parse_index_list(key: str, text: str) -> list[int]:
    values: list[int] = []
    for item in text.split("+"):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not match:
            raise ConfigError(f"{key} must be integers joined by '+' with optional ranges like 0-3, got {text!r}")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if high < low:
            raise ConfigError(f"{key}: range {item!r} is empty (expected low-high with low <= high)")
        values.extend(range(low, high + 1))
    return values


def parse_edit_spec(spec: str) -> Edit:
    """``"sink_window:sinks=4,window=252"`` → an Edit instance.

    Raises:
        RegistryError: unknown edit name (with a suggestion). ConfigError: malformed spec, unknown parameter
            (the message lists the edit's parameters) or a value out of range.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"an edit spec looks like NAME or NAME:key=value,...; got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    cls = EDITS.get(name.strip())
    kwargs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, text = part.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"edit {name!r}: expected key=value, got {part!r} in {spec!r}")
        kwargs[key] = _parse_index_list(key, text) if key in LIST_PARAMS else _parse_scalar(text.strip())
    return build_edit(cls, kwargs)


def build_edit(cls: type, kwargs: dict[str, Any]) -> Edit:
    """``cls(**kwargs)`` with a one-line ConfigError naming the accepted parameters on an unknown one."""
    signature = inspect.signature(cls.__init__)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    known = [p for p in signature.parameters if p not in ("self", "selection", "mask_params")]
    known += [p for p in ("layers", "heads") if p not in known]
    if not (accepts_any and cls.name == "mask"):
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise ConfigError(f"edit {cls.name!r} has no parameter {', '.join(unknown)}; "
                              f"it takes: {', '.join(known)}")
    return cls(**kwargs)


def parse_edit_list(text: str) -> list[Edit]:
    """``"temperature:tau=0.9+sink_window:sinks=4,window=252"`` → edits composed in one variant.

    A ``+`` starts a new edit when the text after it is a name followed by ``:`` or the end (``+head_scale``,
    ``+sink_window:...``); otherwise it continues a list value (``layers=0+3``). Unknown names then reach the
    registry's did-you-mean error.
    """
    pieces: list[str] = []
    for chunk in text.split("+"):
        starts_edit = re.fullmatch(r"\s*[A-Za-z_]\w*\s*(:.*)?", chunk, flags=re.DOTALL) is not None
        if pieces and not starts_edit:
            pieces[-1] += "+" + chunk
        else:
            pieces.append(chunk)
    return [parse_edit_spec(piece) for piece in pieces]
