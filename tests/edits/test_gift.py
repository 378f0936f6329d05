"""gift (METHODS.md #42, reconstructed from the abstract): the gaze-shift saliency and the amplified probs against
plain-loop oracles, under left padding and two images; only answer rows and named heads change; decoding; inside a
tiny LLaVA."""

from __future__ import annotations

import pytest
import torch

from attnlab.edits import parse_edit_spec
from attnlab.edits.gift import Gift
from attnlab.errors import ConfigError
from edits.helpers import qkv
from edits.test_dual_stream import LAYOUTS, roles_tables, setup
from edits.vlm_helpers import full_probs, layout_roles, role_edited_call


def saliency_oracle(probs, roles):
    """Per sequence: Σ over consecutive instruction rows of max(0, Δ head-mean attention) on image tokens, / max."""
    B, H, L, _ = probs.shape
    span, instruction, _ = roles_tables(roles)
    mean = probs.mean(dim=1)
    saliency = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        rows = [i for i in range(L) if instruction[b, i]]
        for j in range(L):
            if span[b, j] < 0:
                continue
            saliency[b, j] = sum(max(0.0, float(mean[b, rows[k], j] - mean[b, rows[k - 1], j]))
                                 for k in range(1, len(rows)))
        if saliency[b].max() > 0:
            saliency[b] /= saliency[b].max()
    return saliency


def amplify_oracle(probs, roles, saliency, *, alpha, beta, heads=None):
    B, H, L, _ = probs.shape
    span, instruction, answer = roles_tables(roles)
    out = probs.clone()
    for b in range(B):
        for h in range(H):
            if heads is not None and h not in heads:
                continue
            for i in range(L):
                if not answer[b, i]:
                    continue
                row = probs[b, h, i].tolist()
                if sum(row) == 0:
                    continue
                factors = [1 + alpha * float(saliency[b, j]) if span[b, j] >= 0 else
                           (1 + beta if instruction[b, j] else 1.0) for j in range(L)]
                scaled = [r * f for r, f in zip(row, factors)]
                total = sum(scaled)
                out[b, h, i] = torch.tensor([s * sum(row) / total for s in scaled], dtype=torch.float64)
    return out


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.1), (3.0, 0.0), (0.0, 1.0)])
def test_saliency_and_probs_match_the_oracle(alpha, beta):
    roles, query, key, value = setup()
    plain = full_probs(role_edited_call([], query, key, value, roles=roles))
    edit = Gift(alpha=alpha, beta=beta)
    edited = full_probs(role_edited_call([edit], query, key, value, roles=roles))
    saliency = saliency_oracle(plain, roles)
    torch.testing.assert_close(edit._store.tables[2]["saliency"].double(), saliency, rtol=1e-6, atol=1e-7)
    for image in roles.images:  # each sequence's saliency peaks at 1 on one of its images
        assert saliency[image.sequence].max() == 1.0
    expected = amplify_oracle(plain, roles, saliency, alpha=alpha, beta=beta)
    torch.testing.assert_close(edited, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(edited.sum(-1), plain.sum(-1), rtol=1e-12, atol=1e-12)


def test_only_answer_rows_and_named_heads_change_and_identity_is_exact():
    roles, query, key, value = setup()
    plain = full_probs(role_edited_call([], query, key, value, roles=roles))
    same = full_probs(role_edited_call([parse_edit_spec("gift:alpha=0,beta=0")], query, key, value, roles=roles))
    assert torch.equal(same, plain)
    edited = full_probs(role_edited_call([Gift(alpha=2.0, heads=(0, 3))], query, key, value, roles=roles))
    changed = (edited != plain).any(dim=-1)
    _, _, answer = roles_tables(roles)
    assert changed[:, [0, 3]].any() and not changed[:, [1, 2]].any()
    assert not changed.permute(0, 2, 1)[~answer].any()


def test_decode_reuses_the_prompt_saliency():
    roles, query, key, value = setup()
    edit = Gift(alpha=1.0, beta=0.2)
    plain_prompt = full_probs(role_edited_call([], query, key, value, roles=roles))
    full_probs(role_edited_call([edit], query, key, value, roles=roles))
    decoded = layout_roles(LAYOUTS, generated=1)
    B, L = roles.codes.shape
    q_new, k_new, v_new = qkv(B, 4, 2, L + 1, 8, dtype=torch.float64, seed=3)
    key2, value2 = torch.cat([key, k_new[:, :, -1:]], 2), torch.cat([value, v_new[:, :, -1:]], 2)
    step = q_new[:, :, -1:]
    plain = full_probs(role_edited_call([], step, key2, value2, roles=decoded))
    edited = full_probs(role_edited_call([edit], step, key2, value2, roles=decoded))
    saliency = torch.cat([saliency_oracle(plain_prompt, roles), torch.zeros(B, 1, dtype=torch.float64)], 1)
    # the oracle on the decode call: its one row (generated) is an answer row; instruction keys as in the prompt
    full = torch.zeros(B, 4, L + 1, L + 1, dtype=torch.float64)
    full[:, :, -1:] = plain
    expected = amplify_oracle(full, decoded, saliency, alpha=1.0, beta=0.2)[:, :, -1:]
    torch.testing.assert_close(edited, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="no prompt call"):
        full_probs(role_edited_call([Gift()], step, key2, value2, roles=decoded))


def test_keys_is_not_a_parameter():  # gift picks its own keys (image and instruction)
    with pytest.raises(ConfigError, match="no parameter keys"):
        parse_edit_spec("gift:keys=image")


def test_in_the_model_identity_is_exact_and_only_answer_positions_change():
    from attnlab import Session
    from edits.vlm_helpers import llava_inputs, tiny_llava

    model = tiny_llava(layers=2)
    batch = llava_inputs([["t", (4, 4), "t", "t", "t"], ["t", (4, 4), "t", (4, 4), "t", "t"], ["t", "t"]])

    def logits(edits):
        with torch.no_grad(), Session(model, edits=edits, probes=["entropy"]) as session:
            return model(**batch).logits

    plain = logits([])
    assert torch.equal(logits(["gift:alpha=0,beta=0"]), plain)
    changed = (logits(["gift:alpha=4,beta=1"]) != plain).any(dim=-1)
    assert changed[:2, -1].all() and not changed[:, :-1].any() and not changed[2].any()
