"""Historical Prediction Attention (HPNet; Tang et al., CVPR 2024; METHODS.md #36): a forecast attends to the same
track's earlier ones.

HPNet forecasts at every time step t of a scene, not only at the last one. The embedding of agent a's mode-k forecast
made at time t (its "prediction embedding") attends to the same agent's mode-k prediction embeddings made at the
earlier times t − 1, …, t − P (``pred_duration`` P in the released code), with a relative-time encoding; together with
attention across agents and across modes this is the paper's Triple Factorized Attention. Each forecast thus reads
the motion estimates that earlier forecasts made from their own (earlier) observation windows, which extends the
range it can use beyond its own visible window.

This layer is that attention over one sequence of tokens (B, T, C):

- Δ_ij = times_i − times_j is the time difference of query i and key j (``times`` given: forecast times, one row per
  sequence; None: positions, so Δ_ij = i − j). Key j is visible to query i iff 0 ≤ Δ_ij ≤ ``max_distance`` (None: no
  limit), both tokens belong to the same track (``track_ids`` given: e.g. one id per (agent, mode); None: one track),
  and the layer mask allows it (causal by default). Keys at later times are never visible.
- The relative-time encoding is a learned table r (R, H, D), R = ``num_distances``; distances ≥ R − 1 share the last
  row. It is added to the key: logits_ij = scale · q_i · (k_j + r[min(Δ_ij, R − 1)]), scale = D^-1/2, then softmax
  over the visible keys and the weighted sum of the values.

Without ``times``/``track_ids`` and with ``max_distance=None`` it is causal softmax attention with that encoding (a
TinyLM mixer). The query-dependent term q_i · r[Δ_ij] goes in as a score_mod through ``softmax_attend``, so under a
host's ``attention_hook`` the layer computes its own output and shows the host the softmax map it implies (the
Session records the path ``implied:softmax``; edits are refused on it, as for every score_mod layer).

Departures from the released code (XiaolongTang23/HPNet ``modules/backbone.py`` and ``layers/graph_attention.py``,
read at commit e26eef9; the ``m2m_h``/``n2n_h`` edges):

- There, the edge from an earlier forecast j to a later one i carries a 4-feature attribute (distance and bearing of
  j's anchor in i's frame, heading difference, and the interval j − i) through a two-layer MLP, and the edge
  embedding is added to both the key and the value. Here only the interval is encoded (other geometry is the host
  model's business), as a learned table rather than an MLP of the scalar interval, and it is added to the key only
  (the value term needs the attention weights, which the host's softmax does not return).
- There, a forecast does not attend to itself (edges need j < i strictly) and one with no earlier forecast gets a zero
  message; here Δ = 0 keys are visible (the query's own token, and other same-time tokens of its track), so no row
  is ever empty and the plain-mixer form is ordinary causal attention.
- The released layer wraps the attention in pre-norm, a residual and a feed-forward block; here those belong to the
  host model, as for every registered layer.

Shape legend: B batch, T seq_len, C hidden_size, H num_heads, Hkv num_kv_heads, D head_dim, R num_distances.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.masks import MaskMod, from_keep
from attnlab.layers import LAYERS
from attnlab.layers._common import NonNegativeInt, PositiveInt, check_arg, merge_heads
from attnlab.layers._softmax_base import SoftmaxFamilyAttention
from attnlab.layers.base import DEFAULT_NUM_HEADS

__all__ = ["HistoricalPredictionAttention", "time_differences"]


def _check_ids(name: str, ids: Tensor | None, batch: int, seq_len: int) -> Tensor | None:
    if ids is None:
        return None
    if ids.dim() != 2 or ids.shape[1] != seq_len or ids.shape[0] not in (1, batch):
        raise ShapeError(f"expected {name} of shape ({batch}, {seq_len}) (or (1, {seq_len})), got {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ConfigError(f"expected {name} as an integer tensor, got {ids.dtype}")
    return ids.long()


def time_differences(seq_len: int, *, times: Tensor | None = None, track_ids: Tensor | None = None,
                     max_distance: int | None = None, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Δ and the look-back keep of one call (module docstring).

    Args:
        seq_len: T. times: (B|1, T) integer forecast times or None (positions 0 … T − 1). track_ids: (B|1, T)
            integer track ids or None (one track). max_distance: the largest visible Δ, or None (no limit).

    Returns:
        delta (B|1, T, T) int64, Δ_ij = times_i − times_j; keep (B|1, T, T) bool, 0 ≤ Δ ≤ max_distance and same track.
    """
    t = torch.arange(seq_len, device=device)[None] if times is None else times.long().to(device)  # (B|1, T)
    delta = t[:, :, None] - t[:, None, :]
    keep = delta >= 0
    if max_distance is not None:
        keep = keep & (delta <= max_distance)
    if track_ids is not None:
        ids = track_ids.long().to(device)
        keep = keep & (ids[:, :, None] == ids[:, None, :])
    return delta, keep


