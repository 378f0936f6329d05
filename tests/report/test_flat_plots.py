"""All-equal values (a sigmoid run's sink rate of 0 throughout) get a non-negative axis with readable ticks."""

from __future__ import annotations

import numpy as np
import pytest

from attnlab.report import plots


@pytest.fixture
def figures(monkeypatch):
    drawn = []
    original = plots._to_data_uri

    def keep(fig):
        drawn.append(fig)
        return original(fig)

    monkeypatch.setattr(plots, "_to_data_uri", keep)
    return drawn


@pytest.mark.parametrize(("values", "expected"), [([0, 0, 0], (0.0, 1.0)), ([50.0, 50.0], (0.0, 100.0)),
                                                  ([-2.0, -2.0], (-4.0, 0.0)), ([0, 1], None), ([np.nan], None)])
def test_flat_limits(values, expected):
    assert plots.flat_limits(values) == expected


def test_all_zero_curves_get_a_non_negative_y_axis(figures):
    steps = np.arange(0, 101, 10)
    panel = plots.LinePanel([plots.Series(steps, np.zeros(len(steps)), "all layers"),
                             plots.Series(steps, np.zeros(len(steps)), "layer 0", dashed=True)],
                            "Sink rate", "step", "% of heads × windows with α₀ > ε")
    assert plots.lines_figure([panel]).startswith("data:image/png;base64,")
    low, high = figures[-1].axes[0].get_ylim()
    assert low >= 0 and high > low


def test_all_zero_side_bars_get_a_non_negative_axis_and_few_ticks(figures):
    matrix = np.zeros((4, 2))
    uri = plots.heatmap_figure([plots.HeatmapPanel(matrix, "α₀", "α₀", vmin=0, vmax=1)],
                               side=(np.zeros(4), "sink rate", "% of heads"))
    assert uri.startswith("data:image/png;base64,")
    bars = next(ax for ax in figures[-1].axes if ax.get_title() == "sink rate")
    low, high = bars.get_xlim()
    assert low >= 0 and high > low
    assert len([t for t in bars.get_xticks() if low <= t <= high]) <= 4  # labels do not run into each other
