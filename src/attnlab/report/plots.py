"""Matplotlib figures for the HTML report, returned as ``data:image/png;base64,...`` URIs.

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas directly: no pyplot, no global
backend switch, no rcParams changes, so rendering is side-effect free and safe to call from any thread that owns
its own figure. Each function takes plain numpy arrays and labels; what they mean is decided in ``render.py``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

DPI = 110
MAX_WIDTH_IN = 9.5


@dataclass
class HeatmapPanel:
    """One layer × head heatmap: ``matrix`` has shape (num_layers, num_heads); NaN cells are drawn grey."""

    matrix: np.ndarray
    title: str
    label: str  # colorbar label, with units
    vmin: float | None = None
    vmax: float | None = None
    xlabel: str = "head"
    ylabel: str = "layer"


@dataclass
class Series:
    """One line: y against x. ``dashed`` draws it dashed (used for the no-sink variants)."""

    x: np.ndarray
    y: np.ndarray
    label: str
    color: str | None = None
    dashed: bool = False


@dataclass
class LinePanel:
    """One set of axes holding several lines."""

    series: list[Series]
    title: str
    xlabel: str
    ylabel: str
    logx: bool = False
    logy: bool = False
    ylim: tuple[float, float] | None = None


def _to_data_uri(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _tick_positions(n: int, max_ticks: int) -> list[int]:
    step = max(1, int(np.ceil(n / max_ticks)))
    return list(range(0, n, step))


def _annotate(ax, matrix: np.ndarray, norm, cmap, fontsize: float) -> None:
    for (row, col), value in np.ndenumerate(matrix):
        if not np.isfinite(value):
            continue
        red, green, blue, _ = cmap(norm(value))
        color = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
        ax.text(col, row, f"{value:.2g}", ha="center", va="center", fontsize=fontsize, color=color, in_layout=False)


def heatmap_figure(panels: Sequence[HeatmapPanel], side: tuple[np.ndarray, str, str] | None = None) -> str:
    """Heatmaps side by side (layer on the y axis, layer 0 at the top), each with its own colorbar.

    ``side`` is an optional ``(values_per_layer, title, xlabel)`` drawn as horizontal bars aligned with the
    layers, e.g. the sink rate next to the α₀ heatmap. Returns a PNG data URI.
    """
    num_layers, num_heads = panels[0].matrix.shape
    annotate = num_heads <= 16 and num_layers <= 48
    panel_width = min(4.6, 1.6 + 0.42 * num_heads)
    widths = [panel_width] * len(panels) + ([2.2] if side is not None else [])
    scale = min(1.0, MAX_WIDTH_IN / sum(widths))
    height = min(9.0, max(2.6, 1.3 + 0.2 * num_layers))
    fig = Figure(figsize=(sum(widths) * scale, height), layout="constrained")
    axes = fig.subplots(1, len(widths), width_ratios=widths, squeeze=False)[0]
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    for ax, panel in zip(axes, panels, strict=False):
        matrix = np.ma.masked_invalid(np.asarray(panel.matrix, dtype=float))
        image = ax.imshow(matrix, cmap=cmap, vmin=panel.vmin, vmax=panel.vmax, aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=ax, label=panel.label, shrink=0.9, pad=0.02)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.set_xticks(_tick_positions(num_heads, 16))
        ax.set_yticks(_tick_positions(num_layers, 32))
        ax.tick_params(labelsize=7)
        if annotate:
            _annotate(ax, panel.matrix, image.norm, cmap, fontsize=6 if num_heads > 6 else 7)
    if side is not None:
        fig.get_layout_engine().set(wspace=0.08)  # keep the last colorbar label clear of the side panel
        values, title, xlabel = side
        ax = axes[-1]
        ax.barh(np.arange(len(values)), np.nan_to_num(np.asarray(values, dtype=float)), color="#4c72b0")
        if (flat := flat_limits(values)) is not None:
            ax.set_xlim(*flat)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=3))  # a narrow panel: few tick labels, none overlapping
        ax.set_ylim(len(values) - 0.5, -0.5)
        ax.set_yticks(_tick_positions(len(values), 32))
        ax.tick_params(labelsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("layer")
        ax.grid(axis="x", alpha=0.3)
    return _to_data_uri(fig)


def _plain_log_ticks(axis, series: Sequence[Series] | None) -> None:
    """Log-axis labels as plain numbers (``0.3``, ``8``) instead of ``3×10⁻¹``.

    With ``series`` (the x axis), ticks sit at the x values themselves when there are few of them (distance bins).
    """
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(NullFormatter())
    if series is not None:
        xs = sorted({float(x) for s in series for x in np.asarray(s.x, dtype=float) if np.isfinite(x) and x > 0})
        if 0 < len(xs) <= 12:
            axis.set_major_locator(FixedLocator(xs))
            return
    lo, hi = axis.get_view_interval()
    if 0 < lo < hi and hi / lo < 30:  # less than about a decade and a half: label the minor ticks too
        axis.set_minor_formatter(plain)


def flat_limits(values: Any) -> tuple[float, float] | None:
    """Axis limits for values that are all equal (e.g. a sink rate of 0 throughout): ``(0, 1)`` for 0,
    ``(0, 2v)`` for v > 0, ``(2v, 0)`` for v < 0, so a non-negative statistic keeps a non-negative axis with
    readable ticks instead of matplotlib's ``v ± 0.05``. None when the values differ or none is finite."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0 or finite.min() != finite.max():
        return None
    value = float(finite[0])
    return (0.0, 1.0) if value == 0 else (0.0, 2 * value) if value > 0 else (2 * value, 0.0)


def lines_figure(panels: Sequence[LinePanel], height: float = 3.4) -> str:
    """Line plots side by side, each with a legend. Non-positive values are dropped on log axes."""
    fig = Figure(figsize=(MAX_WIDTH_IN, height), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=False):
        for series in panel.series:
            x = np.asarray(series.x, dtype=float)
            y = np.asarray(series.y, dtype=float)
            keep = np.isfinite(x) & np.isfinite(y)
            if panel.logx:
                keep &= x > 0
            if panel.logy:
                keep &= y > 0
            ax.plot(
                x[keep], y[keep], label=series.label, color=series.color,
                linestyle="--" if series.dashed else "-", marker="o" if keep.sum() <= 40 else None, markersize=3,
            )
        if panel.logx:
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis, panel.series)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel.logy:
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis, None)
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        elif not panel.logy and (flat := flat_limits([v for line in panel.series for v in line.y])) is not None:
            ax.set_ylim(*flat)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, which="both" if panel.logy or panel.logx else "major")
        if panel.series:
            ax.legend(fontsize=7, frameon=False)
    return _to_data_uri(fig)
