"""Probes: observers of attention. ``PROBES`` names them; ``attnlab ls probes`` lists them with the analyses
(:mod:`attnlab.analyses`, model-level diagnostics that drive the model themselves).

Every public module of this package except the infrastructure (``base``) is imported on the first
lookup, so ``import attnlab.probes`` stays cheap and adding a probe never edits this file (the recipe:
:mod:`attnlab.registry`). Plug-ins register through the ``attnlab.probes`` entry-point group.
"""

from __future__ import annotations

from attnlab.registry import Registry

PROBES: Registry[type] = Registry("probe", base="attnlab.probes.base.Probe", package=__name__,
                                  infrastructure=("base",), group="attnlab.probes")

DEFAULT_PROBES = ("entropy", "sink", "distance", "norms")

__all__ = ["PROBES", "DEFAULT_PROBES"]
