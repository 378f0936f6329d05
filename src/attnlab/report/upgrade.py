"""Bring a results dict to the current schema (docs/results.md) without modifying it.

Schema 1 → 2: each eval row's ``probe`` ``"task@variant"`` becomes ``probe="task", variant="variant"``; other rows
get ``variant=None``. Every version: rows are put in the column order of ``results.csv`` (``variant`` filled with
None where absent), and a probe that ran (it has rows or extras) but has no entry in ``results["sections"]`` gets
the sections its registered class declares today (``attnlab.probes.PROBES`` or ``attnlab.analyses.ANALYSES``);
a name registered nowhere (eval tasks, searches) gets no section.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attnlab.columns import RESULT_COLUMNS, SCHEMA_VERSION
from attnlab.report.schema import validate_results
from attnlab.report.sections import section_specs

__all__ = ["declared_sections", "normalise_rows", "split_probe", "upgrade_results"]


def split_probe(probe: str) -> tuple[str, str | None]:
    """Schema 1's eval ``probe``: ``"perplexity@baseline"`` → ``("perplexity", "baseline")``; a probe without ``@``
    → ``(probe, None)``. Edit specs never contain ``@``, so the first ``@`` separates the two."""
    task, sep, variant = str(probe).partition("@")
    return (task, variant) if sep else (task, None)


def normalise_rows(rows: list[Mapping[str, Any]], *, split_variant: bool = False) -> list[dict[str, Any]]:
    """Rows as dicts with the columns of ``results.csv`` in order (extra keys kept after them).

    ``split_variant`` (schema 1): a ``probe`` holding ``"task@variant"`` is split into probe and variant.
    """
    out = []
    for row in rows:
        probe, variant = row["probe"], row.get("variant")
        if split_variant and "variant" not in row:
            probe, variant = split_probe(probe)
        fixed = {**row, "probe": probe, "variant": variant}
        out.append({**{column: fixed[column] for column in RESULT_COLUMNS}, **fixed})
    return out


def declared_sections(names: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Section dicts of the registered probes/analyses among ``names``; unregistered names are left out."""
    from attnlab.analyses import ANALYSES
    from attnlab.probes import PROBES

    found = [registry.get(name) for name in names for registry in (PROBES, ANALYSES) if name in registry]
    return section_specs(found)


def upgrade_results(results: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``results`` at :data:`SCHEMA_VERSION`, ready to render; ConfigError if it is invalid.

    ``schema_version`` becomes the current one; a converted file keeps its version in ``upgraded_from``.
    """
    validate_results(results)
    version = results["schema_version"]
    upgraded = dict(results)
    upgraded["rows"] = normalise_rows(results["rows"], split_variant=version < 2)
    if version < SCHEMA_VERSION:
        upgraded["schema_version"] = SCHEMA_VERSION
        upgraded["upgraded_from"] = version
    sections = dict(results.get("sections") or {})
    extras = results.get("extras") or {}
    ran = dict.fromkeys([str(row["probe"]) for row in upgraded["rows"]] + [k for k, v in extras.items() if v])
    missing = [name for name in ran if name not in sections]
    if missing:
        sections.update(declared_sections(missing))
    upgraded["sections"] = sections
    return upgraded
