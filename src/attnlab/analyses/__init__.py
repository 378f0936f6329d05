"""Analyses: model-level diagnostics that drive the model themselves (gradients, ablations, a second model).

An attention *probe* (:mod:`attnlab.probes`) observes attention calls inside a :class:`attnlab.Session`; an
*analysis* runs its own forward/backward passes through a runner (:class:`attnlab.analyses.base.Runner`).
``ANALYSES`` names them; ``attnlab ls probes`` lists both kinds, and ``attnlab probe --probe NAME`` runs either.
"""

from __future__ import annotations

from attnlab.errors import RegistryError
from attnlab.registry import Registry, unknown_name_message

ANALYSES: Registry[type] = Registry("analysis", base="attnlab.analyses.base.Analysis", package=__name__,
                                   infrastructure=("base",), group="attnlab.analyses")


def probe_or_analysis(name: str) -> type:
    """The probe class named ``name``, else the analysis class (``attnlab probe --probe NAME`` takes either).

    Raises:
        RegistryError: neither registry has the name (the message suggests the nearest name of both).
    """
    from attnlab.probes import PROBES

    if name in PROBES:
        return PROBES.get(name)
    if name in ANALYSES:
        return ANALYSES.get(name)
    raise RegistryError(unknown_name_message("probe or analysis", name, PROBES.names() + ANALYSES.names()))


__all__ = ["ANALYSES", "probe_or_analysis"]
