"""Layers: drop-in attention mechanisms as ``nn.Module``s over ``functional/``. ``attnlab ls layers`` lists them.

Every public module of this package is imported on the first lookup (one mechanism per file; helpers are
``_private``; ``base`` holds the protocol), so ``import attnlab.layers`` stays cheap and adding a mechanism never
edits this file (the recipe: :mod:`attnlab.registry`). Every entry, plug-ins included, must subclass
:class:`attnlab.layers.base.Layer`, so it gets the protocol's ``from_config`` and checks. Plug-ins register through
the ``attnlab.layers`` entry-point group.
"""

from __future__ import annotations

from attnlab.registry import Registry

LAYERS: Registry[type] = Registry("layer", base="attnlab.layers.base.Layer", package=__name__,
                                  infrastructure=("base",), group="attnlab.layers")

__all__ = ["LAYERS"]
