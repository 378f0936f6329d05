"""Dependencies point one way (STYLE.md rule 1): pure math never imports transformers, the CLI or the report."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "attnlab"

# package -> module prefixes it must not import
FORBIDDEN = {
    "functional": ("transformers", "attnlab.capture", "attnlab.probes", "attnlab.cli", "attnlab.report",
                   "attnlab.pipeline"),
    "stats": ("transformers", "attnlab.capture", "attnlab.probes", "attnlab.cli", "attnlab.report", "attnlab.pipeline"),
    "probes": ("transformers", "attnlab.capture", "attnlab.cli", "attnlab.report", "attnlab.pipeline"),
    "capture": ("attnlab.cli", "attnlab.report", "attnlab.pipeline"),
    "report": ("transformers", "torch", "attnlab.capture", "attnlab.cli", "attnlab.pipeline"),
}

ALLOWED = {"attnlab.report.sections"}  # pure section specs that probes and analyses declare (no torch, no matplotlib)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package):
    offenders = []
    for path in sorted((SRC / package).rglob("*.py")):
        for name in _imports(path):
            if name not in ALLOWED and any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[package]):
                offenders.append(f"{path.relative_to(SRC)} imports {name}")
    assert not offenders, offenders


def test_text_and_assets_do_not_import_transformers():
    for name in ("text.py", "assets.py"):
        assert not any(n.startswith("transformers") for n in _imports(SRC / name)), name


def test_no_module_over_600_lines():
    long = [f"{p.relative_to(SRC)}: {n}" for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600]
    assert not long, long
