"""Probes: observers of attention. ``PROBES`` names them; ``attnlab ls probes`` lists them with the analyses
(:mod:`attnlab.analyses`, model-level diagnostics that drive the model themselves).

Built-in probes are imported on the first lookup so ``import attnlab.probes`` stays cheap.
"""

from __future__ import annotations

import importlib

from attnlab.registry import Registry

_BUILTIN_MODULES = ("entropy", "sink", "distance", "norms", "massive_activations", "magnets", "rope_decay",
                    "spatial_decay")


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"attnlab.probes.{module}")


PROBES: Registry[type] = Registry("probe", loader=_load_builtins)

DEFAULT_PROBES = ("entropy", "sink", "distance", "norms")

__all__ = ["PROBES", "DEFAULT_PROBES"]
