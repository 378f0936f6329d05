"""Attention vs distance on a token grid (1-D, 2-D, or frames × height × width), with the energy-decay fit.

Li et al. 2025 (Radial Attention, METHODS.md #10; fit protocol medium confidence) bound post-softmax attention by
C·exp(-α|Δframe| - β|Δspatial|); Kreiman et al. 2025 (METHODS.md #9; binning medium confidence) find attention
decaying roughly as 1/r with spatial distance r. The user lays a grid over the sequence: ``grid`` = [n] (1-D),
[height, width] or [frames, height, width], row-major, starting at real-token position ``start``; both the query
and the key must be grid tokens. Per pair, Δt = |frame difference| and Δs = the spatial distance within the frame:
``spatial_metric="index"`` (default) |s − k0|, the difference of the row-major in-frame token indices, as METHODS.md
#10 (Radial Attention) writes it; ``"euclidean"`` the Euclidean distance in cells, sqrt(Δy² + Δx²) (the two agree
on a 1-D grid). r = sqrt(Δt² + Δs²).

Statistics:
- ``relative_attention`` (layer, position = round(r)): mean over pairs of A_qk / A_qq (the query's attention to
  a key relative to its attention to itself), averaged over heads. Dividing by A_qq removes each row's softmax
  normaliser, so a planted C_q·exp(-αΔt - βΔs) is recovered exactly.
- ``mean_attention`` (layer, position = round(r)): mean A_qk per pair, averaged over heads.
- per (layer, head): ``energy_alpha``, ``energy_beta`` and ``energy_r2`` from the least-squares fit of
  log(relative attention) = c - αΔt - βΔs over offset cells (:func:`attnlab.stats.decay_fits.fit_energy_decay`;
  α is absent for a grid with one frame), and ``power_law_exponent``/``power_law_r2`` of mean attention vs r
  (:func:`attnlab.stats.distance.fit_power_law` with uniform weights over offset cells; the ``distance`` probe
  weights by octave, so the two exponents are not the same estimator).
Sequences with fewer than ``start + prod(grid)`` real tokens are skipped. On a diffusion transformer
(:class:`attnlab.diffusion.DiffusionSession`) give the patch grid (``grid=[frames, rows, cols]``, and ``start`` = the
text tokens before the patches in a joint call, e.g. Flux); cross-attention calls (text keys) are skipped.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.functional.attention import BlockView
from attnlab.params import Range, validated
from attnlab.probes import PROBES
from attnlab.probes.base import AttentionCall, ModelFacts, Probe, Row, RowWriter, safe_div
from attnlab.report.sections import Heatmap, PositionCurve, Section, Series, Text
from attnlab.stats.decay_fits import fit_energy_decay
from attnlab.stats.distance import fit_power_law


MAX_CELLS = 4096  # a 64×64 grid; the (cells, cells) offset tables grow with its square


@PROBES.register("spatial_decay")
class SpatialDecayProbe(Probe):
    """Attention vs grid distance (1-D, 2-D or frames×height×width) with the Radial-Attention energy-decay fit.

    Args:
        grid: [n], [height, width] or [frames, height, width] (default [64]: a 1-D grid of 64 tokens).
        start: real-token position of the first grid cell (default 0).
        spatial_metric: "index" (default, |s − k0| as in METHODS.md #10) or "euclidean" (cells, sqrt(Δy² + Δx²)).
    """

    shardable = True  # export_state/import_state carry the whole state

    needs = frozenset({"probs"})

    sections = (Section("probe-spatial-decay", "Spatial decay on a grid", (
        Text(template="Grid {grid} starting at real-token position {start} (row-major, frames × height × width)."),
        PositionCurve((Series("relative_attention", "layer {layer}", layers="picked"),),
                      title="relative attention vs grid distance", xlabel="r (cells)", ylabel="A_qk / A_qq (log)",
                      logy=True, alt="Relative attention against grid distance",
                      caption="Mean A_qk / A_qq per pair at rounded distance r, mean over heads."),
        Heatmap((Series("energy_beta", "β (spatial)", "rate per cell"), Series("energy_alpha", "α (temporal)",
                                                                             "rate per cell")),
                alt="Heatmaps of fitted energy-decay rates",
                caption="Fit of log(A_qk/A_qq) = c − αΔt − βΔs per layer (rows) and head (columns)."),
    )),)

    @validated
    def __init__(self, grid: tuple[Annotated[int, Range(ge=1)], ...] = (64,), start: Annotated[int, Range(ge=0)] = 0,
                 spatial_metric: Literal["index", "euclidean"] = "index") -> None:
        grid = list(grid)
        if not 1 <= len(grid) <= 3:
            raise ConfigError(f"grid must be 1 to 3 positive integers ([n], [h, w] or [f, h, w]), got {grid}")
        if not 2 <= math.prod(grid) <= MAX_CELLS:
            raise ConfigError(f"grid must hold 2 to {MAX_CELLS} cells (its offset tables are cells²), got {grid}")
        self.grid, self.start, self.spatial_metric = grid, start, spatial_metric
        F, Hh, W = [1] * (3 - len(grid)) + grid
        self.dims = (F, Hh, W)
        cells = torch.arange(F * Hh * W)
        f, y, x = cells // (Hh * W), (cells // W) % Hh, cells % W
        dt, dy, dx = (f[:, None] - f[None]).abs(), (y[:, None] - y[None]).abs(), (x[:, None] - x[None]).abs()
        if spatial_metric == "index":  # offset cell (Δt, |s − k0|), s = in-frame index y·W + x; also F·Hh·W cells
            s = cells % (Hh * W)
            self._offset = dt * (Hh * W) + (s[:, None] - s[None]).abs()
            self.temporal = (cells // (Hh * W)).double()
            self.spatial = (cells % (Hh * W)).double()
        else:
            self._offset = (dt * Hh + dy) * W + dx  # (N, N) flat index of the (Δt, Δy, Δx) offset cell
            t_axis, y_axis, x_axis = torch.meshgrid(torch.arange(F), torch.arange(Hh), torch.arange(W), indexing="ij")
            self.temporal = t_axis.reshape(-1).double()
            self.spatial = torch.sqrt((y_axis**2 + x_axis**2).double()).reshape(-1)
        self.radius = torch.sqrt(self.temporal**2 + self.spatial**2)

    def bind(self, facts: ModelFacts) -> None:
        super().bind(facts)
        L, H, C = facts.num_layers, facts.num_heads, math.prod(self.dims)
        self.relative_sum = torch.zeros(L, H, C, dtype=torch.float64)
        self.attention_sum = torch.zeros(L, H, C, dtype=torch.float64)
        self.pair_count = torch.zeros(L, H, C, dtype=torch.float64)

    def update(self, call: AttentionCall, block: BlockView) -> None:
        if call.kind == "cross":  # a diffusion cross-attention call: its keys are text tokens, not grid cells
            return
        probs = block.probs  # (B, H, bq, width)
        B, H, bq, width = probs.shape
        N, device = self._offset.shape[0], probs.device
        n_real = call.key_valid.sum(-1)  # (B,)
        enough = (n_real >= self.start + N)[:, None]
        cell_q = call.query_positions[:, block.q_index] - self.start  # (B, bq)
        cell_k = call.key_positions[:, :width] - self.start  # (B, width)
        in_q = (cell_q >= 0) & (cell_q < N) & call.query_valid[:, block.q_index] & enough
        in_k = (cell_k >= 0) & (cell_k < N) & call.key_valid[:, :width] & enough
        if not bool(in_q.any()):
            return
        keep = block.keep if block.keep is not None else torch.ones(1, 1, bq, width, dtype=torch.bool, device=device)
        pair = (keep & in_q[:, None, :, None] & in_k[:, None, None, :]).expand(B, H, bq, width)
        offset = self._offset.to(device)[cell_q.clamp(0, N - 1)[:, :, None], cell_k.clamp(0, N - 1)[:, None, :]]
        q_abs = (block.q_index + (call.kv_len - call.q_len)).clamp(max=width - 1)
        self_prob = probs.gather(-1, q_abs[None, None, :, None].expand(B, H, bq, 1))  # (B, H, bq, 1) = A_qq
        relative = probs.double() / self_prob.double().clamp_min(1e-30)
        weight = pair.double()
        index = offset[:, None].expand(B, H, bq, width).transpose(0, 1).reshape(H, -1)
        C = math.prod(self.dims)

        def by_cell(values: Tensor) -> Tensor:
            flat = (values * weight).transpose(0, 1).reshape(H, -1)
            return torch.zeros(H, C, dtype=torch.float64, device=device).scatter_add_(1, index, flat).cpu()

        layer = call.layer_idx
        self.relative_sum[layer] += by_cell(relative)
        self.attention_sum[layer] += by_cell(probs.double())
        self.pair_count[layer] += by_cell(torch.ones_like(weight))

    def state(self) -> dict[str, Tensor]:
        return {"relative_sum": self.relative_sum, "attention_sum": self.attention_sum,
                "pair_count": self.pair_count}

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        L, H, _ = self.pair_count.shape
        relative = safe_div(self.relative_sum, self.pair_count)
        attention = safe_div(self.attention_sum, self.pair_count)
        bins = self.radius.round().long()
        num_bins = int(bins.max()) + 1
        for statistic, totals in (("relative_attention", self.relative_sum), ("mean_attention", self.attention_sum)):
            sums = torch.zeros(L, H, num_bins, dtype=torch.float64).index_add_(2, bins, totals)
            counts = torch.zeros(L, H, num_bins, dtype=torch.float64).index_add_(2, bins, self.pair_count)
            per_head = safe_div(sums, counts)
            curve = per_head.nanmean(dim=1) if bool((counts > 0).any()) else per_head[:, 0]
            out.add_indexed(statistic, curve, ~torch.isnan(curve), ("layer", "position"))
        for layer in range(L):
            for head in range(H):
                counts = self.pair_count[layer, head]
                if not bool((counts > 0).any()):
                    continue
                fit = fit_energy_decay(relative[layer, head], counts, self.temporal, self.spatial)
                exponent, r2 = fit_power_law(attention[layer, head], counts, self.radius, "uniform")
                for key, value in (*fit.items(), ("power_law_exponent", exponent), ("power_law_r2", r2)):
                    if value == value:
                        out.add(key, value, layer, head)
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        spatial = "|s - k0| in-frame index" if self.spatial_metric == "index" else "Euclidean in cells"
        return {"grid": self.grid, "start": self.start, "layout": "row-major; frames × height × width",
                "spatial_metric": self.spatial_metric,
                "distance": f"r = sqrt(dt^2 + ds^2), ds = {spatial}; positions are round(r)"}
