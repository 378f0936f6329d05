"""Layers: drop-in attention mechanisms as ``nn.Module``s over ``functional/``. ``attnlab ls layers`` lists them.

Every public module of this package is imported on the first lookup (one mechanism per file; helpers are
``_private``), so ``import attnlab.layers`` stays cheap and adding a mechanism never edits this file (the recipe:
:mod:`attnlab.registry`). Plug-ins register through the ``attnlab.layers`` entry-point group.
"""

from __future__ import annotations

from attnlab.registry import Registry

LAYERS: Registry[type] = Registry("layer", base="torch.nn.Module", package=__name__, group="attnlab.layers")

__all__ = ["LAYERS"]
