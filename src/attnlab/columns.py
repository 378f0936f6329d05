"""Names shared by every tier: the results schema version and the long-format result columns."""

SCHEMA_VERSION = 1
"""Version of ``results.json`` this attnlab writes and the newest it reads."""

RESULT_COLUMNS: tuple[str, ...] = ("probe", "statistic", "layer", "head", "position", "value")
"""Columns of ``results.csv`` and of ``Session.results()``, in order (docs/results.md)."""
