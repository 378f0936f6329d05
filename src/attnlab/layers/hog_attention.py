"""HOG-guided self-attention, after HOGformer's DHOGSA (Wu et al. 2025, arXiv 2504.09377; code Fire-friend/HOGformer;
METHODS.md #40).

HOGformer's Dynamic HOG-aware Self-Attention (``Attention_DHOGSA`` in the released ``hogformer_arch.py``) does two
things with histograms of oriented gradients (HOG):

1. **HOG enters the attention inputs.** A 9-bin HOG per 8×8 patch (Sobel gradients, magnitude summed per
   orientation bin, normalised to sum 1) is projected to channels and added to the features from which the
   query/key/value projections are computed.
2. **HOG ranks the tokens and the ranking groups them.** Pixels are sorted by a gradient key (a magnitude-weighted
   orientation) and the sorted sequence is cut into ``num_heads`` ranges of equal size, either contiguous
   ("box": tokens with similar keys share a range) or interleaved (every range spans all keys); attention then runs
   inside that grouping and the result is unsorted.

This layer keeps both ideas on a token sequence, as ordinary (B, H, T, T) softmax attention that attnlab can probe:

- ``guidance`` (B, T, G): one descriptor per token, e.g. the HOG histogram of the image patch the token embeds
  (G orientation bins). ``hidden_states + guidance @ W_g`` feeds the q/k/v projections (W_g: G → C, learned).
- key_t = Σ_g (g + 1) · guidance[t, g] (the paper's sort value: bin magnitudes weighted by bin index + 1); stable
  ascending sort gives each token a rank r_t in 0 … T−1 (ties keep token order).
- groups of ``num_groups`` (default num_heads, as in the code): box group ⌊r_t / ⌈T / num_groups⌉⌋, interleaved
  group r_t mod num_groups. With ``grouping="both"`` (default) the first ⌈H/2⌉ heads attend within box groups and
  the others within interleaved groups (the code runs the two as separate branches); ``"box"`` or
  ``"interleaved"`` uses one rule on every head. Query i sees key j iff they share a group (and the layer mask,
  causal by default, allows it).

Not causal-safe with guidance: the ranking uses the whole call's guidance, so under a causal mask a token never
reads later hidden states, but its group (hence which earlier keys it sees) depends on later tokens' guidance. The
mechanism is meant for bidirectional attention over an image (pass ``masks.full()``); a causal mask is allowed
(and tested) but gives a look-ahead through the guidance. Without guidance the layer is causal as usual.

Without ``guidance`` the layer is plain multi-head softmax attention under its layer mask (no projection, no
groups), so it works as a TinyLM mixer on (B, T, C). ``num_groups=1`` keeps the guidance input but drops the
grouping. Departures from the released code are listed in the class docstring.

Shape legend: B batch, T seq_len, C hidden_size, H num_heads, D head_dim, G guidance_dim.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.masks import MaskMod, with_covered_lengths, with_name
from attnlab.layers import LAYERS
from attnlab.layers._common import PositiveInt, check_arg, check_hidden, merge_heads
from attnlab.layers._softmax_base import SoftmaxFamilyAttention
from attnlab.layers.base import DEFAULT_NUM_HEADS

Grouping = Literal["both", "box", "interleaved"]
GROUPINGS = ("both", "box", "interleaved")

__all__ = ["GROUPINGS", "HOGAttention", "hog_group_ids", "hog_groups_mask", "hog_head_groups", "hog_keep", "hog_key"]


def hog_key(guidance: Tensor) -> Tensor:
    """The sort key of each token: Σ_g (g + 1) · guidance[..., g].

    Args:
        guidance: (B, T, G) float (any float dtype), e.g. HOG orientation histograms.

    Returns:
        (B, T) in guidance's dtype. A token with an empty histogram (flat patch) gets key 0, below every token
        with gradient.
    """
    weights = torch.arange(1, guidance.shape[-1] + 1, dtype=guidance.dtype, device=guidance.device)
    return guidance @ weights


def hog_group_ids(key: Tensor, num_groups: int, rule: Literal["box", "interleaved"]) -> Tensor:
    """Group of each token after a stable ascending sort of ``key`` (module docstring).

    Args:
        key: (B, T) float sort key.
        num_groups: groups per sequence (>= 1).
        rule: "box" (contiguous ranges of ⌈T / num_groups⌉ ranks) or "interleaved" (rank mod num_groups).

    Returns:
        (B, T) long group ids.
    """
    order = torch.sort(key, dim=-1, stable=True).indices  # (B, T) token at each rank
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(key.shape[-1], device=key.device).expand_as(order))
    if rule == "box":
        size = -(-key.shape[-1] // num_groups)  # ceil(T / num_groups)
        return ranks // size
    return ranks % num_groups


def hog_head_groups(guidance: Tensor, num_heads: int, num_groups: int, grouping: Grouping = "both") -> Tensor:
    """The HOG group of each token for each head: long (B, H, T).

    ``grouping="both"``: heads 0 … ⌈H/2⌉−1 use box groups, the rest interleaved groups; otherwise one rule for all.
    Computed without gradient (the ranking is not differentiated); the key is computed in at least float32.
    """
    with torch.no_grad():
        key = hog_key(guidance.to(torch.promote_types(guidance.dtype, torch.float32)))  # float64 stays float64
        per_rule = {rule: hog_group_ids(key, num_groups, rule) for rule in ("box", "interleaved")
                    if grouping in (rule, "both")}
        n_box = -(-num_heads // 2) if grouping == "both" else (num_heads if grouping == "box" else 0)
        rules = ["box"] * n_box + ["interleaved"] * (num_heads - n_box)
        return torch.stack([per_rule[rule] for rule in rules], dim=1)


def hog_keep(guidance: Tensor, num_heads: int, num_groups: int, grouping: Grouping = "both") -> Tensor:
    """Which (query, key) pairs share a HOG group: bool (B, H, T, T) (:func:`hog_head_groups` materialised)."""
    ids = hog_head_groups(guidance, num_heads, num_groups, grouping)
    return ids[..., :, None] == ids[..., None, :]


def hog_groups_mask(ids: Tensor) -> MaskMod:
    """A mask_mod from per-head group ids (B, H, T): query i sees key j iff ``ids[b, h, i] == ids[b, h, j]``.

    Chunk-local positions; defined for T query and key positions (longer calls raise ShapeError).
    """
    last = ids.shape[-1] - 1

    def mask_mod(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        table = ids.to(q_idx.device)  # clamped only for a block-sparse kernel's padding positions
        return table[batch_idx, head_idx, q_idx.clamp(0, last)] == table[batch_idx, head_idx, kv_idx.clamp(0, last)]

    with_covered_lengths(mask_mod, last + 1, last + 1)
    return with_name(mask_mod, "hog_groups")


@LAYERS.register("hog_attention")
class HOGAttention(SoftmaxFamilyAttention):
    """Softmax attention guided by per-token HOG descriptors: HOG added to the q/k/v input, HOG-ranked groups.

    ``forward(hidden_states, *, state=None, position_offset=0, guidance=None)``: guidance (B, T, guidance_dim)
    float or None (plain softmax attention). See the module docstring for the definition.

    Departures from the released ``Attention_DHOGSA`` (HOGformer, Fire-friend/HOGformer ``hogformer_arch.py``): the
    code's attention is Restormer-style "transposed" attention whose rows are (channel, range) pairs and whose
    features are the pixels of a range, with L2-normalised q/k, a learned temperature and a softmax with +1 in its
    denominator, and it multiplies the box and interleaved branches elementwise. Here tokens attend to tokens (a
    (T, T) map per head, plain scaled softmax, routed through ``softmax_attend``), the two rules are split over heads
    and mixed by o_proj, the HOG is given per token (the code computes it inside every block from half of the
    features with Sobel filters, and also sorts pixels inside each patch), and it is added to every channel of
    the q/k/v input (the code adds it to half the channels). The key uses the guidance histogram (the code's global
    sort uses Sobel gradients of the value map). The code bins *signed* orientations (atan2(gy, gx) over [−π, π]
    in 9 bins); the layer ranks whatever histogram it is given, and the ``hogformer`` app gives scikit-image's
    *unsigned* HOG (9 bins over 0–180°), where opposite gradients share a bin, so its keys and groups differ from
    the code's for the same image.

    Not causal-safe with guidance: under a causal ``mask_mod`` the groups read later tokens' guidance (module
    docstring).

    Dtype: hidden_states in the parameters' float dtype (float32, float64, bfloat16, float16); guidance any float
    dtype (cast to hidden_states' dtype for ``guide``; the ranking key in at least float32); the softmax runs in
    that dtype on the chosen path.

    Args:
        guidance_dim: G, the width of ``guidance`` (9 orientation bins, the code's ``n_bins``).
        num_groups: groups per sequence; None = num_heads (the code's ``factor``); 1 = no grouping.
        grouping: "both" (default), "box" or "interleaved" (module docstring).
        Other arguments as in ``MaskedAttention`` (``mask_mod=None`` is causal; pass ``masks.full()`` for images).

    Raises:
        ConfigError: guidance_dim or num_groups not an int >= 1 (e.g. "hog_attention: num_groups must be an
            integer, got 2.5"), or an unknown grouping (and the base class's checks).
    """

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, guidance_dim: int = 9, num_groups: int | None = None,
                 grouping: Grouping = "both", mask_mod: MaskMod | None = None,
                 path: Literal["dense", "flex"] = "dense", compiled: bool = False,
                 rope_base: float | None = 10000.0) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim=head_dim, mask_mod=mask_mod, path=path,
                         compiled=compiled, rope_base=rope_base)
        guidance_dim = check_arg(self, "guidance_dim", guidance_dim, PositiveInt)
        num_groups = check_arg(self, "num_groups", num_heads if num_groups is None else num_groups, PositiveInt)
        if grouping not in GROUPINGS:
            raise ConfigError(f"expected grouping in {list(GROUPINGS)}, got {grouping!r}")
        self.guidance_dim, self.num_groups, self.grouping = guidance_dim, num_groups, grouping
        self.guide = nn.Linear(guidance_dim, hidden_size, bias=False)  # W_g: HOG bins -> channels

    def check_guidance(self, guidance: Tensor, hidden_states: Tensor) -> None:
        """Raise ShapeError unless guidance is a float (B, T, guidance_dim) tensor matching hidden_states."""
        expected = (*hidden_states.shape[:2], self.guidance_dim)
        if guidance.dim() != 3 or tuple(guidance.shape) != expected or not guidance.is_floating_point():
            raise ShapeError(f"expected guidance as a float (batch, seq_len, guidance_dim) = {expected} tensor, got "
                             f"{guidance.dtype} {tuple(guidance.shape)}")

    def forward(self, hidden_states: Tensor, *, state: None = None, position_offset: int = 0,
                guidance: Tensor | None = None) -> tuple[Tensor, None]:
        """hidden_states (B, T, C); guidance (B, T, G) or None; state must be None.
        Returns (output (B, T, C), None)."""
        offset = self.start_position(state, position_offset)
        check_hidden(hidden_states, self.hidden_size)
        mask_mod = None
        inputs = hidden_states
        if guidance is not None:
            self.check_guidance(guidance, hidden_states)
            inputs = hidden_states + self.guide(guidance.to(hidden_states.dtype))  # (B, T, C)
            if self.num_groups > 1:
                ids = hog_head_groups(guidance, self.num_heads, self.num_groups, self.grouping)  # (B, H, T)
                mask_mod = hog_groups_mask(ids.to(hidden_states.device))
        q, k, v, _ = self.project(inputs, offset)
        o = self.softmax_attend(q, k, v, mask_mod=mask_mod)  # (B, H, T, D)
        return self.o_proj(merge_heads(o.to(hidden_states.dtype))), None
