"""TSCAN — temporal-spatial correlation attention (Yu et al. 2023, METHODS.md #37) over a (time, variable) grid.

Reconstruction, not a port: the released Keras code (yuyuheintju/TSCAN ``keras_models/split48_tandf.py``) runs two
transformer branches, one whose tokens are time steps (all variables as features) and one whose tokens are the
variables (their values in a 12-hour window as features), and concatenates them. This layer joins the two
correlations in one attention over the grid cells: a key's time half is the mean over its time node (row), its item
half the mean over its item (column), so a cell's logit splits into a time-node term plus an item term (on a fully
observed grid the attention is a time-node softmax times an item softmax; :mod:`attnlab.functional.tscan`), and a
time node or item the query scores low is suppressed on its whole row or column — the mechanism the abstract
claims ("remove irrelevant items ... and irrelevant nodes in time"). ``factorised=False`` keeps the per-token
keys: plain joint attention over the same cells, the ablation.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.masks import MaskMod, from_keep
from attnlab.functional.tscan import check_grid, observed_keep, pool_grid_keys, rotate_time, time_head_dim
from attnlab.layers import LAYERS
from attnlab.layers._common import check_hidden, merge_heads, split_heads
from attnlab.layers._softmax_base import SoftmaxFamilyAttention
from attnlab.layers.base import DEFAULT_NUM_HEADS


@LAYERS.register("tscan")
class TemporalSpatialAttention(SoftmaxFamilyAttention):
    """Softmax attention over grid cells whose keys are pooled per time node (time half) and per item (item half).

    ``forward(hidden_states, *, grid=None, observed=None)``:

    - hidden_states (B, N, C): the cells row-major, token ``t · num_vars + v`` = variable v at time slot t.
    - grid: (num_times, num_vars) with product N; None = (N, 1), the sequence as one variable: the item factor is
      then 1 and the layer is causal softmax attention on the time half of each head (a plain sequence mixer).
    - observed: (B, N) bool, True = measured (irregular sampling). Unobserved cells are left out of the row and
      column means and are never keys (each token still sees itself, so no row is empty). None = all observed.

    The head's first ``Dt = ceil(head_dim / 2)`` dims are the time half (RoPE by time slot, position
    ``position_offset // num_vars + t``), the rest the item half (no rotation). Logit scale ``head_dim ** -0.5``.
    The pooled keys see every observed cell of their row and column, so with num_vars > 1 the layer is an encoder
    over a whole window: a causal ``mask_mod`` (the default) is refused there; pass ``masks.full()``.

    Args:
        hidden_size: C. num_heads: H. num_kv_heads: Hkv (GQA) or None (= H). head_dim: default C // H (>= 2).
        factorised: True (TSCAN: pooled keys) or False (per-token keys: plain joint attention, the ablation).
        mask_mod: True = attend, on flattened token positions; None = causal. path, compiled, rope_base: as in
            ``MaskedAttention`` (rope_base None = no rotation).

    Attributes:
        record_probs: set True to keep the last call's probs as ``last_probs`` (B, H, N, N) float32, detached
            (:meth:`dense_probs`, computed beside the softmax, which still runs through ``softmax_attend`` and any
            host hook).

    Dtype: hidden_states in the parameters' float dtype (float32, float64, bfloat16, float16); the softmax runs in
    that dtype on the chosen path; ``last_probs`` is float32.

    Raises ConfigError for bad head counts, head_dim not an int >= 2, a bad grid, a causal mask with a grid of several
    variables, or a position_offset that is not a multiple of num_vars; ShapeError for bad hidden_states/observed.
    Source: Yu et al. 2023, arXiv:2306.01970 (abstract) and its released code (METHODS.md #37; medium-low
    confidence: the factorised form is attnlab's reading of the two branches, not the paper's equation).
    """

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, factorised: bool = True, mask_mod: MaskMod | None = None,
                 path: Literal["dense", "flex"] = "dense", compiled: bool = False,
                 rope_base: float | None = 10000.0) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim=head_dim, mask_mod=mask_mod, path=path,
                         compiled=compiled, rope_base=rope_base)
        if not isinstance(factorised, bool):
            raise ConfigError(f"expected factorised as a bool, got {factorised!r}")
        self.factorised = factorised
        self.time_dim = time_head_dim(self.head_dim)
        self.record_probs = False
        self.last_probs: Tensor | None = None

    def _check_observed(self, observed: Tensor | None, batch: int, num_tokens: int) -> Tensor | None:
        if observed is None:
            return None
        if not isinstance(observed, Tensor) or observed.dtype != torch.bool or observed.shape != (batch, num_tokens):
            got = f"{observed.dtype} {tuple(observed.shape)}" if isinstance(observed, Tensor) else repr(observed)
            raise ShapeError(f"expected observed as a bool tensor {(batch, num_tokens)}, got {got}")
        return observed

    def forward(self, hidden_states: Tensor, *, state: None = None, position_offset: int = 0,
                grid: tuple[int, int] | None = None, observed: Tensor | None = None) -> tuple[Tensor, None]:
        """hidden_states (B, N, C); grid (num_times, num_vars) or None; observed (B, N) bool or None.
        Returns (output (B, N, C), None)."""
        offset = self.start_position(state, position_offset)
        check_hidden(hidden_states, self.hidden_size)
        B, N, _ = hidden_states.shape
        num_times, num_vars = check_grid(grid, N)
        observed = self._check_observed(observed, B, N)
        if num_vars > 1 and getattr(self.mask_mod, "__name__", None) == "causal":
            raise ConfigError("expected a non-causal mask_mod (e.g. masks.full()) with a grid of several variables: "
                              "the pooled row and column keys see the whole window")
        if offset % num_vars:
            raise ConfigError(f"expected position_offset as a multiple of num_vars={num_vars}, got {offset}")
        self._offset = offset  # positions of this call for layer_mask
        q = split_heads(self.q_proj(hidden_states), self.num_heads)  # (B, H, N, D)
        k = split_heads(self.k_proj(hidden_states), self.num_kv_heads)  # (B, Hkv, N, D)
        v = split_heads(self.v_proj(hidden_states), self.num_kv_heads)
        if self.factorised:
            k = pool_grid_keys(k, num_times, num_vars, self.time_dim, observed)
        if self.rope_base is not None:
            q = rotate_time(q, num_times, num_vars, self.time_dim, offset // num_vars, self.rope_base)
            k = rotate_time(k, num_times, num_vars, self.time_dim, offset // num_vars, self.rope_base)
        mask_mod = None if observed is None else from_keep(observed_keep(observed), name="observed")
        if self.record_probs:
            self.last_probs = self.dense_probs(q, k, mask_mod=mask_mod)
        o = self.softmax_attend(q, k, v, mask_mod=mask_mod)  # (B, H, N, D)
        return self.o_proj(merge_heads(o.to(hidden_states.dtype))), None


__all__ = ["TemporalSpatialAttention"]
