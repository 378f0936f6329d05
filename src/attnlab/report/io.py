"""Write and read the three result files of a run: ``results.json``, ``results.csv`` and ``report.html``.

:func:`write_results` is the only writer. It works in this order, so a failure never leaves half a run behind:

1. validate the results dict and make it strict JSON (NaN and ±inf become ``null``, numpy scalars become numbers);
2. create the output directory and check that it is writable (``ConfigError`` if not; nothing written yet);
3. serialise all three files **in memory**: the JSON text, the CSV text and the HTML (rendered from the JSON text
   parsed back, so the report is exactly what ``attnlab render results.json`` would produce). If rendering
   raises, nothing has been written and any previous results in the directory are untouched;
4. write each file to a temporary file in the same directory (``.results.json.<random>.tmp``), flushed and fsynced;
5. rename them into place with :func:`os.replace` (atomic per file), ``results.json`` last, so a reader that sees a
   new ``results.json`` also sees the matching CSV and HTML. Temporary files are removed on any failure.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from attnlab.columns import DENOISING_STEP_COLUMN, STEP_COLUMN
from attnlab.errors import ConfigError
from attnlab.io_utils import atomic_write_text as atomic_write_text  # re-exported: the CLI writes report.html
from attnlab.io_utils import SHARD_DIR, prepare_out_dir
from attnlab.io_utils import write_temp as _write_temp
from attnlab.report.schema import CSV_COLUMNS, INDEX_COLUMNS, REQUIRED_ROW_COLUMNS, validate_results
from attnlab.report.upgrade import upgrade_results

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
REPORT_HTML = "report.html"
RESULT_FILES = (RESULTS_JSON, RESULTS_CSV, REPORT_HTML)


def check_targets(out_dir: str | os.PathLike[str], names: Iterable[str] = RESULT_FILES) -> None:
    """ConfigError (one line) if a file to be written in ``out_dir`` exists as something other than a file.

    A directory (or other non-file) named ``results.json`` would make the final rename fail after the other files
    were already replaced, mixing two runs; every target is checked before anything is written.
    """
    for name in names:
        target = Path(out_dir) / name
        if (target.exists() or target.is_symlink()) and not target.is_file():
            raise ConfigError(f"cannot write results to {out_dir}: {target} exists and is not a file")


def _jsonable(value: Any, where: str = "results") -> Any:
    """A copy of ``value`` made of dict/list/str/int/float/bool/None only; non-finite floats become None."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy/torch scalars, no import needed
        return _jsonable(value.item(), where)
    if hasattr(value, "tolist"):  # numpy arrays, torch tensors
        return _jsonable(value.tolist(), where)
    raise TypeError(f"{where} is a {type(value).__name__}, which cannot be written to results.json")


def _is_flat(value: Any) -> bool:
    """True for scalars, lists of scalars and dicts of those: printed on one line."""
    if isinstance(value, dict):
        return all(_is_flat(item) and not isinstance(item, dict) for item in value.values())
    if isinstance(value, list):
        return all(not isinstance(item, (dict, list)) for item in value)
    return True


def _dump(value: Any, depth: int) -> str:
    if (isinstance(value, dict) and value and (depth < 2 or not _is_flat(value))) or (
        isinstance(value, list) and value and not _is_flat(value)
    ):
        pad, inner = " " * depth, " " * (depth + 1)
        if isinstance(value, dict):
            items = [f"{inner}{json.dumps(key, ensure_ascii=False)}: {_dump(item, depth + 1)}"
                     for key, item in value.items()]
            return "{\n" + ",\n".join(items) + f"\n{pad}}}"
        return "[\n" + ",\n".join(inner + _dump(item, depth + 1) for item in value) + f"\n{pad}]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))


def results_to_json(results: Mapping[str, Any]) -> str:
    """Serialise a results dict to strict JSON text: UTF-8, NaN/inf written as ``null``, numpy scalars as numbers.

    Top-level and second-level objects are indented; each row, window and other flat record is one line, so the
    file stays small and diffable.
    """
    return _dump(_jsonable(results), 0) + "\n"


