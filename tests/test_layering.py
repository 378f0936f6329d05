"""Dependencies point one way (STYLE.md rule 1): pure math never imports transformers, the CLI or the report."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "attnlab"

# package -> module prefixes it must not import (attnlab.pipeline and attnlab.views are top-tier modules: they join
# capture and report, and only the CLI and users import them)
FORBIDDEN = {
    "functional": ("transformers", "attnlab.capture", "attnlab.probes", "attnlab.cli", "attnlab.report",
                   "attnlab.pipeline", "attnlab.views"),
    "stats": ("transformers", "attnlab.capture", "attnlab.probes", "attnlab.cli", "attnlab.report", "attnlab.pipeline",
              "attnlab.views"),
    "probes": ("transformers", "attnlab.capture", "attnlab.cli", "attnlab.report", "attnlab.pipeline", "attnlab.views"),
    "capture": ("attnlab.cli", "attnlab.report", "attnlab.pipeline", "attnlab.views"),
    # diffusers models under the session: the tier of capture (probes, edits and analyses they use sit below)
    "diffusion": ("attnlab.cli", "attnlab.report", "attnlab.pipeline", "attnlab.views"),
    "report": ("transformers", "torch", "attnlab.capture", "attnlab.cli", "attnlab.pipeline", "attnlab.views"),
    "edits": ("transformers", "attnlab.capture", "attnlab.analyses", "attnlab.layers", "attnlab.cli",
              "attnlab.report", "attnlab.pipeline", "attnlab.views"),
    "layers": ("transformers", "attnlab.capture", "attnlab.probes", "attnlab.edits", "attnlab.analyses",
               "attnlab.cli", "attnlab.report", "attnlab.pipeline", "attnlab.views"),
    "analyses": ("transformers", "attnlab.capture", "attnlab.cli", "attnlab.report", "attnlab.pipeline",
                 "attnlab.views"),
    # the lab builds transformers models from layers and runs them under capture; it sits below config/pipeline/cli
    "lab": ("attnlab.cli", "attnlab.report", "attnlab.pipeline", "attnlab.views"),
    # protocols and circuits sit at the tier of evaluation: they run models through capture and the pipeline
    "evaluation": ("attnlab.cli", "attnlab.views", "attnlab.protocols", "attnlab.circuits", "attnlab.integrations"),
    "protocols": ("attnlab.cli", "attnlab.views", "attnlab.integrations"),
    "circuits": ("attnlab.cli", "attnlab.views", "attnlab.protocols", "attnlab.integrations"),
    # adapters for other tools (lm-eval) sit at the tier of evaluation too
    "integrations": ("attnlab.cli", "attnlab.views", "attnlab.protocols", "attnlab.circuits"),
}
for _below in ("functional", "stats", "probes", "edits", "layers", "analyses"):  # the tiers under diffusion/
    FORBIDDEN[_below] += ("attnlab.diffusion",)

ALLOWED = {"attnlab.report.sections"}  # pure section specs that probes and analyses declare (no torch, no matplotlib)
# per package: leaf modules it may import although their package is forbidden to it
ALLOWED_FOR: dict[str, set[str]] = {}
# top-level leaf modules any tier may import: of attnlab they import only the errors, and neither torch nor transformers
LEAVES = {"attnlab.plotting"}  # plot_pattern (numpy + matplotlib): AttentionPattern.plot draws with it


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
            if name not in ALLOWED | ALLOWED_FOR.get(package, set()) and any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[package]):
                offenders.append(f"{path.relative_to(SRC)} imports {name}")
    assert not offenders, offenders


def test_allowed_leaf_modules_import_no_attnlab_module():
    """What ALLOWED/ALLOWED_FOR let through is a leaf: of attnlab it imports only the errors, so no forbidden tier
    comes in behind it."""
    for name in ALLOWED | set().union(set(), *ALLOWED_FOR.values()) | LEAVES:
        path = SRC.parent / (name.replace(".", "/") + ".py")
        assert {n for n in _imports(path) if n.startswith("attnlab")} <= {"attnlab.errors"}, name


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_leaf_modules_import_no_torch_or_transformers(name):
    path = SRC.parent / (name.replace(".", "/") + ".py")
    assert not {n for n in _imports(path) if n.split(".")[0] in ("torch", "transformers")}, name


def test_text_and_assets_do_not_import_transformers():
    for name in ("text.py", "assets.py"):
        assert not any(n.startswith("transformers") for n in _imports(SRC / name)), name


def test_no_module_over_600_lines():
    long = [f"{p.relative_to(SRC)}: {n}" for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600]
    assert not long, long


def _module_name(path: Path) -> str:
    parts = ["attnlab", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def _import_time_nodes(tree: ast.Module):
    """Import statements run when the module is imported: not inside functions, not under ``if TYPE_CHECKING``."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        pending.extend(ast.iter_child_nodes(node))


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def _edges(module: str) -> set[str]:
    """attnlab modules that ``module`` imports at import time (``from pkg import sub`` counts as ``pkg.sub``)."""
    targets = set()
    for node in _import_time_nodes(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        source = _resolve(module, node)
        targets.add(source)
        targets.update(f"{source}.{alias.name}" for alias in node.names)
    return {name for name in targets if name in MODULES and name != module}


def test_no_import_cycles():
    """No cycle among attnlab modules through their import-time (module-level) imports.

    Imports inside functions are deliberate lazy imports and do not count; neither does a package ``__init__``
    being run before its submodule (``import attnlab.x.y`` is an edge to ``attnlab.x.y`` only).
    """
    graph = {module: _edges(module) for module in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def _private_module_offence(importer: str, target: str) -> str | None:
    """Why importing ``target`` from ``importer`` breaks the private-module rule, or None."""
    parts = target.split(".")
    package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
    for index, part in enumerate(parts):
        holder = ".".join(parts[:index])
        if part.startswith("_") and not part.startswith("__") and not (package + ".").startswith(holder + "."):
            return f"{importer} imports {target}, a private module of {holder}"
    return None


def _private_import_offences(module: str) -> list[str]:
    offences = []
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):  # lazy imports count too
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names if alias.name.startswith("attnlab")]
        elif isinstance(node, ast.ImportFrom) and _resolve(module, node).startswith("attnlab"):
            source = _resolve(module, node)
            targets = [source]
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    targets.append(f"{source}.{alias.name}")
                elif alias.name.startswith("_") and not alias.name.startswith("__") and source != module:
                    offences.append(f"{module} imports private name {alias.name} from {source}")
        else:
            continue
        offences += [why for target in targets if (why := _private_module_offence(module, target))]
    return offences


