"""Layers: drop-in attention mechanisms as ``nn.Module``s over ``functional/``. ``attnlab ls layers`` lists them.

Every module in this package that registers with ``LAYERS`` is imported on the first lookup (one mechanism per
file), so ``import attnlab.layers`` stays cheap and adding a mechanism never edits this file.
"""

from __future__ import annotations

import importlib
import pkgutil

from attnlab.registry import Registry


def _load_builtins() -> None:
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


LAYERS: Registry[type] = Registry("layer", loader=_load_builtins)

__all__ = ["LAYERS"]
