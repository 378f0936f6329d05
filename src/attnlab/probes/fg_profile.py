"""ProfilingDiT's foreground/background attention profile per attention layer of a diffusion transformer.

Ma et al. 2025 (METHODS.md #44; the profile's formula is attnlab's, :mod:`attnlab.diffusion.profiling`): given a
foreground mask over the patches, per layer with image queries and image keys (self-attention over patches; the
image×image block of joint calls), pooled over sequences, queries and calls:

- ``fg_share`` = Σ attention to foreground patches / Σ attention to all patches (head-averaged);
- ``fg_preference`` = logit(fg_share) - logit(fg_area): > 0 foreground-focused, < 0 background-focused, 0 when
  attention follows area.

Cross calls (text keys only) are skipped. A Session that clones probes per denoising step gives one profile per
step (the paper's "consistent preference" is the sign across steps); ``per_step=False`` pools the steps.
:func:`attnlab.diffusion.profiling.block_preference` and ``classify_blocks`` turn the layer values into block
classes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab.functional.cross_maps import token_positions
from attnlab.functional.cross_maps import foreground_share, preference
from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.attention import BlockView
from attnlab.params import validated
from attnlab.probes import PROBES
from attnlab.probes.base import AttentionCall, ModelFacts, Probe, Row, RowWriter, safe_div
from attnlab.report.sections import LayerCurve, Section, Series
from attnlab.roles import IMAGE


@PROBES.register("fg_profile")
class ForegroundProfileProbe(Probe):
    """Attention share on a foreground mask's patches, and the preference over its area, per layer.

    Args:
        foreground: bool mask over the patches, (frames, rows, cols) or (P,) in raster order (e.g. a lab scene's
            object mask at patch resolution, or :func:`attnlab.probes.refam_maps.threshold_mask` of a grounding map).
            From Python only. It must mark some patches and leave some out.

    Raises:
        ConfigError: an empty or full mask. ShapeError (at a call): the call's patch count differs from the mask's.
    """

    needs = frozenset({"probs"})
    sections = (Section("probe-fg-profile", "Foreground/background attention profile", (
        LayerCurve((Series("fg_preference", "foreground preference"),), title="foreground preference per layer",
                   ylabel="logit(fg share) - logit(fg area)", alt="Foreground preference per layer",
                   caption="Above 0: the layer's image queries attend to the foreground more than its area; below "
                           "0: to the background (ProfilingDiT's foreground- and background-focused blocks)."),
        LayerCurve((Series("fg_share", "share on the foreground"),), title="attention share on the foreground",
                   ylabel="share (0–1)", ylim=(0.0, 1.0), alt="Attention share on the foreground per layer",
                   caption="Share of image-to-image attention that lands on foreground patches (mean over heads)."),
    )),)
    shardable = True  # three additive tensors; the layer → block map travels as a side part

    @validated
    def __init__(self, foreground: Tensor) -> None:
        self.foreground = foreground.reshape(-1).bool().cpu()
        area = float(self.foreground.double().mean()) if self.foreground.numel() else 0.0
        if not 0.0 < area < 1.0:
            raise ConfigError(f"fg_profile needs a foreground mask with some patches in and some out, got "
                              f"{int(self.foreground.sum())} of {self.foreground.numel()}")
        self.area = area

    def bind(self, facts: ModelFacts) -> None:
        super().bind(facts)
        L = facts.num_layers
        self.fg_mass = torch.zeros(L, dtype=torch.float64)
        self.image_mass = torch.zeros(L, dtype=torch.float64)
        self.calls = torch.zeros(L, dtype=torch.float64)
        self.layer_block: dict[int, int] = {}  # layer → transformer block (call.block), for block_preference

    def begin_call(self, call: AttentionCall) -> None:
        self._active = False
        if call.query_roles is None or call.key_roles is None:
            return
        self._queries = token_positions(call.query_roles, IMAGE).to(call.device)
        self._keys = token_positions(call.key_roles, IMAGE).to(call.device)
        if self._queries.numel() == 0 or self._keys.numel() == 0:
            return
        if self._keys.numel() != self.foreground.numel():
            raise ShapeError(f"fg_profile: layer {call.layer_idx} has {self._keys.numel()} image keys, the foreground "
                             f"mask {self.foreground.numel()} patches")
        self._active = True
        self._mask = self.foreground.to(call.device)
        self.calls[call.layer_idx] += 1
        if call.block is not None:
            self.layer_block[call.layer_idx] = call.block

    def update(self, call: AttentionCall, block: BlockView) -> None:
        if not self._active:
            return
        rows = torch.isin(block.q_index.to(self._queries.device), self._queries).nonzero().flatten()
        keys = self._keys[self._keys < block.probs.shape[-1]]
        if rows.numel() == 0 or keys.numel() == 0:
            return
        probs = block.probs.index_select(2, rows).index_select(3, keys)  # (B, H, n, P')
        fg, total = foreground_share(probs, self._mask[: keys.numel()])
        self.fg_mass[call.layer_idx] += float(fg)
        self.image_mass[call.layer_idx] += float(total)

    def state(self) -> dict[str, Tensor]:
        return {"fg_mass": self.fg_mass, "image_mass": self.image_mass, "calls": self.calls}

    def shares(self) -> Tensor:
        """(L,) fg_share per layer (NaN where no image×image attention was seen)."""
        return safe_div(self.fg_mass, self.image_mass)

    def preferences(self) -> Tensor:
        """(L,) fg_preference per layer (NaN where unseen)."""
        return preference(self.shares(), self.area)

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        seen = self.image_mass > 0
        out.add_indexed("fg_share", self.shares(), seen, ("layer",))
        out.add_indexed("fg_preference", self.preferences(), seen, ("layer",))
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        return {"fg_area": self.area, "fg_patches": int(self.foreground.sum()), "patches": self.foreground.numel(),
                "layer_block": {str(k): v for k, v in sorted(self.layer_block.items())}}

    def merge(self, other: Probe) -> None:
        super().merge(other)
        self.layer_block.update(getattr(other, "layer_block", {}))

    def export_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, side = super().export_state()
        return tensors, {**side, "layer_block": {str(k): v for k, v in self.layer_block.items()}}

    def import_state(self, tensors: dict[str, Tensor], side: dict[str, Any]) -> None:
        super().import_state(tensors, side)
        self.layer_block = {int(k): int(v) for k, v in side.get("layer_block", {}).items()}
