"""A-STAR: attention segregation and retention losses on text→image cross-attention maps, and the latent update.

Agarwal et al., ICCV 2023, "A-STAR: Test-time Attention Segregation and Retention for Text-to-image Synthesis"
(arXiv 2306.14544; METHODS.md #43, medium/low confidence: the equations below are attnlab's reading of the paper's
Eq. 2 and 3, not checked against released code). For concept tokens c_1 … c_K (text token indices) with spatial maps
A_k at denoising step t (:mod:`attnlab.functional.cross_maps`; each map divided by its maximum first, **our choice**,
so overlaps compare shapes, not total mass), and the soft IoU ``IoU(X, Y) = Σ_p min(X, Y) / Σ_p max(X, Y)``:

- segregation (Eq. 2): ``L_seg = Σ_{m<n} IoU(A_m, A_n)``: 0 for disjoint maps, K(K-1)/2 for identical ones;
- retention (Eq. 3): ``L_ret = Σ_k (1 - IoU(A_k, B_k))`` with B_k the binarised map carried from the previous step
  (``A_k ≥ threshold``, threshold 0.5 of the peak, our choice): 0 when the map keeps its earlier support exactly;
- update: ``z_t ← z_t - α_t ∇_{z_t} (L_seg + L_ret)`` (:func:`astar_update`), with α_t from :func:`step_sizes`
  (Attend-and-Excite's schedule, 20 decaying linearly to 10 over the first half of the steps; our default, the
  paper builds on that code but its values were not recovered).

Measurement: :class:`CrossMapRecorder` (a probs-stage edit that keeps the image×text block of the probs, with its
autograd graph when the forward has one) and :func:`astar_trace` (both losses per step for a recorded run).
Test time: :func:`latent_gradient` (loss and ∂loss/∂latents through a differentiable forward) and
:func:`astar_update`.

Shapes: maps (B, T, F, R, C) or (T, F, R, C); ``concepts`` K distinct indices into T; masks (B, K, F, R, C) bool.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from attnlab.edits.base import AttentionCall, Edit
from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.cross_maps import (  # the losses are pure maths; re-exported here with the update rule
    THRESHOLD, astar_loss, binarise, concept_maps, retention_loss, segregation_loss, soft_iou, spatial_maps,
    token_positions,
)
from attnlab.params import IndexList, validated
from attnlab.roles import IMAGE, TEXT

__all__ = ["CrossMapRecorder", "astar_loss", "astar_trace", "astar_update", "binarise", "concept_maps",
           "latent_gradient", "retention_loss", "segregation_loss", "soft_iou", "step_sizes"]

def latent_gradient(forward: Callable[[Tensor], Tensor], latents: Tensor, concepts: Sequence[int],
                    masks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The A-STAR loss of a differentiable forward and its gradient w.r.t. the latents.

    Args:
        forward: latents → maps (B, T, F, R, C) with an autograd graph back to the latents (e.g. a transformer call
            inside a Session with a :class:`CrossMapRecorder`, then ``recorder.maps(...)``).
        latents: the latents of the current step (any shape); not modified.
    Returns:
        ``(loss (B,) detached, grad)`` with grad = ∂(Σ_b loss_b)/∂latents, latents' shape.
    Raises:
        ConfigError: the maps do not depend on the latents (no graph: a forward under ``torch.no_grad``).
    """
    z = latents.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = astar_loss(forward(z), concepts, masks)
        if not loss.requires_grad:
            raise ConfigError("the maps carry no gradient to the latents: run the forward with autograd on (not under "
                              "torch.no_grad) and record the maps with CrossMapRecorder")
        (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), grad


def astar_update(latents: Tensor, loss_or_grad: Tensor, step_size: float) -> Tensor:
    """One A-STAR step ``z ← z - α ∇_z L`` (detached result).

    Args:
        latents: z. loss_or_grad: the gradient (latents' shape), or a loss tensor with a graph to ``latents`` (its
            sum is differentiated). step_size: α ≥ 0.
    """
    if step_size < 0:
        raise ConfigError(f"step_size must be >= 0, got {step_size}")
    if loss_or_grad.shape == latents.shape and not loss_or_grad.requires_grad:
        grad = loss_or_grad
    else:
        (grad,) = torch.autograd.grad(loss_or_grad.sum(), latents)
    return (latents - step_size * grad).detach()


