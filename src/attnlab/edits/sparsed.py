"""``sparsed``: SparseD's head-specific block-sparse attention for diffusion language models, with its schedule."""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits.base import AttentionCall, Edit
from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.attention import BlockView
from attnlab.functional.sparse_masks import sparsed_block_keep
from attnlab.params import IndexList, Range, validated

__all__ = ["SparseD", "generation_block"]


def generation_block(kv_len: int, block_size: int, gen_len: int | None) -> int:
    """``last``: the first key block of the generated (masked) region, the repo's rule: the first block ``idx`` with
    ``kv_len − idx · b ≤ gen_len``, or the final block (also when ``gen_len`` is None)."""
    blocks = -(-kv_len // block_size)
    if gen_len is not None:
        for idx in range(blocks):
            if kv_len - idx * block_size <= gen_len:
                return idx
    return blocks - 1


@EDITS.register("sparsed")
class SparseD(Edit):
    """SparseD (Wang et al. 2026, ICLR; METHODS.md #28): full attention for the early denoising steps, then a
    head-specific block pattern selected once and reused, plus re-selection in the generated region.

    Steps are ``call.step`` (0-based; a diffusion session counts them, a text Session gets
    ``session.set_step(i)``, as :func:`attnlab.lab.diffusion_lm.sample` does). With ``t* = ⌊skip · num_steps⌋ + 1``
    (the repo's ``end_time``), per layer:

    - steps ``t ≤ t*`` run full attention (the edit passes them through); a step ``< t*`` forgets an earlier
      sample's pattern (a new sample starts at step 0);
    - at step t* the pattern is selected from that step's full attention probabilities A (one pass of the blocked
      kernel, :meth:`prepare`): per query block (size b) and head, the ``⌊nk · select⌋ + 1`` key blocks with the
      largest mean |A| (:func:`attnlab.functional.sparse_masks.sparsed_block_keep`), with the key blocks of the
      generated region (blocks ``≥ last``, :func:`generation_block`) cleared; then the generated region is selected
      on its own: A restricted to keys ``≥ last · b`` and renormalised (the repo's softmax over those keys), its top
      ``⌊n_gen · select⌋ + 1`` blocks OR-ed into the pattern;
    - steps ``t > t*`` attend only within the pattern's tiles. With ``reselect`` (default) the generated-region
      selection is recomputed from every later step's full probabilities and OR-ed in, taking effect at the next
      step (METHODS.md #28's reading of the paper); ``reselect=false`` keeps the released code's behaviour, which
      selects the generated region once, at t*. The prompt part is never re-selected.

    Every later step must have the shape of step t* (ShapeError otherwise). ``select=1`` keeps every block (the
    identity). Runs on the fast path (a bool mask in SDPA); the selection steps add one blocked pass over the probs.

    Args:
        num_steps: denoising steps T of a sample. skip: fraction of full-attention steps (0.2). select: fraction of
            key blocks kept per query block (0.3 with block 128, 0.5 with block 32 in the repo's scripts).
        block_size: tile side b. gen_len: tokens of the generated region at the end of the sequence (None: the
            final block). reselect: re-select the generated region at every later step.
        layers, heads: selection.

    Raises:
        ConfigError: a parameter out of range; at a call, a call without a step (no ``set_step``).
        ShapeError: a later step whose batch, heads or lengths differ from step t*'s.
    """

    stage = "mask"
    fast = True
    needs_prepare = True
    identity: ClassVar[dict[str, Any]] = {"select": 1.0}

    @validated
    def __init__(self, num_steps: Annotated[int, Range(ge=1, le=2**20)] = 128,
                 skip: Annotated[float, Range(ge=0.0, le=1.0)] = 0.2,
                 select: Annotated[float, Range(gt=0.0, le=1.0)] = 0.3,
                 block_size: Annotated[int, Range(ge=1, le=4096)] = 128,
                 gen_len: Annotated[int, Range(ge=1)] | None = None, reselect: bool = True,
                 layers: IndexList | None = None, heads: IndexList | None = None) -> None:
        super().__init__(layers=layers, heads=heads)
        self.num_steps, self.skip, self.select, self.block_size = num_steps, skip, select, block_size
        self.gen_len, self.reselect = gen_len, reselect
        self.selection_step = int(math.floor(skip * num_steps)) + 1
        self._state: dict[int, dict[str, Any]] = {}

    def params(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "skip": self.skip, "select": self.select,
                "block_size": self.block_size, "gen_len": self.gen_len, "reselect": self.reselect}

    def reset(self) -> None:
        super().reset()
        self._state = {}

    def pattern(self, layer: int) -> Tensor | None:
        """The block pattern the layer's next step uses (its re-selections so far included), bool (B, H, nq, nk), or
        None before its selection step. A copy."""
        state = self._state.get(layer)
        if state is None:
            return None
        pattern = state["pattern"].clone()
        for _, selection in state["pending"]:
            pattern[..., state["last"]:] |= selection
        return pattern

    def skip_reason(self, call: AttentionCall) -> str | None:
        """``"dense step"`` on the full-attention steps (``call.step ≤ t*``), else None. Pure (counts nothing)."""
        if self.is_identity() or call.step is None:
            return None
        return "dense step" if call.step <= self.selection_step else None

    def _step(self, call: AttentionCall) -> int:
        step = call.step
        if step is None:
            raise ConfigError("sparsed needs the denoising step of every call: run a diffusion session, or call "
                              "session.set_step(i) before each denoising step of a text Session")
        return int(step)

    # the mask stage -----------------------------------------------------------------------------------------
    def keep_mod(self, keep: Tensor, call: AttentionCall) -> Tensor | None:
        if self.is_identity():
            return None
        step = self._step(call)
        if step <= self.selection_step:
            if step < self.selection_step:
                self._state.pop(call.layer_idx, None)  # a new sample
            return None
        state = self._state.get(call.layer_idx)
        if state is None:
            raise ConfigError(f"sparsed: layer {call.layer_idx} reached step {step} without its selection step "
                              f"{self.selection_step} (steps must run in order from 0)")
        self._check_shape(state, call)
        self._merge_pending(state, step)
        bs = self.block_size
        tokens = state["pattern"].repeat_interleave(bs, dim=2).repeat_interleave(bs, dim=3)
        return keep & tokens[:, :, : call.q_len, : call.kv_len].to(keep.device)

    def _check_shape(self, state: dict[str, Any], call: AttentionCall) -> None:
        shape = (call.batch, call.num_heads, call.q_len, call.kv_len)
        if state["shape"] != shape:
            raise ShapeError(f"sparsed: layer {call.layer_idx} selected its pattern for (batch, heads, q_len, kv_len) "
                             f"{state['shape']}, got {shape}")

    @staticmethod
    def _merge_pending(state: dict[str, Any], step: int) -> None:
        """OR the generated-region selections of earlier steps into the pattern (they act from the next step on)."""
        kept = []
        for made_at, selection in state["pending"]:
            if made_at < step:
                state["pattern"][..., state["last"]:] |= selection
            else:
                kept.append((made_at, selection))
        state["pending"] = kept

    # the selection ------------------------------------------------------------------------------------------
    def prepare(self, call: AttentionCall, probs_pass: Any) -> None:
        """At step t* select the pattern; at later steps (``reselect``) re-select the generated region. Both read the
        call's full probabilities, from one pass of the blocked kernel with the edits before this one."""
        if self.is_identity():
            return
        step = self._step(call)
        state = self._state.get(call.layer_idx)
        if step < self.selection_step or (step > self.selection_step and (not self.reselect or state is None)):
            return
        if step == self.selection_step and state is not None and state["made_at"] == step:
            return  # selected already (a second forward at the same step, e.g. classifier-free guidance)
        probs = _full_probs(call, probs_pass)  # (B, H, Lq, Lk) float64
        bs, last = self.block_size, generation_block(call.kv_len, self.block_size, self.gen_len)
        generated = self._generated_selection(probs, last)
        if step == self.selection_step:
            pattern = sparsed_block_keep(probs, bs, self.select)
            pattern[..., last:] = generated
            self._state[call.layer_idx] = {"pattern": pattern, "last": last, "pending": [], "made_at": step,
                                           "shape": (call.batch, call.num_heads, call.q_len, call.kv_len)}
        else:
            self._check_shape(state, call)
            state["pending"].append((step, generated))

    def _generated_selection(self, probs: Tensor, last: int) -> Tensor:
        """bool (B, H, nq, nk − last): the top blocks of the probabilities restricted to keys ≥ last · b and
        renormalised (the repo's softmax over those keys; a row with no mass there, possible only under a model mask,
        gives zero importance)."""
        part = probs[..., last * self.block_size:]
        total = part.sum(-1, keepdim=True)
        part = torch.where(total > 0, part / total.clamp_min(torch.finfo(part.dtype).tiny), part)
        return sparsed_block_keep(part, self.block_size, self.select)


def _full_probs(call: AttentionCall, probs_pass: Any) -> Tensor:
    """(B, H, Lq, Lk) float64: the call's probabilities assembled from the blocked kernel's block views."""
    probs = torch.zeros(call.batch, call.num_heads, call.q_len, call.kv_len, dtype=torch.float64, device=call.device)

    def grab(block: BlockView) -> None:
        probs[:, :, block.q_index.to(probs.device), : block.probs.shape[-1]] = block.probs.detach().double()

    with torch.no_grad():
        probs_pass(grab)
    return probs
