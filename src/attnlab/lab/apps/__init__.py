"""Applications: attention mechanisms from other fields (trajectory forecasting, clinical series, gaze scanpaths,
recommendation, image restoration) as small models built on registered layers, each with a synthetic task that
exercises the paper's claim (``attnlab app train|compare NAME``, ``attnlab ls apps``; docs/apps.md).

Every public module of this package is imported on the first lookup (one application per file; ``base``,
``host``, ``metrics``, ``results`` and ``train`` hold the machinery), so adding an application never edits this
file. Plug-ins register through the ``attnlab.apps`` entry-point group and must subclass
:class:`attnlab.lab.apps.base.App`.
"""

from __future__ import annotations

from attnlab.registry import Registry

APPS: Registry[type] = Registry("app", base="attnlab.lab.apps.base.App", package=__name__,
                                infrastructure=("base", "host", "metrics", "results", "train"), group="attnlab.apps")

__all__ = ["APPS"]