def step_sizes(num_steps: int, scale: float = 20.0, decay: tuple[float, float] = (1.0, 0.5),
               active_fraction: float = 0.5) -> list[float]:
    """α_t per denoising step: ``scale`` × a factor decaying linearly from decay[0] to decay[1] over the first
    ``active_fraction`` of the steps, then 0 (no update). Defaults follow Attend-and-Excite's released schedule
    (our default for A-STAR, METHODS.md #43)."""
    if num_steps < 1 or not 0.0 < active_fraction <= 1.0 or scale < 0:
        raise ConfigError(f"step_sizes needs num_steps >= 1, scale >= 0 and active_fraction in (0, 1], got "
                          f"{num_steps}, {scale}, {active_fraction}")
    active = max(1, round(num_steps * active_fraction))
    factors = torch.linspace(decay[0], decay[1], active).tolist()
    return [scale * f for f in factors] + [0.0] * (num_steps - active)


class CrossMapRecorder(Edit):
    """A probs-stage edit that returns the probs unchanged and keeps their image-query × text-key block, per
    (denoising step, layer), averaged over heads, *with* its autograd graph when the forward has one.

    It is the smallest mechanism that lets a loss reach the latents through attention probs: an edit runs inside
    the eager kernel before the output is formed, while probes only see detached copies. Being a non-identity
    edit, it moves its layers to the eager path (choose them with ``layers=``). Calls without image queries or
    text keys (self-attention over patches) are skipped. Not registered as a spec name: use it from Python::

        recorder = CrossMapRecorder(layers=cross_layers, tokens=(2, 5))
        with DiffusionSession(transformer, edits=[recorder]):
            transformer(**inputs)
        maps = recorder.maps(step=0)     # (B, T', F, R, C), T' = len(tokens)

    Args:
        layers: attention layers to record (None = every layer with a text→image block).
        tokens: text token indices to keep, in ascending order (None = all text tokens); keeping only the
            concepts saves memory (concept indices then count among the kept tokens).
        detach: store detached maps (measurement only) instead of keeping the graph.

    A Session clears the records when it starts (``Edit.reset``): read them before reusing the recorder.

    Attributes:
        records: {(step, layer): [(B, P, T') per forward]} (CFG as two forwards gives two entries per step).
        grids: {layer: (frames, rows, cols)} as the calls reported them.
    """

    name = "record_cross_maps"
    stage = "probs"
    identity: ClassVar[dict[str, Any] | None] = None
    observes_only: ClassVar[bool] = True  # changes no output by design (the session's "changed no output" note)

    @validated
    def __init__(self, layers: IndexList | None = None, tokens: IndexList | None = None, detach: bool = False) -> None:
        super().__init__(layers=layers)
        self.tokens, self.detach = tokens, detach
        self._records: dict[tuple[int, int], list[Tensor]] = {}
        self.grids: dict[int, tuple[int, int, int]] = {}
        self._open: dict[int, list[Any]] = {}  # layer → [call, (B, P, T') rows so far, (P,) rows filled]

    def params(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "detach": self.detach} if self.tokens else {"detach": self.detach}

    def reset(self) -> None:
        super().reset()
        self._records, self.grids, self._open = {}, {}, {}

    def probs_mod(self, probs: Tensor, q_index: Tensor, keep: Tensor | None, call: AttentionCall) -> Tensor:
        qroles, kroles = call.query_roles, call.key_roles
        if qroles is None or kroles is None or call.kind == "self":
            return probs
        q_index = q_index.to(qroles.device)
        rows = token_positions(qroles[:, q_index], IMAGE)  # image query rows of this block
        cols = token_positions(kroles[:, : probs.shape[-1]], TEXT)  # text key columns
        if self.tokens is not None:
            cols = cols[[t for t in self.tokens if t < cols.numel()]]
        if rows.numel() == 0 or cols.numel() == 0:
            return probs
        part = probs.index_select(2, rows.to(probs.device)).index_select(3, cols.to(probs.device)).mean(dim=1)
        part = part.detach() if self.detach else part  # (B, n_img, T')
        patches = token_positions(qroles, IMAGE)  # every image query column of the call, ascending
        ranks = torch.searchsorted(patches, q_index[rows]).to(part.device)
        entry = self._open.get(call.layer_idx)
        if entry is None or entry[0] is not call:  # a new call of this layer: file the previous one
            self._flush(call.layer_idx)
            entry = [call, part.new_zeros(part.shape[0], patches.numel(), part.shape[2]),
                     torch.zeros(patches.numel(), dtype=torch.bool, device=part.device)]
            self._open[call.layer_idx] = entry
        # out of place, so the graph reaches every row; a later pass over the same rows (the session measures an
        # edit's effect on a few rows under no_grad before the main pass) is overwritten by the main pass
        entry[1] = entry[1].index_copy(1, ranks, part.to(entry[1].dtype))
        entry[2][ranks] = True
        return probs

    def _flush(self, layer: int) -> None:
        """File the open call of ``layer`` under (step, layer) if every patch row arrived (else drop it)."""
        entry = self._open.pop(layer, None)
        if entry is None or not bool(entry[2].all()):
            return
        call, full = entry[0], entry[1]
        self.grids[layer] = tuple(call.grid or (1, 1, full.shape[1]))  # type: ignore[assignment]
        self._records.setdefault((0 if call.step is None else call.step, layer), []).append(full)

    @property
    def records(self) -> dict[tuple[int, int], list[Tensor]]:
        """{(step, layer): [(B, P, T') per forward]}, every completed call filed."""
        for layer in list(self._open):
            self._flush(layer)
        return self._records

    def recorded_steps(self) -> list[int]:
        """The denoising steps recorded, ascending."""
        return sorted({step for step, _ in self.records})

    def maps(self, step: int, layers: Sequence[int] | None = None, forward: int = -1) -> Tensor:
        """(B, T', F, R, C): the recorded maps of ``step``, averaged over ``layers`` (None = every recorded layer),
        from the ``forward``-th forward of that step (-1 = the last; CFG's conditional pass is usually 0).

        Raises:
            ConfigError: nothing recorded for that step/layers. ShapeError: the layers' grids differ.
        """
        chosen = [(s, layer) for (s, layer) in sorted(self.records)
                  if s == step and (layers is None or layer in layers)]
        if not chosen:
            raise ConfigError(f"no cross maps recorded for step {step} and layers {layers}; recorded: "
                              f"{sorted(self.records)}")
        grids = {self.grids[layer] for _, layer in chosen}
        if len(grids) != 1:
            raise ShapeError(f"the chosen layers have different patch grids {sorted(grids)}; choose layers of one grid")
        stacked = torch.stack([self.records[key][forward] for key in chosen])  # (L, B, P, T')
        return spatial_maps(stacked[:, :, None], grids.pop())  # heads already averaged: H = 1


