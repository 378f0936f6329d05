"""The DiT lab's models: tiny diffusers transformers in pixel space, conditioned on a caption through cross-attention.

- image (``kind="image"``): ``diffusers.PixArtTransformer2DModel`` on 32 × 32 RGB with ``patch_size`` 4, so an
  image is 8 × 8 = 64 patch tokens; AdaLN-single timestep conditioning; the caption enters each block's
  cross-attention after PixArt's caption projection (``caption_channels = text_dim``), with the caption's padding
  masked (``encoder_attention_mask``).
- video (``kind="video"``): ``diffusers.WanTransformer3DModel`` on (frames, 32, 32) with patch (1, 4, 4), so a video
  is frames × 64 patch tokens with Wan's 3-D RoPE (frame, row, column); the caption enters through Wan's text
  embedder and cross-attention. Wan's cross-attention takes no mask, so it attends to the padding tokens too (their
  embedding is learned like the others).

The text encoder is ours (:class:`WordEmbedding`): a word-embedding table plus a learned position embedding over
the :data:`~attnlab.lab.dit.scenes.vocabulary` (no contextual mixing, so every caption token keeps its own
cross-attention key: cross-attention maps read word by word). Captions are padded to ``max_words`` with ``<pad>``;
the empty caption is the single token ``<null>`` (classifier-free guidance drops captions to it in training).

The sampler, the folder format and :class:`LabPipeline` live in :mod:`attnlab.lab.dit.pipeline`.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn

from attnlab.errors import ConfigError
from attnlab.params import Range, coerce_fields

__all__ = ["DitSpec", "WordEmbedding", "build_transformer", "tokenize"]


@dataclass(frozen=True)
class DitSpec:
    """The model's sizes. Defaults: 4 blocks of 4 heads × 32 (width 128), words embedded in 64 dimensions,
    captions of up to 8 words, patch 4 on 32-px images. ``frames``: the video model's training frames (the sampler's
    default). About 1.2 M parameters (image) / 1.0 M (video): a training run fits in minutes on two CPU cores.
    Raises ConfigError (one line) for bad values."""

    kind: Literal["image", "video"] = "image"
    layers: Annotated[int, Range(ge=1, le=48)] = 4
    heads: Annotated[int, Range(ge=1, le=64)] = 4
    head_dim: Annotated[int, Range(ge=8, le=256)] = 32
    text_dim: Annotated[int, Range(ge=4, le=4096)] = 64
    max_words: Annotated[int, Range(ge=2, le=64)] = 8
    patch_size: Annotated[int, Range(ge=1, le=32)] = 4
    frames: Annotated[int, Range(ge=1, le=16)] = 4

    def __post_init__(self) -> None:
        coerce_fields(self, "DitSpec")
        from attnlab.lab.dit.scenes import SIZE

        if SIZE % self.patch_size:
            raise ConfigError(f"DitSpec: patch_size={self.patch_size} does not divide the image size {SIZE}")
        if self.kind == "video" and self.head_dim % 2:
            raise ConfigError(f"DitSpec: the video model's RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def width(self) -> int:
        """Hidden width (``heads · head_dim``)."""
        return self.heads * self.head_dim

    @property
    def grid(self) -> int:
        """Patches per image side."""
        from attnlab.lab.dit.scenes import SIZE

        return SIZE // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class WordEmbedding(nn.Module):
    """Caption token ids → encoder hidden states: ``token(ids) + position(arange)``.

    ``forward(ids)``: ids (batch, max_words) int64 → (batch, max_words, text_dim) float32."""

    def __init__(self, vocab_size: int, text_dim: int, max_words: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, text_dim)
        self.position = nn.Embedding(max_words, text_dim)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token(ids) + self.position(positions)[None]  # (B, L, D)


def tokenize(captions: typing.Sequence[str | typing.Sequence[str]], max_words: int) -> tuple[Tensor, Tensor]:
    """Token ids and keep mask of captions (text split on whitespace, or word sequences).

    Returns ``(ids (batch, max_words) int64, keep (batch, max_words) bool)``: ids of the words then ``<pad>``; an
    empty caption is ``<null>``; keep is True on the words (and the ``<null>``), False on padding.
    Raises ConfigError (one line) for an unknown word, a caption longer than ``max_words`` or no captions."""
    from attnlab.lab.dit.scenes import vocabulary

    if isinstance(captions, str):
        captions = [captions]
    if not captions:
        raise ConfigError("expected at least one caption, got none")
    index = {word: i for i, word in enumerate(vocabulary())}
    ids = torch.zeros(len(captions), max_words, dtype=torch.int64)
    keep = torch.zeros(len(captions), max_words, dtype=torch.bool)
    for row, caption in enumerate(captions):
        words = list(caption.split() if isinstance(caption, str) else caption) or ["<null>"]
        unknown = [w for w in words if w not in index or (w == "<pad>")]
        if unknown:
            raise ConfigError(f"unknown caption word {unknown[0]!r} in {' '.join(words)!r}; known words: "
                              f"{', '.join(vocabulary()[2:])}")
        if len(words) > max_words:
            raise ConfigError(f"caption {' '.join(words)!r} has {len(words)} words, expected at most {max_words}")
        ids[row, :len(words)] = torch.tensor([index[w] for w in words])
        keep[row, :len(words)] = True
    return ids, keep


def build_transformer(spec: DitSpec, *, seed: int = 0) -> nn.Module:
    """A randomly initialised diffusers transformer of ``spec`` (``torch.manual_seed(seed)`` first), float32:
    ``PixArtTransformer2DModel`` (image) or ``WanTransformer3DModel`` (video), 3 input and output channels."""
    from diffusers import PixArtTransformer2DModel, WanTransformer3DModel

    from attnlab.lab.dit.scenes import SIZE

    torch.manual_seed(seed)
    if spec.kind == "image":
        return PixArtTransformer2DModel(
            num_attention_heads=spec.heads, attention_head_dim=spec.head_dim, in_channels=3, out_channels=3,
            num_layers=spec.layers, cross_attention_dim=spec.width, sample_size=SIZE, patch_size=spec.patch_size,
            caption_channels=spec.text_dim, use_additional_conditions=False, norm_elementwise_affine=False)
    return WanTransformer3DModel(
        patch_size=(1, spec.patch_size, spec.patch_size), num_attention_heads=spec.heads,
        attention_head_dim=spec.head_dim, in_channels=3, out_channels=3, text_dim=spec.text_dim, freq_dim=64,
        ffn_dim=2 * spec.width, num_layers=spec.layers, rope_max_seq_len=64)