def test_no_module_imports_another_modules_private_names():
    """No attnlab module imports another module's private names. The rule:

    - a private *name* (``_helper``) is used only in the module that defines it: ``from attnlab.x import _y`` is
      an offence anywhere but in ``attnlab.x`` itself (make the name public, or move the code);
    - a private *submodule* (``attnlab.edits._move``, ``attnlab.layers._common``) is an implementation detail of
      its package: it may be imported (and its public names used) only by modules inside that package
      (``attnlab.layers.*``), never from outside it (``attnlab.probes`` importing ``attnlab.layers._common`` is
      an offence).

    Lazy imports inside functions count as well.
    """
    offences = sorted(why for module in MODULES for why in _private_import_offences(module))
    assert not offences, offences


def test_views_is_a_top_tier_module():
    """attnlab.views joins capture and report (like the pipeline): nothing below the CLI imports it, lazily or not."""
    importers = [name for name, path in MODULES.items() if "attnlab.views" in _imports(path)
                 and name != "attnlab.views" and not name.startswith("attnlab.cli")]
    assert importers == []


def test_cli_subcommands_do_not_import_main_and_configs_stay_pure():
    """cli.main imports the subcommand modules, never the reverse (lazy imports included); the config and
    progress modules import neither torch nor transformers (they are read by every tier)."""
    for path in sorted((SRC / "cli").glob("*.py")):
        if path.name != "main.py":
            assert "attnlab.cli.main" not in _imports(path), path.name
    for name in ("config.py", "progress.py", "facts.py"):
        assert not any(n.split(".")[0] in ("torch", "transformers") for n in _imports(SRC / name)), name
