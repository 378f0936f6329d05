"""Small helpers of the role probes' tests: a tiny random LLaVA, a padded batch with two images in one sequence,
and hand-made call records (until tests/vlm_fixtures.py and attnlab.testing.tiny_vlm land, these stay local)."""

from __future__ import annotations

import torch

from attnlab.facts import ModelFacts
from attnlab.functional.attention import BlockView
from attnlab.probes.base import AttentionCall, SequenceInfo
from attnlab.roles import TokenRoles

VOCAB = 100
IMAGE_ID = VOCAB - 1
IMAGE_TOKENS = 16  # a 32 × 32 image in 8 × 8 patches, CLS dropped: a 4 × 4 grid


def tiny_llava(seed: int = 0, layers: int = 3, heads: int = 4, kv_heads: int = 2):
    """A LlavaForConditionalGeneration with a 1-layer CLIP tower and a Llama decoder (GQA), random weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, projection_dim=16)
    text = LlamaConfig(hidden_size=heads * 8, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=64, vocab_size=VOCAB,
                       max_position_embeddings=256)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    return LlavaForConditionalGeneration(config).eval()


def vlm_batch(seed: int = 0, length: int = 44) -> dict[str, torch.Tensor]:
    """Two sequences: row 0 holds two images (columns 3–18 and 22–37), row 1 is left-padded by 5 and holds one
    image (columns 9–24). Returns model kwargs: input_ids, attention_mask, pixel_values (3 images)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, IMAGE_ID, (2, length), generator=generator)
    ids[0, 3:19] = IMAGE_ID
    ids[0, 22:38] = IMAGE_ID
    ids[1, 9:25] = IMAGE_ID
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ids[1, :5] = 0
    pixels = torch.randn(3, 3, 32, 32, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def batch_roles(batch: dict[str, torch.Tensor]) -> TokenRoles:
    return TokenRoles.from_input_ids(batch["input_ids"], batch["attention_mask"].bool(), [IMAGE_ID])


def facts_for(layers: int, heads: int, kv_heads: int, hidden: int = 32) -> ModelFacts:
    return ModelFacts(num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=8, hidden_size=hidden)


def make_call(layer: int, roles: TokenRoles, valid: torch.Tensor, heads: int, kv_heads: int, *, offset: int = 0,
              hidden: torch.Tensor | None = None) -> AttentionCall:
    """The call record of a prefill call over every column (causal)."""
    B, L = valid.shape
    sequence = SequenceInfo.from_mask(valid, None, offset, roles=roles)
    return AttentionCall(layer_idx=layer, num_heads=heads, num_kv_heads=kv_heads, q_len=L, kv_len=L, causal=True,
                         scale=8 ** -0.5, value=torch.zeros(B, kv_heads, L, 8), query_valid=valid, key_valid=valid,
                         query_positions=sequence.positions, key_positions=sequence.positions, sequence=sequence,
                         query_roles=roles.codes, key_roles=roles.codes, hidden_states=hidden)


def random_probs(valid: torch.Tensor, heads: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs (B, H, L, L), keep (B, 1, L, L)): causal + padding, rows of padded queries all 0."""
    B, L = valid.shape
    generator = torch.Generator().manual_seed(seed)
    keep = torch.ones(L, L, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :] & valid[:, None, :, None]
    logits = torch.randn(B, heads, L, L, generator=generator) * 3
    probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs, keep


def blocks(probs: torch.Tensor, keep: torch.Tensor, size: int) -> list[BlockView]:
    """The probs cut into query blocks the way the blocked kernel hands them over (width = last query + 1)."""
    L = probs.shape[-1]
    out = []
    for start in range(0, L, size):
        stop = min(L, start + size)
        out.append(BlockView(probs=probs[:, :, start:stop, :stop], logits=probs[:, :, start:stop, :stop].log(),
                             keep=keep[:, :, start:stop, :stop], q_index=torch.arange(start, stop)))
    return out