def astar_trace(recorder: CrossMapRecorder, concepts: Sequence[int], layers: Sequence[int] | None = None,
                threshold: float = THRESHOLD, forward: int = -1) -> list[dict[str, Any]]:
    """A-STAR's two losses per recorded step (the measurement; no update): one dict per (step, sequence) with
    ``denoising_step``, ``sequence``, ``segregation`` (NaN with < 2 concepts) and ``retention`` (against the
    previous recorded step's binarised maps; NaN at the first step). ``concepts`` index the recorder's kept
    tokens (all text tokens unless it was given ``tokens=``)."""
    rows: list[dict[str, Any]] = []
    masks = None
    for step in recorder.recorded_steps():
        maps = recorder.maps(step, layers, forward).detach().double()
        seg = segregation_loss(maps, concepts) if len(concepts) >= 2 else torch.full((maps.shape[0],), float("nan"))
        ret = retention_loss(maps, concepts, masks) if masks is not None and masks.shape[0] == maps.shape[0] \
            else torch.full((maps.shape[0],), float("nan"))
        for b in range(maps.shape[0]):
            rows.append({"denoising_step": step, "sequence": b, "segregation": float(seg[b]),
                         "retention": float(ret[b])})
        masks = binarise(maps, concepts, threshold)
    return rows
