"""Tasks: seeded, deterministic data generators for lab models (``mqar``, ``bigram_backcopy``, ``passkey``, ``lm``).

Every public module of this package is imported on the first lookup (one task per file; ``base`` holds the
:class:`~attnlab.lab.tasks.base.Task` protocol), so adding a task never edits this file (the recipe:
:mod:`attnlab.registry`). Plug-ins register through the ``attnlab.tasks`` entry-point group and must subclass
``Task``. ``TASKS.get("mqar")(vocab_size=256)`` builds one; its ``batch(step, batch_size, split=...)`` gives
``{"input_ids", "labels"}`` with labels aligned to positions (``labels[t]`` is the target predicted at ``t``).
"""

from __future__ import annotations

from attnlab.registry import Registry

TASKS: Registry[type] = Registry("task", base="attnlab.lab.tasks.base.Task", package=__name__,
                                 infrastructure=("base",), group="attnlab.tasks")

__all__ = ["TASKS"]
