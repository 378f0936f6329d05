"""The one generic section renderer: any probe's declared sections (``attnlab.report.sections``) + its rows → HTML
context (figures as PNG data URIs, tables as display strings, text), rendered by ``_sections.html.j2``.

Nothing here knows a probe: what to draw is read from ``results["sections"]`` (see ``upgrade.py`` for files that
predate it); values are read from the probe's rows (``probe`` column) and ``results["extras"][probe]``.
"""

from __future__ import annotations

import math
import string
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from attnlab.report import plots
from attnlab.report.plots import HeatmapPanel, LinePanel
from attnlab.report.plots import Series as Line
from attnlab.report.image_overlay import draw_overlays
from attnlab.report.sections import Heatmap, ImageOverlay, LayerCurve, Part, PositionCurve, Section, Series, StepCurve
from attnlab.report.sections import Table, Text
from attnlab.report.sections import sections_from_dicts
from attnlab.report.formatting import format_number, layer_ranges, visible_token

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]

Entry = tuple[Any, Any, Any, float]  # (layer, head, position, value)
Stepped = tuple[Any, Any, Any, float, int]  # (layer, head, position, value, step)


class ProbeRows:
    """Rows of one probe indexed by statistic: ``(layer, head, position, value)`` with NaN for null values; rows
    with a ``step`` (training runs) are also in ``stepped`` as ``(layer, head, position, value, step)``. Rows of
    one denoising step (``denoising_step`` set; diffusion runs also write the rows summed over steps) are left to
    the per-step sections (:mod:`attnlab.report.diffusion_section`)."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], num_layers: int | None = None) -> None:
        self.by_stat: dict[str, list[Entry]] = defaultdict(list)
        self.stepped: dict[str, list[Stepped]] = defaultdict(list)
        for row in rows:
            if row.get("denoising_step") is not None:
                continue
            value = math.nan if row["value"] is None else float(row["value"])
            self.by_stat[str(row["statistic"])].append((row["layer"], row["head"], row["position"], value))
            if row.get("step") is not None:
                self.stepped[str(row["statistic"])].append(
                    (row["layer"], row["head"], row["position"], value, int(row["step"])))
        layers = [e[0] for entries in self.by_stat.values() for e in entries if e[0] is not None]
        self.num_layers = max(int(num_layers or 0), max(layers, default=-1) + 1)

    def has(self, stat: str) -> bool:
        return any(not math.isnan(e[3]) for e in self.by_stat.get(stat, ()))

    def entries(self, series: Series) -> list[Entry]:
        """Finite rows of ``series.statistic`` (at ``series.position`` if set), values times ``series.scale``."""
        return [(layer, head, pos, value * series.scale)
                for layer, head, pos, value in self.by_stat.get(series.statistic, ())
                if not math.isnan(value) and (series.position is None or pos == series.position)]

    def picked(self) -> list[int]:
        """First, middle and last layer."""
        n = self.num_layers
        return sorted({0, n // 2, n - 1}) if n > 0 else []


def _mean_by(entries: Sequence[Entry], key: int) -> dict[Any, float]:
    groups: dict[Any, list[float]] = defaultdict(list)
    for entry in entries:
        if entry[key] is not None:
            groups[entry[key]].append(entry[3])
    return {k: float(np.mean(v)) for k, v in sorted(groups.items())}


def _grid(entries: Sequence[Entry], rows: int, column: int) -> np.ndarray:
    """(rows, columns) mean of ``entries`` by (layer, column index ``column`` of the entry); NaN where absent."""
    cols = max((e[column] for e in entries if e[column] is not None), default=-1) + 1
    total, count = np.zeros((max(rows, 1), max(cols, 1))), np.zeros((max(rows, 1), max(cols, 1)))
    for entry in entries:
        layer, col = entry[0], entry[column]
        if layer is not None and col is not None and 0 <= layer < total.shape[0] and col >= 0:
            total[layer, col] += entry[3]
            count[layer, col] += 1
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _xy(mapping: Mapping[Any, float], normalise: bool = False) -> tuple[np.ndarray, np.ndarray]:
    x = np.array(list(mapping), dtype=float)
    y = np.array(list(mapping.values()), dtype=float)
    if normalise and y.size and np.isfinite(y).any() and np.nanmax(np.abs(y)) > 0:
        y = y / np.nanmax(y)
    return x, y


class _Values(string.Formatter):
    """``str.format`` over a probe's extras and rows (``{key}``, ``{mean.STAT}``, ``{percent.STAT}`` ...)."""

    def __init__(self, extras: Mapping[str, Any], rows: ProbeRows, counts: Mapping[str, Any] | None = None) -> None:
        self.extras, self.rows, self.counts = extras, rows, counts or {}

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, str]:
        namespace, dot, stat = field_name.partition(".")
        if dot and namespace in ("mean", "percent", "value", "count"):
            values = [e[3] for e in self.rows.by_stat.get(stat, ()) if not math.isnan(e[3])]
            if namespace == "count":
                return len(values), field_name
            if not values:
                return None, field_name
            value = values[0] if namespace == "value" else float(np.mean(values))
            return value * (100 if namespace == "percent" else 1), field_name
        if field_name in self.counts:
            return self.counts[field_name], field_name
        return self.extras.get(field_name), field_name

    def format_field(self, value: Any, format_spec: str) -> str:
        if format_spec and isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return format(value, format_spec)
            except ValueError:  # e.g. ``:d`` on a mean; the spec was checked to suit some number
                pass
        return display(value)

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        return repr(value) if conversion == "r" and isinstance(value, str) else value

    def fill(self, template: str) -> str:
        return self.format(template) if template else ""


