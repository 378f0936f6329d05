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
        if not module.name.startswith("_") and module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


EDITS: Registry[type] = Registry("edit", loader=_load_builtins)

__all__ = ["EDITS"]
