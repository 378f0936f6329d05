"""dual_stream (METHODS.md #41): the selection and the modulated logits against plain-loop oracles, per image under
left padding and two images; only answer rows and named heads change; decoding; inside a tiny LLaVA."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.edits import parse_edit_spec
from attnlab.edits.dual_stream import DualStream
from attnlab.errors import ConfigError
from edits.helpers import qkv
from edits.vlm_helpers import full_logits, full_probs, layout_roles, role_edited_call

# seq 0: text, 3×3 image, four text tokens; seq 1 (left-padded): text, 2×2 image, text, 3×2 image, three text tokens
LAYOUTS = [["t", (3, 3), "t", "t", "t", "t"], ["t", (2, 2), "t", (3, 2), "t", "t", "t"]]


def setup(seed=0, generated=0):
    roles = layout_roles(LAYOUTS, generated=generated)
    B, L = roles.codes.shape
    query, key, value = qkv(B, 4, 2, L, 8, dtype=torch.float64, seed=seed)
    return roles, query, key, value


def roles_tables(roles):
    """Per column: image index (-1 off images), instruction flag (text after the last image), answer-row flag."""
    B, L = roles.codes.shape
    span = torch.full((B, L), -1, dtype=torch.long)
    for index, image in enumerate(roles.images):
        span[image.sequence, image.start:image.end] = index
    image = roles.mask("image")
    columns = torch.arange(L).expand(B, L)
    last_image = torch.where(image, columns, -1).amax(1, keepdim=True)
    instruction = roles.mask("text") & (columns > last_image)
    prompt = roles.mask("text", "image", "system")
    last_prompt = torch.where(prompt, columns, -1).amax(1, keepdim=True)
    answer = (columns == last_prompt) | roles.mask("generated")
    return span, instruction, answer


def selection_oracle(probs, roles, *, local_ratio, spatial_ratio):
    """Plain loops over the unedited probs (B, H, L, L) of a prompt call → top, bottom (B, L) bool, weight (B, H)."""
    B, H, L, _ = probs.shape
    span, instruction, _ = roles_tables(roles)
    mean = probs.mean(dim=1)
    top = torch.zeros(B, L, dtype=torch.bool)
    bottom = torch.zeros(B, L, dtype=torch.bool)
    weight = torch.zeros(B, H, dtype=torch.float64)
    for b in range(B):
        readers = [i for i in range(L) if instruction[b, i]]
        for index in set(span[b].tolist()) - {-1}:
            tokens = [j for j in range(L) if span[b, j] == index]
            local = torch.tensor([sum(mean[b, i, j] for i in readers) / len(readers) for j in tokens])
            own = [i for i in tokens]
            spatial = torch.tensor([sum(mean[b, i, j] for i in own if i >= j) / sum(1 for i in own if i >= j)
                                    for j in tokens])
            q1, q3 = torch.quantile(local, 0.25), torch.quantile(local, 0.75)
            outliers = {tokens[n] for n in range(len(tokens)) if local[n] > q3 + 1.5 * (q3 - q1)}
            chosen = set()
            for scores, ratio in ((local, local_ratio), (spatial, spatial_ratio)):
                k = math.ceil(ratio * len(tokens))
                chosen |= {tokens[n] for n in scores.topk(k).indices.tolist()} if k else set()
            for j in chosen - outliers:
                top[b, j] = True
            for j in outliers:
                bottom[b, j] = True
        mass = [sum(probs[b, h, i, j] for i in readers for j in range(L) if span[b, j] >= 0) for h in range(H)]
        weight[b] = torch.tensor(mass) / max(mass)
    return top, bottom, weight


def test_selection_and_logits_match_the_oracle():
    roles, query, key, value = setup()
    edit = DualStream(alpha=0.7, beta=0.3, local_ratio=0.25, spatial_ratio=0.25)
    plain_call = role_edited_call([], query, key, value, roles=roles)
    plain_probs, plain_logits = full_probs(plain_call), full_logits(plain_call)
    edited_call = role_edited_call([edit], query, key, value, roles=roles)
    edited_logits = full_logits(edited_call)
    top, bottom, weight = selection_oracle(plain_probs, roles, local_ratio=0.25, spatial_ratio=0.25)
    state = edit._store.tables[2]
    assert torch.equal(state["top"], top) and torch.equal(state["bottom"], bottom)
    torch.testing.assert_close(state["weight"].double(), weight, rtol=1e-6, atol=1e-7)
    for index, image in enumerate(roles.images):  # every image of every sequence has its own selection
        assert top[image.sequence, image.start:image.end].any()
    _, _, answer = roles_tables(roles)
    expected = plain_logits.clone()
    B, H, L, _ = expected.shape
    for b in range(B):
        for h in range(H):
            for i in range(L):
                if not answer[b, i]:
                    continue
                for j in range(L):
                    gain = 0.7 * weight[b, h] * top[b, j] + 0.3 * weight[b, h] * bottom[b, j]
                    expected[b, h, i, j] = plain_logits[b, h, i, j] + gain * abs(plain_logits[b, h, i, j])
    visible = edited_call.keep.expand(B, H, L, L)
    torch.testing.assert_close(edited_logits[visible], expected[visible], rtol=1e-6, atol=1e-6)


def test_only_answer_rows_and_named_heads_change_and_identity_is_exact():
    roles, query, key, value = setup()
    plain = full_probs(role_edited_call([], query, key, value, roles=roles))
    same = full_probs(role_edited_call([parse_edit_spec("dual_stream:alpha=0,beta=0")], query, key, value,
                                       roles=roles))
    assert torch.equal(same, plain)
    edited = full_probs(role_edited_call([DualStream(alpha=2.0, heads=(1,))], query, key, value, roles=roles))
    changed = (edited != plain).any(dim=-1)  # (B, H, L)
    _, _, answer = roles_tables(roles)
    assert changed[:, 1].any() and not changed[:, [0, 2, 3]].any()
    assert not changed.permute(0, 2, 1)[~answer].any()


def test_without_head_modulation_every_head_gets_alpha_and_beta():
    # head_modulation=false: z + α|z| on selected tokens and z + β|z| on sink-like ones with weight 1 on all heads
    roles, query, key, value = setup()
    plain_call = role_edited_call([], query, key, value, roles=roles)
    plain_probs, plain_logits = full_probs(plain_call), full_logits(plain_call)
    edited_call = role_edited_call([DualStream(alpha=2.0, beta=0.5, head_modulation=False)], query, key, value,
                                   roles=roles)
    edited = full_logits(edited_call)
    top, bottom, weight = selection_oracle(plain_probs, roles, local_ratio=0.25, spatial_ratio=0.25)
    assert bottom.any() and (weight < 0.999).any()  # the check below could see a modulated head
    _, _, answer = roles_tables(roles)
    gain = (2.0 * top + 0.5 * bottom).double()[:, None, None, :]  # (B, 1, 1, L): the same on every head
    expected = torch.where(answer[:, None, :, None], plain_logits + gain * plain_logits.abs(), plain_logits)
    visible = edited_call.keep.expand_as(expected)
    torch.testing.assert_close(edited[visible], expected[visible], rtol=1e-6, atol=1e-6)


def test_decode_reuses_the_prompt_selection():
    roles, query, key, value = setup()
    edit = DualStream(alpha=1.0)
    full_probs(role_edited_call([edit], query, key, value, roles=roles))
    stored = {name: t.clone() for name, t in edit._store.tables[2].items()}
    decoded = layout_roles(LAYOUTS, generated=1)
    B, L = roles.codes.shape
    q_new, k_new, v_new = qkv(B, 4, 2, L + 1, 8, dtype=torch.float64, seed=3)
    key2, value2 = torch.cat([key, k_new[:, :, -1:]], 2), torch.cat([value, v_new[:, :, -1:]], 2)
    step = q_new[:, :, -1:]
    plain = full_logits(role_edited_call([], step, key2, value2, roles=decoded))
    edited = full_logits(role_edited_call([edit], step, key2, value2, roles=decoded))
    top = torch.cat([stored["top"], torch.zeros(B, 1, dtype=torch.bool)], 1)[:, None, None, :]
    bottom = torch.cat([stored["bottom"], torch.zeros(B, 1, dtype=torch.bool)], 1)[:, None, None, :]
    weight = stored["weight"].double()[:, :, None, None]
    expected = plain + (1.0 * weight * top + 0.3 * weight * bottom) * plain.abs()
    real = decoded.mask("text", "image", "generated")[:, None, None, :].expand_as(plain)
    torch.testing.assert_close(edited[real], expected[real], rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="no prompt call"):
        full_logits(role_edited_call([DualStream()], step, key2, value2, roles=decoded))


def test_layers_default_from_two():
    assert [layer for layer in range(5) if DualStream().applies_to(layer)] == [2, 3, 4]


# inside a tiny LLaVA ------------------------------------------------------------------------------------------
def test_in_the_model_identity_is_exact_and_only_answer_positions_change():
    from attnlab import Session
    from edits.vlm_helpers import llava_inputs, tiny_llava

    model = tiny_llava(layers=4)
    layouts = [["t", (4, 4), "t", "t", "t"], ["t", "t", (4, 4), "t", (4, 4), "t", "t"], ["t", "t", "t"]]
    batch = llava_inputs(layouts)

    def logits(edits):
        with torch.no_grad(), Session(model, edits=edits, probes=["entropy"]) as session:
            return model(**batch).logits, session

    plain, _ = logits([])
    same, _ = logits(["dual_stream:alpha=0,beta=0"])
    assert torch.equal(same, plain)
    edited, session = logits(["dual_stream:alpha=3,beta=1"])
    changed = (edited != plain).any(dim=-1)  # (B, L)
    assert changed[:2, -1].all() and not changed[:, :-1].any() and not changed[2].any()
    assert session.edit_report().calls_touched[0] == 2  # layers 2 and 3