def rows_to_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The long-format table of ``results["rows"]``.

    Columns are exactly ``probe, variant, statistic, layer, head, position, value`` in that order; ``layer``,
    ``head`` and ``position`` are nullable ``Int64`` (``<NA>`` where not applicable), ``value`` is float64 (NaN for
    ``null``), ``probe``, ``variant`` and ``statistic`` are strings (``variant`` NaN for probe rows, also when the
    row has no ``variant`` key). When some row has a ``step`` (training runs), a nullable ``Int64`` ``step``
    column follows them. Other keys are ignored.
    """
    rows = list(rows)
    for index, row in enumerate(rows):
        absent = [column for column in REQUIRED_ROW_COLUMNS if column not in row]
        if absent:
            raise ConfigError(f"rows[{index}] is missing column(s): {', '.join(absent)}")
    data: dict[str, Any] = {}
    for column in CSV_COLUMNS:
        values = [row.get(column) for row in rows]
        if column in INDEX_COLUMNS:
            data[column] = pd.array(values, dtype="Int64")
        elif column == "value":
            data[column] = pd.array([math.nan if v is None else float(v) for v in values], dtype="float64")
        elif column == "variant":
            data[column] = pd.Series([None if v is None else str(v) for v in values], dtype=str)
        else:
            data[column] = pd.Series([str(v) for v in values], dtype=str)  # pandas' default string dtype
    columns = list(CSV_COLUMNS)
    for optional in (STEP_COLUMN, DENOISING_STEP_COLUMN):
        if any(row.get(optional) is not None for row in rows):
            data[optional] = pd.array([row.get(optional) for row in rows], dtype="Int64")
            columns.append(optional)
    return pd.DataFrame(data, columns=columns)


def frame_to_csv(frame: pd.DataFrame) -> str:
    """CSV text of a :func:`rows_to_frame` table: empty cells for missing values, floats at full precision.

    Read it back with ``pandas.read_csv(path, dtype={"variant": str, "layer": "Int64", "head": "Int64",
    "position": "Int64"})`` (add ``"step": "Int64"`` for a training run's file).
    """
    return frame.to_csv(index=False, lineterminator="\n", na_rep="")


def check_out_dir(out_dir: str | os.PathLike[str], *, force: bool | None = None, resume: bool = False) -> None:
    """Check, without creating anything, that ``out_dir`` is or can become a writable directory.

    Used before a long run so that a bad ``--out`` fails first and leaves nothing behind; also refuses an
    ``out_dir`` where a result file's name is taken by a directory (:func:`check_targets`). With ``force=False``
    (the CLI's ``attnlab report/probe/eval`` without ``--force``) an existing, non-empty ``out_dir`` is refused
    too; ``force=True`` allows it (the result files are then replaced, other files left alone); ``None`` skips
    that check. ``resume=True`` (``--resume``) also allows an ``out_dir`` that holds nothing but the shard
    folder of an interrupted run (:data:`attnlab.shards.SHARD_DIR`); without it, the "not empty" error of such a
    folder says to pass --resume. Raises ConfigError (one line) naming the directory and the reason.
    """
    path = Path(out_dir).absolute()
    if force is False and path.is_dir():
        check_targets(path)  # the more specific error first
        names = sorted(entry.name for entry in path.iterdir())
        if resume:
            names = [name for name in names if name != SHARD_DIR]
        if names:
            ours = (RESULTS_JSON, REPORT_HTML, RESULTS_CSV)
            first = [n for n in ours if n in names] + [n for n in names if n not in ours]
            shown = ", ".join(first[:2]) + (", …" if len(first) > 2 else "")
            if SHARD_DIR in names and not resume:
                raise ConfigError(f"--out {out_dir} holds the shards of an interrupted run ({shown}); pass --resume "
                                  "to continue it, --force to start over, or choose another --out")
            if resume and RESULTS_JSON in names and not (path / SHARD_DIR).exists():
                raise ConfigError(f"--resume: --out {out_dir} holds a finished run ({RESULTS_JSON}, no shards to "
                                  "continue); pass --force to run it again, or choose another --out")
            raise ConfigError(f"--out {out_dir} is not empty ({shown}); pass --force to replace its results or "
                              "choose another --out")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot write results to {out_dir}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write results to {out_dir}: {existing} is not writable")
    try:  # permissions alone do not tell (root, read-only or virtual filesystems): try, then clean up
        os.rmdir(tempfile.mkdtemp(prefix=".attnlab-check-", dir=existing))
    except OSError as error:
        raise ConfigError(f"cannot write results to {out_dir}: {existing}: {error.strerror or error}") from None
    check_targets(path)


def write_results(
    out_dir: str | os.PathLike[str], results: Mapping[str, Any], *, render: bool = True
) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv`` and (if ``render``) ``report.html`` into ``out_dir``.

    ``out_dir`` is created if needed. Every file is serialised in memory first and then renamed into place, so a
    failure (including one while rendering the HTML) leaves no temporary files and no half-written results; the
    files of a previous run in the same directory stay as they were. NaN and ±inf are written as ``null`` in the
    JSON and as empty cells in the CSV.

    Returns ``{"json": path, "csv": path, "html": path}`` (no ``"html"`` when ``render=False``).
    The files hold ``results`` at the current schema version (:func:`attnlab.report.upgrade.upgrade_results`).
    Raises ConfigError if ``results`` fails :func:`attnlab.report.schema.validate_results`, ``out_dir`` cannot
    be created or written, or a target name is taken by a directory (checked before anything is written; the
    message names the directory and the reason).
    """
    results = upgrade_results(results)  # validates; rows get ``variant``, the probes' sections are filled in
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir)
    check_targets(out_dir, RESULT_FILES if render else (RESULTS_JSON, RESULTS_CSV))

    json_text = results_to_json(results)
    clean = json.loads(json_text)
    texts = {"csv": (RESULTS_CSV, frame_to_csv(rows_to_frame(clean["rows"])))}
    if render:
        from attnlab.report.render import render_html  # matplotlib and jinja2 only when rendering

        texts["html"] = (REPORT_HTML, render_html(clean))
    texts["json"] = (RESULTS_JSON, json_text)  # last: renamed into place after the others

    temps: dict[str, Path] = {}
    try:
        for key, (name, text) in texts.items():
            temps[key] = _write_temp(out_dir, name, text)
        written: dict[str, Path] = {}
        for key, (name, _) in texts.items():
            os.replace(temps[key], out_dir / name)
            del temps[key]
            written[key] = out_dir / name
    except OSError as error:
        raise ConfigError(f"cannot write results to {out_dir}: {error.strerror or error}") from error
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
    return {key: written[key] for key in ("json", "csv", "html") if key in written}


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``results.json`` (or the one inside a run directory) and check its schema version.

    Raises ConfigError (one line, naming the file) if the file is missing, is not UTF-8 JSON, has no or a newer
    ``schema_version``, or lacks a required key. ``null`` values stay ``None``. An older file is returned converted
    to the current schema (:func:`attnlab.report.upgrade.upgrade_results`; ``upgraded_from`` names its version).
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_JSON
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a results.json: not UTF-8 text") from None
    except OSError as error:
        raise ConfigError(f"Cannot read {path}: {error.strerror or error}") from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{path} is not a results.json: invalid JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None
    validate_results(results, source=str(path))
    return upgrade_results(results)
