"""``astar``: A-STAR's attention segregation loss, measured on a diffusion transformer's text→image attention.

Agarwal et al. 2023, "A-STAR: Test-time Attention Segregation and Retention for Text-to-image Synthesis", Eq. 2
(METHODS.md #43; medium confidence for the loss, low for its normalisation): the segregation loss of concept
tokens is Σ over pairs m < n of the soft IoU Σ min(A_m, A_n) / Σ max(A_m, A_n) of their spatial cross-attention maps,
each map averaged over heads and divided by its peak (:func:`attnlab.functional.cross_maps.segregation_loss`).
0 = the concepts attend to disjoint regions, K(K−1)/2 = identical maps.

On every call whose queries hold the patches and whose keys hold text (``cross`` calls, and the image-query ×
text-key block of ``joint`` calls; self calls are skipped) the probe builds the concept maps from all patch rows and
adds, per layer, the loss of each sequence whose concept tokens are real (a padded or empty caption, such as the
unconditional forward of classifier-free guidance, is left out). Run it in a :class:`attnlab.diffusion.DiffusionSession` (per-step rows
then carry ``denoising_step``: the loss across denoising, as A-STAR plots it). The retention loss compares a step
with the one before, so it is not a per-call statistic: :func:`attnlab.diffusion.astar.astar_trace` gives both.

Statistics (per layer): ``segregation`` (mean over calls and sequences); per (layer, position = concept number k):
``concept_share``, the mean share of a patch's text attention that goes to concept token k.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.functional.attention import BlockView
from attnlab.functional.cross_maps import segregation_loss, token_positions
from attnlab.params import IndexList, validated
from attnlab.probes import PROBES
from attnlab.probes.base import AttentionCall, ModelFacts, Probe, Row, RowWriter, safe_div
from attnlab.report.sections import LayerCurve, Section, Series
from attnlab.roles import IMAGE, TEXT


@PROBES.register("astar")
class AStarProbe(Probe):
    """A-STAR's segregation loss of chosen concept tokens per layer (module docstring).

    Args:
        concepts: indices of the concept tokens among each call's text tokens (at least 2), e.g. ``concepts=2+6``
            for the two nouns of "a red circle and a blue square".

    Raises:
        ConfigError: fewer than 2 concepts; at a call, a concept index past the call's text tokens.
    """

    needs = frozenset({"probs", "every_row"})  # a map needs every patch row: never a query_fraction sample
    sections = (Section("probe-astar", "A-STAR segregation of concept maps", (
        LayerCurve((Series("segregation", "segregation loss"),), title="segregation loss per layer",
                   ylabel="Σ pairwise IoU", alt="A-STAR segregation loss per layer",
                   caption="Σ over concept pairs of the soft IoU of their peak-normalised cross-attention maps "
                           "(0 = disjoint, K(K−1)/2 = identical); the per-step view is in 'By denoising step'."),
    )),)
    shardable = True  # additive tensors

    @validated
    def __init__(self, concepts: IndexList) -> None:
        self.concepts = list(concepts)
        if len(self.concepts) < 2:
            raise ConfigError(f"astar needs at least 2 concept tokens (concepts=2+6), got {self.concepts}")

    def bind(self, facts: ModelFacts) -> None:
        super().bind(facts)
        L, K = facts.num_layers, len(self.concepts)
        self.loss_sum = torch.zeros(L, dtype=torch.float64)
        self.sequences = torch.zeros(L, dtype=torch.float64)
        self.share_sum = torch.zeros(L, K, dtype=torch.float64)
        self.share_rows = torch.zeros(L, K, dtype=torch.float64)

    def begin_call(self, call: AttentionCall) -> None:
        self._maps: Tensor | None = None
        if call.kind not in ("cross", "joint") or call.grid is None or call.query_roles is None \
                or call.key_roles is None:
            return
        self._rows = token_positions(call.query_roles, IMAGE).to(call.device)  # patch rows, raster order
        text = token_positions(call.key_roles, TEXT).to(call.device)
        if self._rows.numel() == 0 or text.numel() == 0:
            return
        if max(self.concepts) >= text.numel():
            raise ConfigError(f"astar: concepts={self.concepts} but layer {call.layer_idx}'s calls have "
                              f"{text.numel()} text tokens (0…{text.numel() - 1})")
        self._text = text
        self._columns = text[torch.tensor(self.concepts, device=call.device)]
        self._maps = torch.zeros(call.batch, len(self.concepts), self._rows.numel(), dtype=torch.float64,
                                 device=call.device)
        self._shares = torch.zeros(call.batch, len(self.concepts), dtype=torch.float64, device=call.device)

    def update(self, call: AttentionCall, block: BlockView) -> None:
        if self._maps is None:
            return
        in_block = torch.isin(block.q_index.to(self._rows.device), self._rows)
        rows = in_block.nonzero().flatten()
        if rows.numel() == 0:
            return
        patch = torch.searchsorted(self._rows, block.q_index.to(self._rows.device)[rows])  # raster index of each row
        probs = block.probs.index_select(2, rows).double().mean(dim=1)  # (B, n, width), mean over heads
        if probs.shape[-1] < call.kv_len:  # the kernel drops trailing keys no row sees (padded caption tokens)
            probs = torch.nn.functional.pad(probs, (0, call.kv_len - probs.shape[-1]))
        concept = probs.index_select(2, self._columns)  # (B, n, K)
        self._maps[:, :, patch] = concept.transpose(1, 2)
        text_mass = probs.index_select(2, self._text).sum(dim=-1, keepdim=True)  # (B, n, 1)
        self._shares += safe_div(concept, text_mass).nan_to_num(0.0).sum(dim=1)

    def end_call(self, call: AttentionCall) -> None:
        if self._maps is None:
            return
        frames, rows, cols = call.grid
        # sequences whose concept tokens are real (not padding: e.g. the empty caption of classifier-free guidance)
        real = call.key_valid.index_select(1, self._columns).all(dim=1)
        self._maps = None if not bool(real.any()) else self._maps
        if self._maps is None:
            return
        maps = self._maps[real].reshape(-1, len(self.concepts), frames, rows, cols)
        loss = segregation_loss(maps, list(range(len(self.concepts))))  # (B_real,)
        layer = call.layer_idx
        self.loss_sum[layer] += float(loss.sum())
        self.sequences[layer] += int(real.sum())
        self.share_sum[layer] += self._shares[real].sum(dim=0).cpu()
        self.share_rows[layer] += int(real.sum()) * self._rows.numel()
        self._maps = None

    def state(self) -> dict[str, Tensor]:
        return {"loss_sum": self.loss_sum, "sequences": self.sequences, "share_sum": self.share_sum,
                "share_rows": self.share_rows}

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        seen = self.sequences > 0
        out.add_indexed("segregation", safe_div(self.loss_sum, self.sequences), seen, ("layer",))
        out.add_indexed("concept_share", safe_div(self.share_sum, self.share_rows), self.share_rows > 0,
                        ("layer", "position"))
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        return {"concepts": self.concepts}
