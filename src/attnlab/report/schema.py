"""The versioned results schema (see ``docs/results.md``): version number, CSV columns and a small validator.

The validator is deliberately shallow: it checks what :func:`attnlab.report.io.load_results` and
:func:`attnlab.report.render.render_html` rely on (the version, the top-level keys and the shape of ``rows``) and
leaves the per-probe content to the probes that write it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attnlab.columns import RESULT_COLUMNS, SCHEMA_VERSION, V1_COLUMNS
from attnlab.errors import ConfigError

__all__ = ["CSV_COLUMNS", "INDEX_COLUMNS", "REQUIRED_KEYS", "REQUIRED_ROW_COLUMNS", "SCHEMA_VERSION",
           "check_schema_version", "validate_results"]

CSV_COLUMNS = RESULT_COLUMNS
"""Columns of ``results.csv`` (and keys of each entry of ``results["rows"]``), in order."""

REQUIRED_ROW_COLUMNS: tuple[str, ...] = V1_COLUMNS
"""Keys every row must have; ``variant`` may be absent (read as None: a probe row)."""

INDEX_COLUMNS: tuple[str, ...] = ("layer", "head", "position")
"""The nullable integer columns of ``results.csv``."""

REQUIRED_KEYS: tuple[str, ...] = ("schema_version", "command", "model", "rows")
"""Top-level keys every results dict must have. The others in ``docs/results.md`` are optional for readers."""


def check_schema_version(version: Any, *, source: str = "results") -> None:
    """Raise ConfigError unless ``version`` is an integer in ``1..SCHEMA_VERSION``.

    ``source`` names the file or object in the message, e.g. ``"runs/a/results.json"``.
    """
    if version is None:
        raise ConfigError(f"{source} has no schema_version; it was not written by attnlab")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConfigError(f"{source} has schema_version={version!r}; expected an integer")
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"{source} has schema_version={version}, newer than the {SCHEMA_VERSION} this attnlab reads; "
            "upgrade attnlab"
        )
    if version < 1:
        raise ConfigError(f"{source} has schema_version={version}; expected 1..{SCHEMA_VERSION}")


def validate_results(results: Any, *, source: str = "results") -> None:
    """Check that ``results`` looks like a results dict of a readable schema version; raise ConfigError if not.

    Checks: it is a mapping; it has every key of :data:`REQUIRED_KEYS`; ``schema_version`` is readable;
    ``model`` is a mapping; ``rows`` is a list of mappings that each have every column of
    :data:`REQUIRED_ROW_COLUMNS`; ``sections``, when present, is a mapping of lists.
    Messages are one line and name ``source``.
    """
    if not isinstance(results, Mapping):
        raise ConfigError(f"{source} is a {type(results).__name__}, expected a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in results]
    if "schema_version" in missing:
        check_schema_version(None, source=source)
    check_schema_version(results["schema_version"], source=source)
    if missing:
        raise ConfigError(f"{source} is missing top-level key(s): {', '.join(missing)}")
    if not isinstance(results["model"], Mapping):
        raise ConfigError(f"{source}: 'model' is a {type(results['model']).__name__}, expected an object")
    rows = results["rows"]
    if not isinstance(rows, list):
        raise ConfigError(f"{source}: 'rows' is a {type(rows).__name__}, expected a list")
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ConfigError(f"{source}: rows[{index}] is a {type(row).__name__}, expected an object")
        absent = [column for column in REQUIRED_ROW_COLUMNS if column not in row]
        if absent:
            raise ConfigError(f"{source}: rows[{index}] is missing column(s): {', '.join(absent)}")
    sections = results.get("sections")
    if sections is not None and not (isinstance(sections, Mapping)
                                     and all(isinstance(specs, list) for specs in sections.values())):
        raise ConfigError(f"{source}: 'sections' must be an object of lists (probe -> section specs)")
