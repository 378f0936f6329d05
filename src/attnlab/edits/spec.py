"""Edit specs: the ``NAME:key=value,...`` strings of the CLI and YAML configs.

Grammar: ``name`` or ``name:key=value,key=value``. Each value is read by the edit constructor's annotation
(:mod:`attnlab.params`): ints, floats (finite, normal), bools (``true``/``false``), choices, and index lists
(``layers``, ``heads``, ``sink_positions``: :data:`attnlab.params.IndexList`) that join items with ``+`` and allow
inclusive ranges with ``-``: ``layers=0-3+7`` is layers 0, 1, 2, 3, 7. A typed ``**kwargs``
(:class:`attnlab.params.Forward`, the ``mask`` edit) passes the other keys on to the callable it names. Several
edits compose with ``+`` between specs only in the CLI's ``--edit`` (see ``parse_edit_list``); here one spec is
one edit.
"""

from __future__ import annotations

import re
from typing import Any

from attnlab.edits import EDITS
from attnlab.edits.base import Edit
from attnlab.params import coerce_arguments, parse_spec


def parse_edit_spec(spec: str) -> Edit:
    """``"sink_window:sinks=4,window=252"`` → an Edit instance.

    Raises:
        RegistryError: unknown edit name (with a suggestion). ConfigError: malformed spec, unknown parameter
            (the message lists the edit's parameters), a key given twice, or a value that does not fit its
            annotation.
    """
    name, kwargs = parse_spec(spec, "edit")
    cls = EDITS.get(name)
    return build_edit(cls, kwargs)


def build_edit(cls: type, kwargs: dict[str, Any]) -> Edit:
    """``cls(**kwargs)`` with text or typed values coerced by the constructor's annotations.

    ``steps`` (every edit's denoising-step schedule, :meth:`Edit.at_steps`) is set after construction.

    Raises ConfigError (one line) naming the accepted parameters on an unknown one, or the bounds on a bad value.
    """
    kwargs = dict(kwargs)
    steps = kwargs.pop("steps", None)  # every edit's schedule (Edit.at_steps), not a constructor parameter
    return cls(**coerce_arguments(cls, kwargs, owner=f"edit {cls.name!r}")).at_steps(steps)


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
