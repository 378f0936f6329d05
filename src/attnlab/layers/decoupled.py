"""DARE's decoupled attention (Feng et al., ICLR 2025, "Long-Sequence Recommendation Models Need Decoupled
Embeddings"; METHODS.md #39): queries and keys from one embedding, values from another.

In DARE a long-sequence recommender keeps two embedding tables for the same items: an *attention* table, whose
candidate-vs-behaviour dot products search the relevant behaviours and weight them, and a *representation*
table, whose rows are the values that attention averages and the features the prediction MLP reads. The paper's
point is that one shared table (TWIN) makes the two uses fight over the same vectors. Here that is one softmax
layer whose query and key projections read ``attention_states`` (B, T, C_att) and whose value projection reads
``hidden_states`` (B, T, C). Without ``attention_states`` both come from ``hidden_states`` and the layer is plain
masked softmax attention (a TinyLM mixer).

Two options follow the released code (thuml/DARE ``model/attention_pytorch.py``, ``model/din_pytorch.py``):

- ``projections="none"``: no q/k/v/o matrices. Head h compares slice h of the attention embeddings and averages
  slice h of the representation embeddings, so the summed head logits are DARE's single score
  ``e_att(candidate)·e_att(behaviour)`` (up to the 1/√head_dim scale). That score has no positions, so this mode
  needs ``rope_base=None`` (a RoPE base is refused, not silently applied). ``"linear"`` (default) keeps the usual
  projections (the paper's "TWIN w/ proj" when both inputs are one table).
- ``top_k``: the search stage. Each query keeps the ``top_k`` visible keys with the largest head-summed logit
  (the selection carries no gradient; the kept logits do) and softmaxes over those only, as DARE's soft search
  does with ``top_k=20`` of 200 behaviours.

:func:`target_mask` lays out target attention as one sequence (behaviours, then candidates).

Shape legend: B batch, T seq_len, C hidden_size, C_att attention_size, H num_heads, Hkv num_kv_heads, D head_dim.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.masks import MaskMod, from_keep, with_name
from attnlab.functional.positions import rotary
from attnlab.layers import LAYERS
from attnlab.layers._common import PositiveInt, check_arg, check_hidden, merge_heads, split_heads
from attnlab.layers._softmax_base import SoftmaxFamilyAttention, check_keep
from attnlab.layers.base import DEFAULT_NUM_HEADS

__all__ = ["DecoupledAttention", "search_keep", "target_mask"]

PROJECTIONS = ("linear", "none")


def target_mask(num_behaviours: int) -> MaskMod:
    """Target attention as one sequence: positions 0 … T−1 are behaviours, positions ≥ T are candidates.

    A candidate row (q ≥ T) sees every behaviour (kv < T) and nothing else (not itself, not other candidates); a
    behaviour row sees only itself, so no row is empty (an empty row would give NaN in SDPA) and the behaviours'
    outputs are their own values, which the app ignores.

    Raises ConfigError unless num_behaviours is an int >= 1.
    """
    num_behaviours = check_arg("target_mask", "num_behaviours", num_behaviours, PositiveInt)

    def mask_mod(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return torch.where(q_idx < num_behaviours, kv_idx == q_idx, kv_idx < num_behaviours)

    return with_name(mask_mod, "target")


def search_keep(scores: Tensor, top_k: int) -> Tensor:
    """The search stage: per query row, the ``top_k`` keys with the largest score.

    Args:
        scores: (B, Lq, Lk) float, −inf where a key is not visible.
        top_k: keys kept per row (≥ 1); a row with fewer visible keys keeps all of them.

    Returns: bool (B, Lq, Lk), True = kept (never a key whose score is −inf). Ties go to torch.topk's choice.
    """
    k = min(top_k, scores.shape[-1])
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, scores.topk(k, dim=-1).indices, True)
    return keep & (scores > float("-inf"))


@LAYERS.register("decoupled")
class DecoupledAttention(SoftmaxFamilyAttention):
    """Softmax attention with queries/keys from ``attention_states`` and values from ``hidden_states`` (DARE).

    ``forward(hidden_states, *, attention_states=None, keep=None)``: ``attention_states`` (B, T, C_att),
    keyword-only, the attention embeddings of the same T tokens (None: ``hidden_states``); ``keep`` a per-call
    bool mask ANDed with the layer mask, in the layers' one convention ((T, T), (B, T, T) or broadcastable to
    (B, H, T, T); ``layers/_softmax_base.py``), e.g. ``to_dense(target_mask(n), 1, 1, T, T)``. Source: Feng et al. 2025
    (abstract) and the released code thuml/DARE (module docstring).

    Args:
        attention_size: C_att, the width of ``attention_states`` (default hidden_size); the q/k projections read it.
        projections: "linear" (q/k/v/o matrices) or "none" (identity; needs attention_size == hidden_size ==
            num_heads·head_dim, num_kv_heads == num_heads and rope_base=None, and the layer has no parameters).
        top_k: keys each query keeps by head-summed logit before the softmax (the search stage), or None for all.
        Other arguments as in ``MaskedAttention`` (mask_mod None = causal).

    Dtype: hidden_states and attention_states in the parameters' float dtype (float32, float64, bfloat16, float16;
    one dtype for both); the softmax runs in that dtype on the chosen path; the search scores
    (:meth:`head_summed_logits`), :meth:`search_scores` and :meth:`attention_probs` are float32.

    Raises:
        ConfigError: an unknown projections; top_k or attention_size not an int >= 1; projections="none" with
            attention_size, hidden_size and num_heads·head_dim not all equal, with num_kv_heads != num_heads or with
            a rope_base (and the base class's head-count checks).
        ShapeError (forward, search_scores, attention_probs): hidden_states not (B, T, C); attention_states not
            (B, T, C_att) in hidden_states' dtype; keep outside the per-call convention.

    Confidence (METHODS.md #39): high for the mechanism (two tables, the projection-free score, the soft top-k
    search), read in the released code; the multi-head split over slices is attnlab's layout, and the paper's
    numbers are from the abstract only.
    """

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, attention_size: int | None = None,
                 projections: Literal["linear", "none"] = "linear", top_k: int | None = None,
                 mask_mod: MaskMod | None = None, path: Literal["dense", "flex"] = "dense", compiled: bool = False,
                 rope_base: float | None = 10000.0) -> None:
        if projections not in PROJECTIONS:
            raise ConfigError(f"expected projections in {PROJECTIONS}, got {projections!r}")
        top_k = check_arg(self, "top_k", top_k, PositiveInt | None)
        attention_size = check_arg(self, "attention_size", hidden_size if attention_size is None else attention_size,
                                   PositiveInt)
        linear = None
        if projections == "none" and rope_base is not None:
            raise ConfigError(f"expected rope_base=None with projections='none' (DARE's score e_att·e_att is "
                              f"position-free), got rope_base={rope_base!r}")
        if projections == "none":
            width = hidden_size // num_heads if head_dim is None else head_dim
            if num_kv_heads not in (None, num_heads) or width * num_heads != hidden_size \
                    or attention_size != hidden_size:
                raise ConfigError("projections='none' needs attention_size == hidden_size == num_heads·head_dim and "
                                  f"num_kv_heads == num_heads, got attention_size={attention_size}, hidden_size="
                                  f"{hidden_size}, num_heads={num_heads}, head_dim={width}, num_kv_heads="
                                  f"{num_kv_heads}")
            linear = lambda n_in, n_out: nn.Identity()  # noqa: E731
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim=head_dim, mask_mod=mask_mod, path=path,
                         compiled=compiled, rope_base=rope_base, linear=linear)
        self.attention_size, self.projections, self.top_k = attention_size, projections, top_k
        if projections == "linear" and attention_size != hidden_size:  # q/k read the attention embeddings
            self.q_proj = nn.Linear(attention_size, num_heads * self.head_dim, bias=False)
            self.k_proj = nn.Linear(attention_size, self.num_kv_heads * self.head_dim, bias=False)

    def project_decoupled(self, hidden_states: Tensor, attention_states: Tensor | None,
                          position_offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """query (B, H, T, D) and key (B, Hkv, T, D) from attention_states, value (B, Hkv, T, D) from hidden_states.

        Raises ShapeError when hidden_states is not (B, T, C) or attention_states is not (B, T, C_att) in the same
        dtype.
        """
        check_hidden(hidden_states, self.hidden_size)
        if attention_states is None:
            attention_states = hidden_states
        elif (attention_states.shape != (*hidden_states.shape[:2], self.attention_size)
              or attention_states.dtype != hidden_states.dtype):
            raise ShapeError(f"expected attention_states {(*hidden_states.shape[:2], self.attention_size)} in "
                             f"{hidden_states.dtype}, got {tuple(attention_states.shape)} in {attention_states.dtype}")
        self._offset = position_offset  # positions of this call for layer_mask / dense_keep
        query = split_heads(self.q_proj(attention_states), self.num_heads)
        key = split_heads(self.k_proj(attention_states), self.num_kv_heads)
        value = split_heads(self.v_proj(hidden_states), self.num_kv_heads)
        if self.rope_base is not None:
            query = rotary(query, position_offset, self.rope_base)
            key = rotary(key, position_offset, self.rope_base)
        return query, key, value

    def _checked_keep(self, query: Tensor, key: Tensor, keep: Tensor | None) -> Tensor | None:
        """keep in the per-call convention (``_softmax_base``), as bool (B|1, H|1, Lq|1, Lk|1), or None."""
        if keep is None:
            return None
        return check_keep(keep, (query.shape[0], self.num_heads, query.shape[2], key.shape[2]), query.device)

    def _visible(self, query: Tensor, key: Tensor, keep: Tensor | None) -> Tensor:
        """bool (B, H, Lq, Lk): the layer mask at this call's positions, AND a checked ``keep`` when given."""
        visible = self.dense_keep(query, key)
        return visible if keep is None else visible & keep

    def head_summed_logits(self, query: Tensor, key: Tensor, visible: Tensor) -> Tensor:
        """The search score: Σ_h q_h·k_h / √D over query heads, float32 (B, Lq, Lk), −inf where ``visible``
        (bool (B, H, Lq, Lk)) hides the key from every head."""
        key = key.repeat_interleave(self.num_heads // key.shape[1], dim=1)
        logits = torch.einsum("bhqd,bhkd->bqk", query.float(), key.float()) * query.shape[-1] ** -0.5
        return logits.masked_fill(~visible.any(dim=1), float("-inf"))

    def per_call_mask(self, query: Tensor, key: Tensor, keep: Tensor | None) -> MaskMod | None:
        """The per-call mask of one call (ANDed with the layer mask): ``keep`` and, with ``top_k``, the search's
        selection (computed without gradient: it is discrete; the kept logits keep theirs). None when neither.

        Raises ShapeError for a keep outside the per-call convention."""
        keep = self._checked_keep(query, key, keep)
        if self.top_k is not None:
            with torch.no_grad():
                logits = self.head_summed_logits(query, key, self._visible(query, key, keep))
                search = search_keep(logits, self.top_k)[:, None]  # (B, 1, Lq, Lk)
            keep = search if keep is None else search & keep
        return None if keep is None else from_keep(keep, name="search" if self.top_k else "keep")

    def search_scores(self, hidden_states: Tensor, *, attention_states: Tensor | None = None,
                      keep: Tensor | None = None, position_offset: int = 0) -> Tensor:
        """(B, T, T) float32 search scores of one call (:meth:`head_summed_logits`), −inf for hidden keys.

        What the ``top_k`` search ranks; apps read it to see which keys the search stage retrieves."""
        query, key, _ = self.project_decoupled(hidden_states, attention_states, position_offset)
        return self.head_summed_logits(query, key, self._visible(query, key, self._checked_keep(query, key, keep)))

    def attention_probs(self, hidden_states: Tensor, *, attention_states: Tensor | None = None,
                        keep: Tensor | None = None, position_offset: int = 0) -> Tensor:
        """(B, H, T, T) float32 probs of one call as :meth:`forward` weights the values (layer mask, ``keep`` and
        the search), detached, computed by :meth:`dense_probs` (not through the host's attention function). Rows
        with no key are 0."""
        query, key, _ = self.project_decoupled(hidden_states, attention_states, position_offset)
        return self.dense_probs(query, key, mask_mod=self.per_call_mask(query, key, keep))

    def forward(self, hidden_states: Tensor, *, state: None = None, position_offset: int = 0,
                attention_states: Tensor | None = None, keep: Tensor | None = None) -> tuple[Tensor, None]:
        """hidden_states (B, T, C); attention_states (B, T, C_att) or None; keep: bool (T, T), (B, T, T) or
        broadcastable to (B, H, T, T), True = may attend, ANDed with the layer mask (a per-call, data-dependent mask
        such as the target layout of :func:`target_mask`), or None; state must be None. Returns (output (B, T, C),
        None).

        Raises ShapeError for attention_states or keep of the wrong shape or dtype."""
        offset = self.start_position(state, position_offset)
        query, key, value = self.project_decoupled(hidden_states, attention_states, offset)
        out = self.softmax_attend(query, key, value, mask_mod=self.per_call_mask(query, key, keep))
        return self.o_proj(merge_heads(out.to(hidden_states.dtype))), None