def display(value: Any) -> str:
    """A value as text: ``—`` for None/NaN, whole floats as integers, else 3 significant digits, ``1–3, 7`` for
    integer lists, ``k (v); ...`` for mappings, ``yes``/``no`` for booleans."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return "; ".join(f"{key} ({display(item)})" for key, item in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return layer_ranges(value)
        return ", ".join(display(v) for v in value) or "none"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e9:
        return str(int(value))  # rope_theta = 10000, not 1e+04
    return format_number(value)


def _cell(value: Any, fmt: str) -> dict[str, Any]:
    if fmt == "token":
        return {"text": visible_token(value if value is not None else ""), "token": True, "num": False}
    if fmt == "tokens":
        items = [item[-1] if isinstance(item, (list, tuple)) and item else item for item in value or []]
        return {"text": " ".join(visible_token(item) for item in items), "token": False, "num": False}
    if fmt == "mapping" and isinstance(value, Mapping):
        text = ", ".join(f"{k}: {v:+.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in value.items())
        return {"text": text, "token": False, "num": False}
    if fmt == "list" and isinstance(value, (list, tuple)):
        return {"text": ", ".join(map(str, value)), "token": False, "num": False}
    if fmt == "text":
        return {"text": "—" if value is None else str(value), "token": False, "num": False}
    return {"text": format_number(value), "token": False, "num": isinstance(value, (int, float)) or value is None}


def _heatmap(part: Heatmap, rows: ProbeRows, values: _Values) -> str | None:
    panels = []
    for series in part.series:
        if rows.has(series.statistic):
            matrix = _grid(rows.entries(series), rows.num_layers, 1 if part.columns == "head" else 2)
            panels.append(HeatmapPanel(matrix, values.fill(series.label), values.fill(series.unit), series.vmin,
                                       series.vmax, xlabel=values.fill(part.xlabel) or part.columns))
    if not panels:
        return None
    side = None
    if part.side is not None and rows.has(part.side.statistic):
        per_layer = _mean_by(rows.entries(part.side), 0)  # rows with an empty layer (overall values) are skipped
        bars = np.full(rows.num_layers, np.nan)
        for layer, value in per_layer.items():
            if 0 <= layer < rows.num_layers:
                bars[layer] = value
        side = (bars, values.fill(part.side.label), values.fill(part.side.unit))
    return plots.heatmap_figure(panels, side=side)


def _line_color(series: Series, number: int, layer_rank: int | None) -> str | None:
    if series.color is not None:
        return series.color
    return COLORS[(number if layer_rank is None else layer_rank) % len(COLORS)]


def _layer_curve(part: LayerCurve, rows: ProbeRows, values: _Values) -> str | None:
    lines = []
    for number, series in enumerate(part.series):
        entries = rows.entries(series)
        if not entries:
            continue
        if part.per_head:
            for head in sorted({e[1] for e in entries if e[1] is not None}):
                x, y = _xy(_mean_by([e for e in entries if e[1] == head], 0), series.normalise)
                label = values.fill(series.label.replace("{head}", str(head)))
                lines.append(Line(x, y, label, _line_color(series, head, None), series.dashed))
        else:
            x, y = _xy(_mean_by(entries, 0), series.normalise)
            lines.append(Line(x, y, values.fill(series.label), _line_color(series, number, None), series.dashed))
    if not lines:
        return None
    panel = LinePanel(lines, values.fill(part.title), "layer", values.fill(part.ylabel), logy=part.logy,
                      ylim=part.ylim)
    return plots.lines_figure([panel], height=3.0)


def _curve_lines(part: PositionCurve | StepCurve, rows: ProbeRows, values: _Values,
                 entries_of: Any) -> list[Line]:
    """One line per (series, layer group): ``entries_of(series)`` gives ``(layer, head, x, value)`` entries; each
    line is the mean of its entries per x, for the layers the series picks (:data:`LAYER_CHOICES`)."""
    lines = []
    picked = rows.picked()
    for number, series in enumerate(part.series):
        entries = [e for e in entries_of(series) if e[2] is not None]
        if series.layers == "none":
            groups = [(None, [e for e in entries if e[0] is None])]
        elif series.layers == "any":
            groups = [(None, entries)]
        else:
            layers = picked if series.layers == "picked" else sorted({e[0] for e in entries if e[0] is not None})
            groups = [(layer, [e for e in entries if e[0] == layer]) for layer in layers]
        for layer, chosen in groups:
            if not chosen:
                continue
            x, y = _xy(_mean_by(chosen, 2), series.normalise)
            rank = None if layer is None else (picked.index(layer) if layer in picked else layer)
            label = series.label.replace("{layer}", str(layer)) if layer is not None else series.label
            lines.append(Line(x, y, values.fill(label), _line_color(series, number, rank), series.dashed))
    return lines


def _position_curve(part: PositionCurve, rows: ProbeRows, values: _Values) -> str | None:
    lines = _curve_lines(part, rows, values, rows.entries)
    if not lines:
        return None
    panel = LinePanel(lines, values.fill(part.title), values.fill(part.xlabel), values.fill(part.ylabel),
                      logx=part.logx, logy=part.logy, ylim=part.ylim)
    return plots.lines_figure([panel], height=3.4)


def _step_curve(part: StepCurve, rows: ProbeRows, values: _Values) -> str | None:
    def entries_of(series: Series) -> list[Entry]:  # the step takes the position's place on the x axis
        return [(layer, head, step, value * series.scale)
                for layer, head, position, value, step in rows.stepped.get(series.statistic, ())
                if not math.isnan(value) and (series.position is None or position == series.position)]

    lines = _curve_lines(part, rows, values, entries_of)
    if not lines:
        return None
    panel = LinePanel(lines, values.fill(part.title), values.fill(part.xlabel), values.fill(part.ylabel),
                      logy=part.logy, ylim=part.ylim)
    return plots.lines_figure([panel], height=3.2)


def _table(part: Table, rows: ProbeRows, extras: Mapping[str, Any], values: _Values) -> dict[str, Any] | None:
    headers = [c.header for c in part.columns]
    numeric = [c.format == "number" for c in part.columns]
    if part.extras is not None:
        if part.extras not in extras:
            return None
        records = [r for r in extras.get(part.extras) or [] if isinstance(r, Mapping)]
        if part.sort_by:
            records.sort(key=lambda r: -(r.get(part.sort_by) or 0))
        shown = records[: part.top] if part.top else records
        body = [[_cell(record.get(c.key), c.format) for c in part.columns] for record in shown]
        total = len(records)
    else:
        columns = [c for c in part.columns if rows.has(c.key)] if part.present_only else list(part.columns)
        headers, numeric = [c.header for c in columns], [c.format == "number" for c in columns]
        stats = [c.key for c in columns]
        if not any(rows.has(s) for s in stats):
            return None
        if part.index == "picked_layers":
            keys: list[tuple[str, set[int] | None]] = [(f"layer {layer}", {layer}) for layer in rows.picked()]
            keys.append(("all layers", None))
        else:
            positions = sorted({e[2] for s in stats for e in rows.by_stat.get(s, ()) if e[2] is not None})
            keys = [(p, p) for p in positions]
        body = []
        for name, key in keys:
            cells = [_cell(name, "text")]
            for stat in stats:
                entries = [e for e in rows.by_stat.get(stat, ()) if not math.isnan(e[3])]
                if part.index == "picked_layers":
                    per_layer = _mean_by(entries, 0)
                    picked = [v for layer, v in per_layer.items() if key is None or layer in key]
                else:
                    picked = [e[3] for e in entries if e[2] == key]
                cells.append(_cell(float(np.mean(picked)) if picked else None, "number"))
            body.append(cells)
        headers, numeric = [part.index_header or part.index, *headers], [False, *numeric]
        total = len(body)
    if not body and not part.empty:
        return None
    counts = _Values(extras, rows, {"shown": len(body), "total": total})
    return {"kind": "table", "title": values.fill(part.title), "headers": list(zip(headers, numeric)), "rows": body,
            "caption": counts.fill(part.caption), "empty": values.fill(part.empty)}


def _shown(part: Part, rows: ProbeRows, extras: Mapping[str, Any]) -> bool:
    return part.when is None or bool(extras.get(part.when)) or rows.has(part.when)


def draw_part(part: Part, rows: ProbeRows, extras: Mapping[str, Any],
              inputs: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any] | None:
    """Template context of one part, or None when it has nothing to show. ``inputs`` is ``results["inputs"]``
    (the images an :class:`ImageOverlay` is drawn on)."""
    if not _shown(part, rows, extras):
        return None
    values = _Values(extras, rows)
    if isinstance(part, Text):
        return {"kind": "text", "text": values.fill(part.template)}
    if isinstance(part, ImageOverlay):
        drawn = draw_overlays(part, extras, inputs, values.fill)
        if drawn is None:
            return None
        caption = " ".join([values.fill(part.caption), *(f"({note})" for note in drawn[1])]).strip()
        return {"kind": "figure", "src": drawn[0], "alt": values.fill(part.alt) or values.fill(part.title),
                "caption": caption}
    if isinstance(part, Table):
        return _table(part, rows, extras, values)
    draw = {Heatmap: _heatmap, LayerCurve: _layer_curve, PositionCurve: _position_curve,
            StepCurve: _step_curve}[type(part)]
    src = draw(part, rows, values)
    if src is None:
        return None
    return {"kind": "figure", "src": src, "alt": values.fill(part.alt) or values.fill(getattr(part, "title", "")),
            "caption": values.fill(part.caption)}


def draw_section(section: Section, probe: str, rows: ProbeRows, extras: Mapping[str, Any],
                 inputs: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Template context of one section: id, title, probe, parts (figures, tables, text)."""
    parts = [drawn for part in section.parts if (drawn := draw_part(part, rows, extras, inputs)) is not None]
    return {"id": section.id, "title": section.title, "probe": probe, "parts": parts}


def probe_sections(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every section of every probe in ``results["sections"]`` (v2: the probes that ran), in that order."""
    by_probe: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in results.get("rows") or []:
        by_probe[str(row["probe"])].append(row)
    extras = results.get("extras") or {}
    num_layers = (results.get("model") or {}).get("num_layers")
    inputs = results.get("inputs") if isinstance(results.get("inputs"), list) else []
    drawn = []
    for probe, specs in (results.get("sections") or {}).items():
        rows = ProbeRows(by_probe.get(probe, []), num_layers)
        probe_extras = extras.get(probe) if isinstance(extras.get(probe), Mapping) else {}
        for section in sections_from_dicts(specs):
            drawn.append(draw_section(section, probe, rows, probe_extras, inputs))
    return drawn
