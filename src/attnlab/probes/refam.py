"""RefAM in a diffusion Session: per-layer global-attention-sink scores of the text tokens, and the grounding map.

Kukleva et al. 2025, RefAM (METHODS.md #16, low confidence; the rules are :mod:`attnlab.probes.refam_maps`'s). On every
attention call with image queries and text keys (cross calls; the image×text block of joint calls), per layer l and
text token t (its index among the call's text keys), pooled over sequences and patches of every call seen:

- ``text_share``: t's share of the attention image queries pay to text (head-averaged);
- ``enrichment`` = text_share × (number of real text tokens): 1 = uniform;
- ``coverage``: the fraction of (sequence, patch) pairs that give t at least its uniform share of their text mass;
- ``gas``: 1 where enrichment ≥ ``min_enrichment`` and coverage ≥ ``min_coverage`` (our thresholds, 2 and 0.9).

The grounding map (extras) sums the per-token maps of batch row ``map_sequence`` (default -1, the last row: the
conditional half of diffusers' CFG batches) over the layers in ``layers`` (None = every layer with a text→image
block), drops the ``magnets`` and the tokens that are a GAS in any of those layers, and averages the rest
(:func:`attnlab.probes.refam_maps.grounding_map`). A Session that clones probes per denoising step gives one map per
step; merged states (``per_step=False``) sum the steps. Rows use ``position`` for the text token index.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import Tensor

from attnlab.functional.cross_maps import check_grid, token_positions
from attnlab.probes.refam_maps import content_indices, grounding_map, peak_point, threshold_mask
from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.attention import BlockView
from attnlab.params import IndexList, Range, validated
from attnlab.probes import PROBES
from attnlab.probes.base import AttentionCall, ModelFacts, Probe, Row, RowWriter, safe_div
from attnlab.report.sections import Heatmap, LayerCurve, Section, Series
from attnlab.roles import IMAGE, TEXT

_STATE = ("mass", "covered", "text_valid", "patches", "valid_text", "sequences", "token_map", "map_layers")


@PROBES.register("refam")
class RefAMProbe(Probe):
    """Global-attention-sink scores per (layer, text token) and the grounding map of the content tokens.

    Args:
        magnets: text token indices to leave out of the grounding map (e.g. from
            :func:`attnlab.probes.refam_maps.magnet_indices` on the caption's tokens); None = none.
        layers: layers summed into the grounding map (None = every layer with a text→image block).
        min_enrichment, min_coverage: the GAS thresholds (defaults 2.0 and 0.9; our choice).
        map_sequence: the batch row whose maps make the grounding map (default -1: the last row).
    """

    needs = frozenset({"probs"})

    sections = (Section("probe-refam", "RefAM: global attention sinks among the text tokens", (
        Heatmap((Series("enrichment", "text-token enrichment", "share × text tokens (1 = uniform)", vmin=0.0),
                 Series("coverage", "coverage", "fraction of patches (0–1)", vmin=0.0, vmax=1.0)),
                columns="position", xlabel="text token",
                alt="Heatmaps of each text token's attention enrichment and coverage per layer",
                caption="Per layer (rows) and text token (columns): the token's share of the attention image "
                        "patches pay to text, over the uniform share, and the fraction of patches that give it at "
                        "least its uniform share. A global attention sink is high in both."),
        LayerCurve((Series("gas", "global attention sinks"),), title="GAS per layer", ylabel="sink tokens (mean)",
                   alt="Global attention sinks per layer", caption="Mean over text tokens of the GAS flag."),
    )),)

    @validated
    def __init__(self, magnets: IndexList | None = None, layers: IndexList | None = None,
                 min_enrichment: Annotated[float, Range(ge=1.0)] = 2.0,
                 min_coverage: Annotated[float, Range(gt=0.0, le=1.0)] = 0.9, map_sequence: int = -1) -> None:
        self.magnets, self.layers = magnets, layers
        self.min_enrichment, self.min_coverage, self.map_sequence = min_enrichment, min_coverage, map_sequence

    def bind(self, facts: ModelFacts) -> None:
        super().bind(facts)
        L = facts.num_layers
        self.mass = torch.zeros(L, 0, dtype=torch.float64)  # (L, T) Σ head-mean attention to text token t
        self.covered = torch.zeros(L, 0, dtype=torch.float64)  # (L, T) (sequence, patch) pairs at ≥ fair share
        self.text_valid = torch.zeros(L, 0, dtype=torch.float64)  # (L, T) sequences where text token t is real
        self.patches = torch.zeros(L, dtype=torch.float64)  # (L,) (sequence, patch) pairs seen
        self.valid_text = torch.zeros(L, dtype=torch.float64)  # (L,) Σ over sequences of their real text tokens
        self.sequences = torch.zeros(L, dtype=torch.float64)  # (L,) sequences × calls seen
        self.token_map = torch.zeros(0, 0, dtype=torch.float64)  # (T, P) summed over map layers and calls
        self.map_layers = torch.zeros(L, dtype=torch.float64)  # (L,) calls summed into token_map per layer
        self.grid: tuple[int, int, int] | None = None

    # accumulation -----------------------------------------------------------------------------------------------
    def _grow(self, num_text: int, num_patches: int | None = None) -> None:
        if self.mass.shape[1] < num_text:
            pad = num_text - self.mass.shape[1]
            self.mass = torch.nn.functional.pad(self.mass, (0, pad))
            self.covered = torch.nn.functional.pad(self.covered, (0, pad))
            self.text_valid = torch.nn.functional.pad(self.text_valid, (0, pad))
        if num_patches is not None:
            if self.token_map.numel() and self.token_map.shape[1] != num_patches:
                raise ShapeError(f"refam: the grounding layers have {self.token_map.shape[1]} and {num_patches} "
                                 "patches; choose layers of one grid with layers=")
            rows = max(num_text, self.token_map.shape[0])
            if self.token_map.shape != (rows, num_patches):
                grown = torch.zeros(rows, num_patches, dtype=torch.float64)
                grown[: self.token_map.shape[0], : self.token_map.shape[1]] = self.token_map
                self.token_map = grown

    def begin_call(self, call: AttentionCall) -> None:
        self._active = False
        if call.query_roles is None or call.key_roles is None or getattr(call, "kind", None) == "self":
            return
        self._images = token_positions(call.query_roles, IMAGE).to(call.device)
        self._texts = token_positions(call.key_roles, TEXT).to(call.device)
        if self._images.numel() == 0 or self._texts.numel() == 0:
            return
        if not -call.batch <= self.map_sequence < call.batch:
            raise ConfigError(f"refam map_sequence={self.map_sequence} but the call has batch {call.batch} "
                              f"(valid: {-call.batch}…{call.batch - 1})")
        self._active = True
        T, P = self._texts.numel(), self._images.numel()
        self._text_ok = call.key_valid[:, self._texts].to(torch.float64)  # (B, T)
        self._in_map = self.layers is None or call.layer_idx in self.layers
        self._grow(T, P if self._in_map else None)
        if self._in_map:
            grid = getattr(call, "grid", None) or (1, 1, P)
            self.grid = check_grid(tuple(grid), P)
            self.map_layers[call.layer_idx] += 1
        self.valid_text[call.layer_idx] += float(self._text_ok.sum())
        self.text_valid[call.layer_idx, :T] += self._text_ok.sum(dim=0).cpu()
        self.sequences[call.layer_idx] += self._text_ok.shape[0]

    def update(self, call: AttentionCall, block: BlockView) -> None:
        if not self._active:
            return
        q_index = block.q_index.to(self._images.device)
        is_image = torch.isin(q_index, self._images)
        if not bool(is_image.any()):
            return
        cols = self._texts[self._texts < block.probs.shape[-1]]
        a = block.probs.index_select(2, is_image.nonzero().flatten()).index_select(3, cols).double().mean(dim=1)
        T = cols.numel()  # a: (B, n_img, T) head-mean attention of this block's image queries to the text keys
        ok = self._text_ok[:, None, :T] * call.query_valid[:, q_index[is_image]].double()[..., None]  # (B, n, T)
        a = a * ok
        fair = a.sum(dim=-1, keepdim=True) / self._text_ok.sum(dim=1).clamp_min(1)[:, None, None]
        layer = call.layer_idx
        self.mass[layer, :T] += a.sum(dim=(0, 1)).cpu()
        self.covered[layer, :T] += (((a >= fair) & (fair > 0)).double() * ok).sum(dim=(0, 1)).cpu()
        self.patches[layer] += float(call.query_valid[:, q_index[is_image]].sum())  # (sequence, patch) pairs
        if self._in_map:
            ranks = torch.searchsorted(self._images, q_index[is_image])
            self.token_map[:T, ranks.cpu()] += a[self.map_sequence].T.cpu()

    # results ----------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in _STATE}

    def merge(self, other: Probe) -> None:  # states grow with the text length and the grid: pad, then add
        assert isinstance(other, RefAMProbe)
        self._grow(other.mass.shape[1], other.token_map.shape[1] if other.token_map.numel() else None)
        other._grow(self.mass.shape[1], self.token_map.shape[1] if self.token_map.numel() else None)
        for name in _STATE:
            getattr(self, name).add_(getattr(other, name))
        self.grid = self.grid or other.grid

    def scores(self) -> tuple[Tensor, Tensor, Tensor]:
        """(enrichment, coverage, gas) each (L, T): NaN / False where a layer saw no text→image call."""
        share = safe_div(self.mass, self.mass.sum(dim=1, keepdim=True))
        enrichment = share * safe_div(self.valid_text, self.sequences)[:, None]  # × real text tokens per sequence
        coverage = safe_div(self.covered, self.patches[:, None].expand_as(self.covered))
        gas = (enrichment >= self.min_enrichment) & (coverage >= self.min_coverage)
        return enrichment, coverage, gas

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        if self.mass.shape[1] == 0:
            return out.rows
        enrichment, coverage, gas = self.scores()
        seen = ((self.patches > 0)[:, None].expand_as(self.mass) & (self.mass.sum(dim=1, keepdim=True) > 0)
                & (self.text_valid > 0))  # a text slot that was padding in every sequence has no row
        share = safe_div(self.mass, self.mass.sum(dim=1, keepdim=True))
        for stat, values in (("text_share", share), ("enrichment", enrichment), ("coverage", coverage),
                             ("gas", gas.double())):
            out.add_indexed(stat, values, seen & ~torch.isnan(values), ("layer", "position"))
        return out.rows

    def grounding(self) -> dict[str, Any] | None:
        """The grounding map and what made it (None before any grounding layer was seen)."""
        if not self.token_map.numel() or self.grid is None:
            return None
        T = self.token_map.shape[0]
        _, _, gas = self.scores()
        chosen = self.map_layers > 0
        sinks = gas[chosen].any(dim=0) if bool(chosen.any()) else torch.zeros(T, dtype=torch.bool)
        padding = (self.text_valid[chosen].sum(dim=0)[:T] == 0).nonzero().flatten().tolist()  # never a real token
        try:
            content = content_indices(T, sorted({m for m in (self.magnets or ()) if m < T} | set(padding)), sinks[:T])
        except ConfigError:
            return None
        g = grounding_map(self.token_map.reshape(T, *self.grid), content)
        return {"grounding": g.tolist(), "grid": list(self.grid), "peak": peak_point(g).tolist(),
                "mask_fraction": float(threshold_mask(g).double().mean()), "content_tokens": content,
                "gas_tokens": sinks.nonzero().flatten().tolist()}

    def extras(self, decode: Any = None) -> dict[str, Any]:
        return {"min_enrichment": self.min_enrichment, "min_coverage": self.min_coverage,
                "magnets": list(self.magnets or ()), "grounding": self.grounding()}
