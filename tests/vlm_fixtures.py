"""Tiny random vision-language models built from configs (no network), shared by the issue-16 tests.

- :func:`tiny_llava`: transformers ``LlavaForConditionalGeneration`` with a 2-layer CLIP vision tower (32×32 images,
  8×8 patches → a 4×4 grid = 16 image tokens per image, the CLS token dropped by ``"default"``) and a 2-layer
  Llama text model with GQA (4 query heads, 2 kv heads, head_dim 8), vocabulary 100, image token id 99.
- :func:`llava_batch`: model kwargs (``input_ids``, ``attention_mask``, ``pixel_values``) built directly from token
  id lists, one ``IMAGE`` marker per image expanded to the model's 16 tokens, left or right padding.
- :func:`tiny_llava_processor`: an offline ``LlavaProcessor`` (a word-level tokenizer with ``<image>`` = 99 and a
  constructed CLIP image processor, 32×32) for tests that start from PIL images and prompts.
- :func:`random_image`: a seeded PIL RGB image.

Shapes: B batch, L tokens, P = 16 image tokens per image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from attnlab.probes.base import Probe
from attnlab.roles import TokenRoles

IMAGE_TOKEN_ID = 99
IMAGE = -1  # marker inside a token id list: one image goes here (expanded to image_tokens(model) ids)
PAD_ID = 3
WORDS = ("what colour is the shape red blue green yes no describe this image where left right top bottom a cat "
         "sat on mat how many").split()


def tiny_llava(seed: int = 0, *, num_heads: int = 4, num_kv_heads: int = 2, layers: int = 2, image_size: int = 32,
               patch_size: int = 8, vocab_size: int = 100, attn_implementation: str = "sdpa"):
    """A random tiny LLaVA in eval mode: ``(image_size // patch_size)²`` image tokens per image (16 by default)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=image_size, patch_size=patch_size),
        text_config=LlamaConfig(hidden_size=num_heads * 8, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                                vocab_size=vocab_size, max_position_embeddings=256, pad_token_id=PAD_ID),
        image_token_id=IMAGE_TOKEN_ID, vision_feature_select_strategy="default", vision_feature_layer=-1,
        attn_implementation=attn_implementation)
    return LlavaForConditionalGeneration(config).eval()


def image_tokens(model) -> int:
    """Image tokens per image of a LLaVA model: (image_size / patch_size)²."""
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def llava_batch(model, sequences: Sequence[Sequence[int]], *, seed: int = 0, padding: str = "left",
                pixel_values: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Model kwargs from token id lists in which ``IMAGE`` (-1) marks where an image goes.

    Args:
        model: a LLaVA model (sizes read from its config).
        sequences: token ids per sequence (ids < 99), with ``IMAGE`` once per image (0, 1 or more).
        seed: seeds the random pixel values (one (3, S, S) image per ``IMAGE`` marker, in batch order).
        padding: ``"left"`` or ``"right"``; pad id 3, attention_mask 0 there.
        pixel_values: (num_images, 3, S, S) to use instead of random ones.
    Returns:
        ``input_ids`` (B, L) long, ``attention_mask`` (B, L) long, ``pixel_values`` (num_images, 3, S, S) float32
        (absent when no sequence has an image).
    """
    per_image = image_tokens(model)
    rows = [[tok for t in seq for tok in ([IMAGE_TOKEN_ID] * per_image if t == IMAGE else [int(t)])]
            for seq in sequences]
    count = sum(list(seq).count(IMAGE) for seq in sequences)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if padding == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if count:
        size = model.config.vision_config.image_size
        if pixel_values is None:
            generator = torch.Generator().manual_seed(10_007 + seed)  # not the noise counterfactual's seed
            pixel_values = torch.randn(count, 3, size, size, generator=generator)
        batch["pixel_values"] = pixel_values
    return batch


def tiny_llava_processor(image_size: int = 32, patch_size: int = 8, padding_side: str = "left"):
    """An offline LlavaProcessor for :func:`tiny_llava`: a word-level tokenizer over WORDS (``<s>`` 1, ``</s>`` 2,
    ``<pad>`` 3, ``<image>`` 99) and a CLIP image processor resizing and centre-cropping to ``image_size``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": PAD_ID, **{w: i + 4 for i, w in enumerate(dict.fromkeys(WORDS))},
             "<image>": IMAGE_TOKEN_ID}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>", padding_side=padding_side,
                                        extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


def random_image(seed: int = 0, width: int = 32, height: int = 32):
    """A seeded PIL RGB image of random pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


class Recorder(Probe):
    """A probe that keeps each layer's last call record (``calls[layer]``)."""

    name = "recorder"
    needs = ("value",)

    def __init__(self) -> None:
        super().__init__()
        self.calls = {}

    def begin_call(self, call):
        self.calls[call.layer_idx] = call


def row_roles(roles: TokenRoles, row: int) -> TokenRoles:
    """The roles of batch row ``row`` alone, as a one-sequence forward would have them."""
    return TokenRoles(roles.codes[row:row + 1], tuple(dataclasses.replace(span, sequence=0)
                                                      for span in roles.spans(row)))


def merged_rows(make_probe, feed, roles: TokenRoles, valid: torch.Tensor, per_layer: list) -> object:
    """Rows 0 and 1 fed as separate batches (sequence offsets 0 and 1), row 1's state shipped through
    export/import with its side parts as JSON (as shard files carry them), merged into row 0's probe.

    ``feed(probe, roles, valid, per_layer, offset=...)`` runs the probe on one batch; ``per_layer`` holds one
    (B, …) tensor per layer."""
    import json

    parts = []
    for row in range(2):
        probe = make_probe()
        feed(probe, row_roles(roles, row), valid[row:row + 1], [t[row:row + 1] for t in per_layer], offset=row)
        parts.append(probe)
    tensors, side = parts[1].export_state()
    copy = make_probe()
    copy.import_state(tensors, json.loads(json.dumps(side)))
    parts[0].merge(copy)
    return parts[0]
