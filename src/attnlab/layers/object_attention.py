"""Object-level attention with an object positional encoding (OAT; Fang et al. 2024, ECCV, "OAT: Object-Level
Attention Transformer for Gaze Scanpath Prediction"; METHODS.md #38).

OAT's positional encoding gives every object a vector whose cosine similarity with another object's vector falls
off as a Gaussian of their distance on the display (the released code fits such a table for grid cells, σ = 2
cells, and concatenates one vector per axis). This layer builds that encoding for continuous object centres and
puts the relation it implies into the attention logits of every head:

    logits[b, h, i, j] = q_i · k_j / √D + gain_h · ⟨e_i, e_j⟩,        e = encode(centre) (unit norm, below)

so the spatial relation between two objects' boxes acts on attention directly (the attnlab adaptation; in the
paper the encoding is concatenated to the token features and only reaches the logits through the projections).

Encodings (``encoding=``), per axis ``n = encoding_dim // 2`` features, the two axes concatenated and each axis
block scaled to norm 1/√2 (so ``‖e‖ = 1`` and ``⟨e_i, e_j⟩`` is the mean of the two per-axis cosines):

* ``"object"`` (OAT's property, continuous form): Gaussian bumps on ``n`` anchors ``μ_k`` evenly spaced over
  ``[-2σ, 1 + 2σ]``, ``φ_k(x) = exp(-(x − μ_k)² / σ²)``. For centres in [0, 1] and anchor spacing below σ, the
  per-axis cosine is ``exp(-(x_i − x_j)² / (2σ²))`` to within 1e-2 at the defaults (σ = 0.1, 16 anchors per
  axis) and 2e-4 at σ = 0.15 (16 anchors per axis); ⟨e_i, e_j⟩, the mean of the two axes, is within half that
  when only one axis differs. The product of two bumps summed over the anchors is a Gaussian in the difference. It
  falls monotonically to 0 with distance.
* ``"sinusoidal"`` (the plain transformer encoding the paper compares with): ``n / 2`` frequencies
  ``ω_k = base^(-2k/n)``, features ``sin(ω_k · s · x), cos(ω_k · s · x)`` with ``s = sinusoid_scale`` (coordinates
  in [0, 1] read as ``s`` grid cells). Its per-axis cosine is ``mean_k cos(ω_k · s · Δx)``: a function of the
  distance too, but one that oscillates and decays slowly instead of falling off like a Gaussian.

Boxes: ``forward(..., boxes=...)`` takes (B, T, 4) boxes ``(x0, y0, x1, y1)`` (their centres are used) or (B, T, 2)
centres, in display coordinates normalised to [0, 1]. A row of NaN means "no position" (e.g. a target token): its
encoding is 0, so it has relation 0 with every token. Without ``boxes`` the layer is plain masked softmax attention
(RoPE on by default), a sequence mixer like ``masked``.

Shape legend: B batch, T seq_len (tokens = objects), C hidden_size, H num_heads, D head_dim, P encoding_dim.
Source: Fang, Yu, Zhang, van der Lans, Shi 2024 (ECCV), the abstract (via the repository README; the paper body was
not read, METHODS.md #38); released code HKUST-NISL/oat_eccv24 at ``bf532ef``
(``src/model/positionalEncodingLearned.py``: the Gaussian cosine target; ``models.py``: concatenation per axis).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from attnlab.errors import ConfigError, ShapeError
from attnlab.params import Range
from attnlab.functional.masks import MaskMod, from_keep
from attnlab.layers import LAYERS
from attnlab.layers._common import PositiveFloat, check_arg, merge_heads
from attnlab.layers._softmax_base import SoftmaxFamilyAttention, check_keep
from attnlab.layers.base import DEFAULT_NUM_HEADS

__all__ = ["ENCODINGS", "ObjectAttention", "box_centres", "encode_boxes", "object_encoding", "relation",
           "sinusoidal_encoding"]

ENCODINGS = ("object", "sinusoidal")


def box_centres(boxes: Tensor) -> Tensor:
    """(B, T, 2) centres from (B, T, 4) boxes ``(x0, y0, x1, y1)`` or (B, T, 2) centres (returned as they are).

    Raises ShapeError for another shape."""
    if boxes.dim() != 3 or boxes.shape[-1] not in (2, 4):
        raise ShapeError(f"expected boxes (batch, seq_len, 4) as (x0, y0, x1, y1) or centres (batch, seq_len, 2), "
                         f"got {tuple(boxes.shape)}")
    if boxes.shape[-1] == 2:
        return boxes
    return 0.5 * (boxes[..., :2] + boxes[..., 2:])


def _axis_blocks(centres: Tensor, features) -> Tensor:
    """Apply ``features`` ((..., 1) coordinate -> (..., n)) to each axis, scale each block to norm 1/√2, concat;
    rows with a NaN coordinate become 0. (B, T, 2) -> (B, T, 2n)."""
    unplaced = torch.isnan(centres).any(dim=-1, keepdim=True)  # (B, T, 1)
    safe = torch.where(unplaced, torch.zeros_like(centres), centres)
    blocks = []
    for axis in range(2):
        block = features(safe[..., axis : axis + 1])  # (B, T, n)
        blocks.append(block / (block.norm(dim=-1, keepdim=True) * math.sqrt(2.0)))
    return torch.where(unplaced, 0.0, torch.cat(blocks, dim=-1))


def object_encoding(centres: Tensor, *, sigma: float = 0.1, encoding_dim: int = 32) -> Tensor:
    """OAT's object positional encoding (Gaussian-bump form, module docstring): (B, T, 2) centres in [0, 1] ->
    (B, T, encoding_dim) unit vectors (0 for NaN rows), cosine between two ≈ mean over axes of
    ``exp(-Δ² / (2σ²))``. Computed in the centres' dtype."""
    n = encoding_dim // 2
    anchors = torch.linspace(-2 * sigma, 1 + 2 * sigma, n, dtype=centres.dtype, device=centres.device)
    return _axis_blocks(centres, lambda x: torch.exp(-((x - anchors) ** 2) / sigma ** 2))