@LAYERS.register("historical_prediction")
class HistoricalPredictionAttention(SoftmaxFamilyAttention):
    """HPNet's historical prediction attention: a forecast attends to its track's earlier ones, keys timed by Δt.

    A relative-time key encoding (module docstring; Tang et al. 2024, abstract and released code).

    ``forward(hidden_states, *, times=None, track_ids=None)``: hidden_states (B, T, C); times (B|1, T) integer forecast
    times (None: positions); track_ids (B|1, T) integer track ids (None: one track). Returns (output (B, T, C), None).

    Args:
        max_distance: the largest time difference a query sees (the released code's ``pred_duration``); None = no
            limit; 0 = each token sees only its own time (no history: the ablation).
        num_distances: rows R of the relative-time table (distances ≥ R − 1 share the last row).
        rope_base: None (default; the table is the positional encoding) or a RoPE base applied on top.
        Other arguments as in ``MaskedAttention``.

    Dtype: hidden_states in the parameters' float dtype (float32, float64, bfloat16, float16); times and track_ids
    integer tensors; the softmax runs in that dtype on the chosen path.

    Raises ConfigError unless max_distance is an int >= 0 or None and num_distances an int >= 1 (one line, e.g.
    "historical_prediction: num_distances must be an integer, got 2.5"), and (forward) ShapeError/ConfigError for
    times or track_ids of the wrong shape or dtype.
    """

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, max_distance: int | None = None, num_distances: int = 16,
                 mask_mod: MaskMod | None = None, path: Literal["dense", "flex"] = "dense", compiled: bool = False,
                 rope_base: float | None = None) -> None:
        max_distance = check_arg(self, "max_distance", max_distance, NonNegativeInt | None)
        num_distances = check_arg(self, "num_distances", num_distances, PositiveInt)
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim=head_dim, mask_mod=mask_mod, path=path,
                         compiled=compiled, rope_base=rope_base)
        self.max_distance, self.num_distances = max_distance, num_distances
        self._plain_causal = mask_mod is None  # the default mask already hides later keys
        # r[Δ, h]: added to every key at distance Δ from the query (small init, like the released embedding tables)
        self.relative_key = nn.Parameter(0.02 * torch.randn(num_distances, num_heads, self.head_dim))

    def relative_logits(self, q: Tensor, delta: Tensor) -> Tensor:
        """scale · q_i · r[min(Δ_ij, R − 1)]: (B, H, T, T) from q (B, H, T, D) and delta (B|1, T, T)."""
        B, H, T, _ = q.shape
        per_distance = torch.einsum("bhid,rhd->bhir", q, self.relative_key.to(q.dtype)) * q.shape[-1] ** -0.5
        bucket = delta.clamp(0, self.num_distances - 1)[:, None].expand(B, H, T, T)  # (B, H, T, T)
        return per_distance.gather(-1, bucket)

    def forward(self, hidden_states: Tensor, *, state: None = None, position_offset: int = 0,
                times: Tensor | None = None, track_ids: Tensor | None = None) -> tuple[Tensor, None]:
        """hidden_states (B, T, C); times/track_ids (B|1, T) integers or None; state must be None.
        Returns (output (B, T, C), None)."""
        q, k, v, _ = self.project(hidden_states, self.start_position(state, position_offset))
        B, T = hidden_states.shape[:2]
        times = _check_ids("times", times, B, T)
        track_ids = _check_ids("track_ids", track_ids, B, T)
        delta, keep = time_differences(T, times=times, track_ids=track_ids, max_distance=self.max_distance,
                                       device=hidden_states.device)
        plain = times is None and track_ids is None and self.max_distance is None and self._plain_causal
        mask_mod = None if plain else from_keep(keep[:, None], name="historical_prediction")  # chunk-local
        bias = self.relative_logits(q, delta)  # (B, H, T, T)

        def score_mod(logits: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            # chunk-local rows, as the per-call mask; clamped only for a block-sparse kernel's padding positions
            return logits + bias.to(logits.dtype)[b, h, q_idx.clamp(0, T - 1), kv_idx.clamp(0, T - 1)]

        o = self.softmax_attend(q, k, v, score_mod=score_mod, mask_mod=mask_mod)  # (B, H, T, D)
        return self.o_proj(merge_heads(o.to(hidden_states.dtype))), None
