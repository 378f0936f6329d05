"""Drivers for the VLM edit tests: attention calls with token roles (no model), and a tiny LLaVA from configs.

Layouts: each sequence is a list of items, ``"t"`` (one text token) or ``(rows, cols)`` (one image of rows·cols
tokens); sequences are left-padded to the longest. Column k of the batch is key column k of a whole-sequence call.
"""

from __future__ import annotations

import dataclasses

import torch

from attnlab.edits.apply import EditedCall, order_edits
from attnlab.edits.base import AttentionCall
from attnlab.functional.attention import causal_keep
from attnlab.probes.base import SequenceInfo
from attnlab.roles import ROLES, TokenRoles
from edits.helpers import capture_probs

IMAGE_ID, TEXT_ID = 99, 5


def layout_ids(layouts):
    """Token ids (B, L) long and valid (B, L) bool for ``layouts`` (left padding)."""
    rows = []
    for layout in layouts:
        ids = []
        for item in layout:
            ids += [TEXT_ID] if item == "t" else [IMAGE_ID] * (item[0] * item[1])
        rows.append(ids)
    length = max(map(len, rows))
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    valid = torch.zeros(len(rows), length, dtype=torch.bool)
    for b, ids in enumerate(rows):
        input_ids[b, length - len(ids):] = torch.tensor(ids)
        valid[b, length - len(ids):] = True
    return input_ids, valid


def layout_roles(layouts, generated=0):
    """TokenRoles for ``layouts`` (grids from each image's (rows, cols)), plus ``generated`` decoded columns."""
    input_ids, valid = layout_ids(layouts)
    grids = torch.tensor([[1, item[0], item[1]] for layout in layouts for item in layout if item != "t"],
                         dtype=torch.long).view(-1, 3)
    roles = TokenRoles.from_input_ids(input_ids, valid, [IMAGE_ID], grids=grids)
    return roles.extend_generated(generated) if generated else roles


def role_call(value, Hq, Lq, *, roles, scale, hidden=None, layer_idx=2):
    """AttentionCall whose queries are the last Lq of the Lk = roles' columns (all of them on a prompt call)."""
    B, Hkv, Lk, _ = value.shape
    valid = roles.codes != ROLES.index("pad")
    sequence = dataclasses.replace(SequenceInfo.from_mask(valid, None, 0), roles=roles)
    positions = sequence.positions
    codes = roles.codes
    return AttentionCall(layer_idx=layer_idx, num_heads=Hq, num_kv_heads=Hkv, q_len=Lq, kv_len=Lk, causal=True,
                         scale=scale, value=value, query_valid=valid[:, Lk - Lq:], key_valid=valid,
                         query_positions=positions[:, Lk - Lq:], key_positions=positions, sequence=sequence,
                         query_roles=codes[:, Lk - Lq:], key_roles=codes, hidden_states=hidden)


def role_edited_call(edits, query, key, value, *, roles, hidden=None, block_size=4, layer_idx=2):
    """EditedCall of ``edits`` on a causal call over ``roles`` (queries = the last q_len columns)."""
    B, Hq, Lq, D = query.shape
    Lk = key.shape[2]
    valid = roles.codes != ROLES.index("pad")
    keep = causal_keep(Lq, Lk)[None, None] & valid[:, None, None, :]
    call = role_call(value, Hq, Lq, roles=roles, scale=D ** -0.5, hidden=hidden, layer_idx=layer_idx)
    return EditedCall(query, key, value, keep, edits=order_edits(edits), call=call, block_size=block_size)


full_probs = capture_probs  # the eager form's probs (B, Hq, Lq, Lk) float64


def full_logits(call):
    """The eager form's logits (B, Hq, Lq, Lk) float64 after every logits edit (masked entries -inf)."""
    B, Hq, Lq, Lk = call.shape
    logits = torch.full((B, Hq, Lq, Lk), float("-inf"), dtype=torch.float64)

    def grab(block):
        width = block.logits.shape[-1]
        logits[:, :, block.q_index, :width] = block.logits.double()

    call.eager(on_block=grab)
    return logits


def tiny_llava(seed=0, num_heads=4, num_kv_heads=2, layers=4):
    """A random tiny LLaVA in eval mode: 32×32 images, 8×8 patches → 16 image tokens (a 4×4 grid), image id 99."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=num_heads * 8, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, vocab_size=100,
                                max_position_embeddings=256, pad_token_id=3),
        image_token_id=IMAGE_ID, vision_feature_select_strategy="default", vision_feature_layer=-1,
        attn_implementation="sdpa")
    return LlavaForConditionalGeneration(config).eval()


def llava_inputs(layouts, seed=0):
    """Model kwargs for ``layouts`` whose images are all 4×4 (the tiny LLaVA's grid); text ids are seeded words."""
    input_ids, valid = layout_ids(layouts)
    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(4, 90, input_ids.shape, generator=generator)
    input_ids = torch.where(input_ids == TEXT_ID, words, input_ids)
    input_ids = torch.where(valid, input_ids, 3)
    count = sum(1 for layout in layouts for item in layout if item != "t")
    batch = {"input_ids": input_ids, "attention_mask": valid.long()}
    if count:
        batch["pixel_values"] = torch.randn(count, 3, 32, 32, generator=generator)
    return batch
