"""Probes: observers of attention. ``PROBES`` names them; ``attnlab ls probes`` lists them.

Every public module of this package except the infrastructure (``base``, ``model_base``) is imported on the first
lookup, so ``import attnlab.probes`` stays cheap and adding a probe never edits this file (the recipe:
:mod:`attnlab.registry`). Plug-ins register through the ``attnlab.probes`` entry-point group.
"""

from __future__ import annotations

from attnlab.registry import Registry

PROBES: Registry[type] = Registry("probe", base="attnlab.probes.base.Probe", package=__name__,
                                  infrastructure=("base", "model_base"), group="attnlab.probes")

DEFAULT_PROBES = ("entropy", "sink", "distance", "norms")

__all__ = ["PROBES", "DEFAULT_PROBES"]
