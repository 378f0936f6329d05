"""Analyses: model-level diagnostics that drive the model themselves (gradients, ablations, a second model).

An attention *probe* (:mod:`attnlab.probes`) observes attention calls inside a :class:`attnlab.Session`; an
*analysis* runs its own forward/backward passes through a runner (:class:`attnlab.analyses.base.Runner`).
``ANALYSES`` names them; ``attnlab ls probes`` lists both kinds, and ``attnlab probe --probe NAME`` runs either.
"""

from __future__ import annotations

from attnlab.registry import Registry

ANALYSES: Registry[type] = Registry("analysis", base="attnlab.analyses.base.Analysis", package=__name__,
                                   infrastructure=("base",), group="attnlab.analyses")

__all__ = ["ANALYSES"]