def sinusoidal_encoding(centres: Tensor, *, encoding_dim: int = 32, scale: float = 10.0,
                        base: float = 10000.0) -> Tensor:
    """The plain sinusoidal encoding of each coordinate (module docstring): (B, T, 2) -> (B, T, encoding_dim) unit
    vectors (0 for NaN rows), per axis ``[sin(ω_k s x), cos(ω_k s x)]`` for ``ω_k = base^(-2k/n)``, k < n/2."""
    n = encoding_dim // 2
    freqs = base ** (-2.0 * torch.arange(n // 2, dtype=centres.dtype, device=centres.device) / n)

    def features(x: Tensor) -> Tensor:
        angle = x * scale * freqs  # (B, T, n/2)
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)

    return _axis_blocks(centres, features)


def encode_boxes(boxes: Tensor, encoding: str = "object", *, sigma: float = 0.1, encoding_dim: int = 32,
                 sinusoid_scale: float = 10.0) -> Tensor:
    """(B, T, encoding_dim) encodings of (B, T, 4) boxes or (B, T, 2) centres: :func:`object_encoding` or
    :func:`sinusoidal_encoding` of the centres. Raises ShapeError for other shapes, ConfigError for an unknown
    encoding."""
    centres = box_centres(boxes)
    if encoding == "object":
        return object_encoding(centres, sigma=sigma, encoding_dim=encoding_dim)
    if encoding == "sinusoidal":
        return sinusoidal_encoding(centres, encoding_dim=encoding_dim, scale=sinusoid_scale)
    raise ConfigError(f"expected encoding in {ENCODINGS}, got {encoding!r}")


def relation(encoded: Tensor) -> Tensor:
    """⟨e_i, e_j⟩ for (B, T, P) encodings: (B, T, T) (the cosine, as the encodings are unit vectors or 0)."""
    return encoded @ encoded.transpose(-1, -2)


@LAYERS.register("object_attention")
class ObjectAttention(SoftmaxFamilyAttention):
    """OAT object attention: softmax among objects, logits + gain_h · ⟨e_i, e_j⟩ of their position encodings.

    The encodings e and their two kinds are described in the module docstring.

    ``forward(hidden_states, *, boxes=None, keep=None)``: with ``boxes`` each head h adds
    ``gain_h · ⟨e_i, e_j⟩`` to its logits (as a score_mod: the layer computes its own softmax and shows a host hook
    the map it implies); ``keep`` is a per-call mask in the layers' one convention (bool (T, T), (B, T, T) or
    broadcastable to (B, H, T, T), True = attend, chunk-local; ``layers/_softmax_base.py``), ANDed with the layer
    mask (``mask_mod``; default causal, pass ``attnlab.functional.masks.full()`` for a set of objects).

    Args:
        encoding: ``"object"`` (OAT's, default) or ``"sinusoidal"`` (the plain encoding).
        sigma: width of the object encoding's Gaussian, in normalised display units (> 0; ignored by sinusoidal).
        encoding_dim: P, a multiple of 4 (≥ 4) of encoding features (half per axis).
        sinusoid_scale: s, grid cells per display unit for the sinusoidal encoding.
        gain_init: initial ``gain_h`` of every head (learnable).
        Other arguments as in ``MaskedAttention`` (for objects pass ``rope_base=None``: their order means nothing).

    Attributes:
        record_probs: when True, every call stores its attention probabilities (B, H, T, T), float32, detached,
            in ``last_probs`` (:meth:`dense_probs`; for app metrics; off by default).

    Dtype: hidden_states in the parameters' float dtype (float32, float64, bfloat16, float16); boxes any float
    dtype, cast to it, and the encodings and relation computed in it; the softmax runs in that dtype on the chosen
    path; ``last_probs`` is float32.

    Raises ConfigError for a bad encoding, sigma, encoding_dim (an int >= 4, a multiple of 4) or scale; ShapeError
    for boxes or keep of the wrong shape. Source: Fang et al. 2024 (OAT), the abstract (via the repository README)
    and the released code HKUST-NISL/oat_eccv24 (module docstring; METHODS.md #38: high confidence in the encoding's
    construction, read in the code; the relation term in the logits is attnlab's adaptation).
    """

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, encoding: Literal["object", "sinusoidal"] = "object",
                 sigma: float = 0.1, encoding_dim: int = 32, sinusoid_scale: float = 10.0, gain_init: float = 1.0,
                 mask_mod: MaskMod | None = None, path: Literal["dense", "flex"] = "dense", compiled: bool = False,
                 rope_base: float | None = 10000.0) -> None:
        if encoding not in ENCODINGS:
            raise ConfigError(f"expected encoding in {ENCODINGS}, got {encoding!r}")
        sigma = check_arg(self, "sigma", sigma, PositiveFloat)
        encoding_dim = check_arg(self, "encoding_dim", encoding_dim, Annotated[int, Range(ge=4)])
        if encoding_dim % 4:
            raise ConfigError(f"expected encoding_dim a multiple of 4 (>= 4), got {encoding_dim}")
        sinusoid_scale = check_arg(self, "sinusoid_scale", sinusoid_scale, PositiveFloat)
        gain_init = check_arg(self, "gain_init", gain_init, float)
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim=head_dim, mask_mod=mask_mod, path=path,
                         compiled=compiled, rope_base=rope_base)
        self.encoding, self.sigma, self.encoding_dim = encoding, sigma, encoding_dim
        self.sinusoid_scale = sinusoid_scale
        self.gain = nn.Parameter(torch.full((num_heads,), gain_init))
        self.record_probs = False
        self.last_probs: Tensor | None = None

    def encode(self, boxes: Tensor) -> Tensor:
        """(B, T, P) encodings of the boxes' centres (module docstring)."""
        return encode_boxes(boxes, self.encoding, sigma=self.sigma, encoding_dim=self.encoding_dim,
                            sinusoid_scale=self.sinusoid_scale)

    def relation_bias(self, boxes: Tensor) -> Tensor:
        """gain_h · ⟨e_i, e_j⟩: (B, H, T, T) in the boxes' dtype."""
        return self.gain.to(boxes.dtype)[None, :, None, None] * relation(self.encode(boxes))[:, None]

    def forward(self, hidden_states: Tensor, *, state: None = None, position_offset: int = 0,
                boxes: Tensor | None = None, keep: Tensor | None = None) -> tuple[Tensor, None]:
        """hidden_states (B, T, C); boxes (B, T, 4) or (B, T, 2) or None; keep a per-call bool mask ((T, T),
        (B, T, T) or broadcastable to (B, H, T, T)) or None; state must be None. Returns (output (B, T, C), None).

        Raises ShapeError for boxes or keep of the wrong shape or dtype."""
        q, k, v, _ = self.project(hidden_states, self.start_position(state, position_offset))
        B, T = hidden_states.shape[:2]
        mask_mod = None
        if keep is not None:
            mask_mod = from_keep(check_keep(keep, (B, self.num_heads, T, T), q.device), name="object_keep")
        score_mod = None
        if boxes is not None:
            if boxes.shape[:2] != hidden_states.shape[:2]:
                raise ShapeError(f"expected boxes ({B}, {T}, 4 or 2), got {tuple(boxes.shape)}")
            related = relation(self.encode(boxes.to(q.dtype)))  # (B, T, T), data only: gathered without H
            gain, last = self.gain, T - 1

            def score_mod(logits: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                # clamped only for a block-sparse kernel's padding positions (past T − 1)
                pair = related.to(logits.dtype)[b, q_idx.clamp(0, last), kv_idx.clamp(0, last)]
                return logits + gain.to(logits.dtype)[h] * pair

        if self.record_probs:
            self.last_probs = self.dense_probs(q, k, mask_mod=mask_mod, score_mod=score_mod)
        o = self.softmax_attend(q, k, v, score_mod, mask_mod=mask_mod)  # (B, H, T, D)
        return self.o_proj(merge_heads(o.to(hidden_states.dtype))), None
