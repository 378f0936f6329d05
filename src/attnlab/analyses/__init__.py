"""Analyses: model-level diagnostics that drive the model themselves (gradients, ablations, a second model).

An attention *probe* (:mod:`attnlab.probes`) observes attention calls inside a :class:`attnlab.Session`; an
*analysis* runs its own forward/backward passes through a runner (:class:`attnlab.analyses.base.Runner`).
``ANALYSES`` names them; ``attnlab ls probes`` lists both kinds, and ``attnlab probe --probe NAME`` runs either.
"""

from __future__ import annotations

import importlib
import pkgutil

from attnlab.registry import Registry


def _load_builtins() -> None:
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_") and module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


ANALYSES: Registry[type] = Registry("analysis", loader=_load_builtins)

__all__ = ["ANALYSES"]
