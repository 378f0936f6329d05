"""Edits: training-free changes to attention, one per file. ``EDITS`` names them; ``attnlab ls edits`` lists them.

Every module in this package that registers with ``EDITS`` is imported on the first lookup, so
``import attnlab.edits`` stays cheap and adding an edit never edits this file.
"""

from __future__ import annotations

import importlib
import pkgutil

from attnlab.registry import Registry


def _load_builtins() -> None:
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_") and module.name not in ("base", "apply", "spec"):
            importlib.import_module(f"{__name__}.{module.name}")


EDITS: Registry[type] = Registry("edit", loader=_load_builtins)


def parse_edit_spec(spec: str):  # noqa: ANN201 - re-exported from attnlab.edits.spec
    """``"NAME:key=value,..."`` → an Edit (see :mod:`attnlab.edits.spec`)."""
    from attnlab.edits.spec import parse_edit_spec as parse

    return parse(spec)


def parse_edit_list(text: str):  # noqa: ANN201
    """``"a:x=1+b:y=2"`` → the edits of one variant, composed (see :mod:`attnlab.edits.spec`)."""
    from attnlab.edits.spec import parse_edit_list as parse

    return parse(text)


__all__ = ["EDITS", "parse_edit_spec", "parse_edit_list"]
