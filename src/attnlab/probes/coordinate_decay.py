"""Attention against the Euclidean distance between tokens that carry coordinates (atoms, points, patches).

Kreiman et al. 2025, "Transformers discover molecular structure without graph priors" (METHODS.md #9; binning
protocol medium confidence): each atom is a token, and the post-softmax weight a_ij of atom i on atom j, averaged
over heads and molecules, falls roughly as 1/r_ij. This probe bins every visible (query, key) pair with i ≠ j by
r_ij = ‖x_i − x_j‖ and accumulates the attention mass and the number of pairs per bin.

The caller gives the coordinates of the batch before each forward pass with :meth:`set_coordinates`
((B, T, dims), in the caller's length unit): the session only sees token ids, so no model input can carry them.

Statistics:
- ``mean_attention`` (layer, position = bin index): mean a_ij over the pairs in the bin, averaged over heads
  (bins of width ``bin_width``; the bin's distance is its centre, ``(index + 0.5) · bin_width``).
- ``power_law_exponent``, ``power_law_r2`` per (layer, head), and ``layer_power_law_exponent``,
  ``layer_power_law_r2`` per layer (from the head-averaged curve): p of the least-squares fit ``log a = c − p log r`` (:func:`attnlab.stats.distance.fit_power_law`,
  uniform weights, bins with r ≥ 1 length unit only: express coordinates in a unit where 1 is about the nearest
  neighbour distance, as σ is for a Lennard-Jones cluster). p ≈ 1 is the paper's 1/r finding.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.attention import BlockView
from attnlab.params import Range, validated
from attnlab.probes import PROBES
from attnlab.probes.base import AttentionCall, ModelFacts, Probe, Row, RowWriter, safe_div
from attnlab.report.sections import Heatmap, PositionCurve, Section, Series, Text
from attnlab.stats.distance import fit_power_law


@PROBES.register("coordinate_decay")
class CoordinateDecayProbe(Probe):
    """Mean attention per Euclidean-distance bin between tokens with coordinates, and its power-law fit.

    Args:
        bin_width: width of a distance bin, in the coordinates' unit (default 0.25).
        max_distance: pairs farther apart are not counted (default 8.0); bins = ceil(max_distance / bin_width).

    Call :meth:`set_coordinates` with the batch's (B, T, dims) coordinates before each forward pass.
    """

    shardable = True  # export_state/import_state carry the whole state

    needs = frozenset({"probs"})

    sections = (Section("probe-coordinate-decay", "Attention vs Euclidean distance", (
        Text(template="Pairs binned by ‖x_i − x_j‖ in bins of {bin_width} length units (position k = bin "
                      "[k·{bin_width}, (k+1)·{bin_width})). Kreiman et al. 2025 find a_ij ∝ 1/r_ij."),
        PositionCurve((Series("mean_attention", "layer {layer}", layers="each"),), title="attention vs distance",
                      xlabel="distance bin", ylabel="mean a_ij (log)", logy=True,
                      alt="Mean attention weight against the distance between tokens, one line per layer",
                      caption="Mean post-softmax weight per distance bin, averaged over heads."),
        Heatmap((Series("power_law_exponent", "p in a ∝ r^-p", "exponent"),),
                alt="Heatmap of fitted power-law exponents by layer and head",
                caption="Fit of log a = c − p log r over bins with r ≥ 1; p = 1 is the paper's 1/r."),
    )),)

    @validated
    def __init__(self, bin_width: Annotated[float, Range(gt=0)] = 0.25,
                 max_distance: Annotated[float, Range(gt=0)] = 8.0) -> None:
        self.bin_width, self.max_distance = bin_width, max_distance
        self.num_bins = math.ceil(max_distance / bin_width)
        self.coordinates: Tensor | None = None

    def bind(self, facts: ModelFacts) -> None:
        super().bind(facts)
        shape = (facts.num_layers, facts.num_heads, self.num_bins)
        self.attention_sum = torch.zeros(shape, dtype=torch.float64)
        self.pair_count = torch.zeros(shape, dtype=torch.float64)

    def set_coordinates(self, coordinates: Tensor) -> None:
        """The next forward pass's coordinates: (B, T, dims) float, T the sequence length of the batch.

        Raises ShapeError if not 3-D."""
        if coordinates.dim() != 3:
            raise ShapeError(f"expected coordinates (batch, seq_len, dims), got {tuple(coordinates.shape)}")
        self.coordinates = coordinates.detach().double()

    def update(self, call: AttentionCall, block: BlockView) -> None:
        if self.coordinates is None:
            raise ConfigError("coordinate_decay needs the batch's coordinates: call probe.set_coordinates(x) "
                              "before each forward pass")
        probs = block.probs
        B, H, bq, width = probs.shape
        coords = self.coordinates.to(probs.device)
        if coords.shape[0] != B or coords.shape[1] < call.kv_len:
            raise ShapeError(f"expected coordinates for {B} sequences of {call.kv_len} tokens, got "
                             f"{tuple(coords.shape)}")
        rows = block.q_index + (call.kv_len - call.q_len)  # query rows as key indices
        distance = torch.cdist(coords[:, rows], coords[:, :width])  # (B, bq, width)
        bins = (distance / self.bin_width).floor().long()
        visible = call.query_valid[:, block.q_index][:, :, None] & call.key_valid[:, None, :width]
        visible = visible & (rows[None, :, None] != torch.arange(width, device=probs.device)[None, None, :])
        visible = visible & (bins < self.num_bins)
        pair = visible[:, None].expand(B, H, bq, width)
        if block.keep is not None:
            pair = pair & block.keep
        index = bins.clamp(max=self.num_bins - 1)[:, None].expand(B, H, bq, width).transpose(0, 1).reshape(H, -1)

        def by_bin(values: Tensor) -> Tensor:
            flat = (values.double() * pair).transpose(0, 1).reshape(H, -1)
            zeros = torch.zeros(H, self.num_bins, dtype=torch.float64, device=probs.device)
            return zeros.scatter_add_(1, index, flat).cpu()

        self.attention_sum[call.layer_idx] += by_bin(probs)
        self.pair_count[call.layer_idx] += by_bin(torch.ones_like(probs))

    def state(self) -> dict[str, Tensor]:
        return {"attention_sum": self.attention_sum, "pair_count": self.pair_count}

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        per_head = safe_div(self.attention_sum, self.pair_count)  # (L, H, bins)
        curve = safe_div(self.attention_sum.sum(1), self.pair_count.sum(1))  # pair-weighted over heads = mean
        out.add_indexed("mean_attention", curve, ~torch.isnan(curve), ("layer", "position"))
        centres = (torch.arange(self.num_bins, dtype=torch.float64) + 0.5) * self.bin_width
        L, H, _ = per_head.shape
        for layer in range(L):
            heads = [(head, per_head[layer, head], self.pair_count[layer, head]) for head in range(H)]
            for head, values, counts in [*heads, (None, curve[layer], self.pair_count[layer].sum(0))]:
                exponent, r2 = fit_power_law(torch.nan_to_num(values, nan=0.0), counts, centres, "uniform")
                if exponent == exponent:
                    prefix = "" if head is not None else "layer_"
                    out.add(f"{prefix}power_law_exponent", exponent, layer, head)
                    out.add(f"{prefix}power_law_r2", r2, layer, head)
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        return {"bin_width": self.bin_width, "max_distance": self.max_distance,
                "distance": "Euclidean distance between the tokens' coordinates; position = bin index"}
