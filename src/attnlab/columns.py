"""Names shared by every tier: the results schema version and the long-format result columns."""

SCHEMA_VERSION = 2
"""Version of ``results.json`` this attnlab writes and the newest it reads (1 is converted on load)."""

RESULT_COLUMNS: tuple[str, ...] = ("probe", "variant", "statistic", "layer", "head", "position", "value")
"""Columns of ``results.csv`` and of ``Session.results()``, in order (docs/results.md). ``variant`` names the eval
variant (``baseline`` or the edit spec) of an eval row and is None (empty) for probe rows."""

V1_COLUMNS: tuple[str, ...] = ("probe", "statistic", "layer", "head", "position", "value")
"""Columns of schema version 1 (no ``variant``; eval rows named it in ``probe`` as ``task@variant``)."""

STEP_COLUMN = "step"
"""Optional last column of ``results.csv``: the training step of a row written by ``attnlab train`` (integer). It is
present only when some row has a step; other runs' files keep exactly :data:`RESULT_COLUMNS`."""

DENOISING_STEP_COLUMN = "denoising_step"
"""Optional column of ``results.csv``: the denoising step (0-based) of a row measured inside a diffusion model
(:class:`attnlab.diffusion.DiffusionSession`); present only when some row has one. ``step`` stays the training step."""
