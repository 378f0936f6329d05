"""VAR (METHODS.md #8): against a plain-loop float64 oracle, identity, which rows/heads/sequences change, decoding,
default layers, and inside a tiny LLaVA through the Session."""

from __future__ import annotations

import pytest
import torch

from attnlab.edits import parse_edit_spec
from attnlab.edits.var import Var
from attnlab.errors import ConfigError
from edits.helpers import qkv
from edits.vlm_helpers import full_probs, layout_roles, role_edited_call

# seq 0: two text tokens, a 3×3 image, four text tokens; seq 1 (left-padded by 3): text, 2×2 image, text, 2×2 image,
# two text tokens
LAYOUTS = [["t", "t", (3, 3), "t", "t", "t", "t"], ["t", (2, 2), "t", (2, 2), "t", "t"]]
DIMS = (3, 7)
PLANTED = [(0, 0), (0, 6), (1, 3), (1, 10)]  # (sequence, column): BOS of each, one image token of each


def hidden_states(roles, D=16, seed=0, planted=PLANTED):
    """(B, L, D) float64 with massive values in DIMS at the planted columns (φ ≈ 3.9 there, |z| elsewhere)."""
    B, L = roles.codes.shape
    hidden = 0.5 * torch.randn(B, L, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for b, column in planted:
        hidden[b, column, DIMS[column % 2]] = 50.0
    return hidden


def phi_sinks(hidden, valid, dims, tau):
    """Plain-loop sink detection of METHODS #8: max_{d∈dims} |x_d / sqrt(mean(x²) + 1e-6)| > τ."""
    B, L, D = hidden.shape
    sinks = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        for t in range(L):
            x = hidden[b, t].tolist()
            rms = (sum(v * v for v in x) / D + 1e-6) ** 0.5
            sinks[b, t] = bool(valid[b, t]) and max(abs(x[d]) / rms for d in dims) > tau
    return sinks


def var_oracle(probs, image, sinks, after, *, p, rho, summ, heads=None):
    """METHODS #8 with plain loops: probs (B, H, Lq, Lk) float64 → redistributed probs."""
    out = probs.clone()
    B, H, Lq, Lk = probs.shape
    for b in range(B):
        if not any(bool(image[b, j] and sinks[b, j]) for j in range(Lk)):
            continue  # no visual sink in the sequence: the released code edits nothing
        image_keys = [j for j in range(Lk) if image[b, j]]
        sink_keys = [j for j in range(Lk) if sinks[b, j]]
        targets = [j for j in image_keys if not sinks[b, j]]
        for h in range(H):
            if heads is not None and h not in heads:
                continue
            for i in range(Lq):
                if not after[b, i]:
                    continue
                row = probs[b, h, i].tolist()
                budget = sum(row[j] for j in image_keys)
                if budget <= 0 or budget < summ:
                    continue
                if sum(row[j] for j in image_keys if sinks[b, j]) / budget > rho:
                    continue
                freed = (1 - p) * sum(row[j] for j in sink_keys)
                total = sum(row[j] for j in targets)
                if total == 0:
                    continue
                for j in sink_keys:
                    out[b, h, i, j] = p * row[j]
                for j in targets:
                    out[b, h, i, j] = row[j] + freed * row[j] / total
    return out


def setup(seed=0):
    roles = layout_roles(LAYOUTS)
    B, L = roles.codes.shape
    query, key, value = qkv(B, 4, 2, L, 8, dtype=torch.float64, seed=seed)
    return roles, query, key, value, hidden_states(roles)


def after_last_image(roles):
    image = roles.mask("image")
    columns = torch.arange(image.shape[1]).expand_as(image)
    last = torch.where(image, columns, -1).amax(dim=1, keepdim=True)
    return (columns > last) & roles.mask("text", "system", "generated")


@pytest.mark.parametrize("p,rho,summ", [(0.6, 0.5, 0.2), (0.2, 0.3, 0.05), (0.0, 1.0, 0.0)])
def test_var_matches_the_plain_loop_oracle(p, rho, summ):
    roles, query, key, value, hidden = setup()
    edit = Var(p=p, rho=rho, summ=summ, tau=3.0, dims=DIMS)
    plain = full_probs(role_edited_call([], query, key, value, roles=roles))
    edited = full_probs(role_edited_call([edit], query, key, value, roles=roles, hidden=hidden))
    valid = roles.mask("text", "image", "system", "generated")
    sinks = phi_sinks(hidden, valid, DIMS, 3.0)
    assert all(sinks[b, c] for b, c in PLANTED)  # both visual and text sinks are present
    expected = var_oracle(plain, roles.mask("image"), sinks, after_last_image(roles), p=p, rho=rho, summ=summ)
    assert not torch.equal(expected, plain), "the case must select some rows"
    torch.testing.assert_close(edited, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(edited.sum(-1), plain.sum(-1), rtol=1e-12, atol=1e-12)


def test_data_driven_dims_find_the_planted_dimensions():
    roles, query, key, value, hidden = setup()
    auto = full_probs(role_edited_call([Var(tau=3.0, summ=0.05)], query, key, value, roles=roles, hidden=hidden))
    given = full_probs(role_edited_call([Var(tau=3.0, summ=0.05, dims=DIMS)], query, key, value, roles=roles,
                                        hidden=hidden))
    assert torch.equal(auto, given)


def test_a_sequence_sinks_and_edit_do_not_depend_on_its_batch_mates():
    # sequence 1 gets two extra massive dims (11, 12) that sequence 0 lacks: sequence 0's D_sink, sinks and edited
    # probs must be what it gets alone, and each sequence's sinks what a per-sequence plain loop finds
    roles, query, key, value, hidden = setup()
    hidden[1, 4, 11] = hidden[1, 5, 12] = 80.0
    batched = full_probs(role_edited_call([Var(tau=3.0, summ=0.05)], query, key, value, roles=roles, hidden=hidden))
    alone_roles = layout_roles(LAYOUTS[:1])
    L, L0 = roles.codes.shape[1], alone_roles.codes.shape[1]
    cut = slice(L - L0, L)  # sequence 0 is the longer one: alone it loses the batch's leading columns (none here)
    alone = full_probs(role_edited_call([Var(tau=3.0, summ=0.05)], query[:1, :, cut], key[:1, :, cut],
                                        value[:1, :, cut], roles=alone_roles, hidden=hidden[:1, cut]))
    assert torch.equal(batched[0, :, :, cut], alone[0])
    from attnlab.functional.sink_dims import sink_flags

    valid = roles.mask("text", "image")
    flags, dims = sink_flags(hidden, valid, top=2, tau=3.0)
    assert 3 in dims[0].tolist() and not {11, 12} & set(dims[0].tolist())  # its planted dim, not its mate's
    for b in range(2):  # the oracle: the top-2 dims by max φ over this sequence's real tokens only
        x = hidden[b][valid[b]]
        phi = x.abs() / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        own = sorted(range(16), key=lambda d: -float(phi[:, d].max()))[:2]
        assert sorted(dims[b].tolist()) == sorted(own)
        assert torch.equal(flags[b], phi_sinks(hidden[b:b + 1], valid[b:b + 1], own, 3.0)[0])


def test_identity_and_rows_heads_and_sequences_that_must_not_change():
    roles, query, key, value, hidden = setup()
    plain = full_probs(role_edited_call([], query, key, value, roles=roles))
    same = full_probs(role_edited_call([parse_edit_spec("var:p=1")], query, key, value, roles=roles, hidden=hidden))
    assert torch.equal(same, plain)
    edited = full_probs(role_edited_call([Var(p=0.2, tau=3.0, dims=DIMS, summ=0.05, heads=(1, 2))], query, key,
                                         value, roles=roles, hidden=hidden))
    changed = (edited != plain).any(dim=-1)  # (B, H, Lq)
    assert changed.any()
    assert not changed[:, [0, 3]].any()  # heads not named
    assert not changed.permute(0, 2, 1)[~after_last_image(roles)].any()  # rows up to the last image token
    # a sequence without a visual sink is left alone
    text_only_sinks = hidden_states(roles, planted=[(0, 0), (1, 3)])
    untouched = full_probs(role_edited_call([Var(p=0.2, tau=3.0, dims=DIMS, summ=0.0)], query, key, value,
                                            roles=roles, hidden=text_only_sinks))
    assert torch.equal(untouched, plain)


def test_no_roles_no_change_and_missing_hidden_states_is_refused():
    from edits.helpers import edited_call

    query, key, value = qkv(2, 4, 2, 9, 8, dtype=torch.float64)
    plain = full_probs(edited_call([], query, key, value))
    assert torch.equal(full_probs(edited_call([Var(tau=1.0, summ=0.0)], query, key, value)), plain)  # text only
    roles, query, key, value, _ = setup()
    with pytest.raises(ConfigError, match="hidden states"):
        full_probs(role_edited_call([Var()], query, key, value, roles=roles))
    with pytest.raises(ConfigError, match="dims=.*16 dimensions"):
        full_probs(role_edited_call([Var(dims=(3, 40))], query, key, value, roles=roles,
                                    hidden=hidden_states(roles)))


def test_decode_calls_reuse_the_prompt_sinks():
    roles, query, key, value, hidden = setup()
    edit = Var(p=0.2, tau=3.0, dims=DIMS, summ=0.05)
    B, L = roles.codes.shape
    full_probs(role_edited_call([edit], query, key, value, roles=roles, hidden=hidden))  # the prompt call
    decoded = layout_roles(LAYOUTS, generated=1)
    q_new, k_new, v_new = qkv(B, 4, 2, L + 1, 8, dtype=torch.float64, seed=5)
    key2, value2 = torch.cat([key, k_new[:, :, -1:]], 2), torch.cat([value, v_new[:, :, -1:]], 2)
    step = q_new[:, :, -1:]
    plain = full_probs(role_edited_call([], step, key2, value2, roles=decoded))
    edited = full_probs(role_edited_call([edit], step, key2, value2, roles=decoded, hidden=hidden[:, -1:]))
    prompt_sinks = phi_sinks(hidden, roles.mask("text", "image"), DIMS, 3.0)
    sinks = torch.cat([prompt_sinks, torch.zeros(B, 1, dtype=torch.bool)], 1)
    expected = var_oracle(plain, decoded.mask("image"), sinks, torch.ones(B, 1, dtype=torch.bool), p=0.2, rho=0.5,
                          summ=0.05)
    torch.testing.assert_close(edited, expected, rtol=1e-12, atol=1e-12)
    fresh = Var(p=0.2, tau=3.0, dims=DIMS)
    with pytest.raises(ConfigError, match="no prompt call"):
        full_probs(role_edited_call([fresh], step, key2, value2, roles=decoded, hidden=hidden[:, -1:]))


def test_default_layers_are_two_to_the_one_before_last():
    edit = Var()
    edit.check_model(6, 4)
    assert [layer for layer in range(6) if edit.applies_to(layer)] == [2, 3, 4]
    keep_last = Var(except_last_layer=False)
    keep_last.check_model(6, 4)
    assert [layer for layer in range(6) if keep_last.applies_to(layer)] == [2, 3, 4, 5]
    assert [layer for layer in range(6) if Var(layers=(0, 5)).applies_to(layer)] == [0, 5]
    assert parse_edit_spec(Var(dims=(1, 2)).spec()).spec() == "var:p=0.6,tau=20.0,rho=0.5,summ=0.2,dims=1+2," \
                                                               "except_last_layer=true"


# inside a tiny LLaVA ------------------------------------------------------------------------------------------
MODEL_LAYOUTS = [["t", (4, 4), "t", "t", "t"], ["t", "t", (4, 4), "t", (4, 4), "t", "t"], ["t", "t", "t"]]


@pytest.fixture(scope="module")
def llava():
    from edits.vlm_helpers import tiny_llava

    return tiny_llava(layers=4)


def session_logits(model, batch, edits):
    from attnlab import Session

    with torch.no_grad(), Session(model, edits=edits, probes=["entropy"]) as session:  # eager path for all
        return model(**batch).logits, session


def test_in_the_model_identity_is_exact_and_only_rows_after_the_image_change(llava):
    from edits.vlm_helpers import llava_inputs

    batch = llava_inputs(MODEL_LAYOUTS)
    roles = layout_roles([[(item if item == "t" else (4, 4)) for item in layout] for layout in MODEL_LAYOUTS])
    # plant massive activations in dims 5 / 9 of layer 2's input on chosen tokens (a BOS-like text token and image
    # tokens), so the expected sinks are known without the library's detector
    planted = torch.zeros(roles.codes.shape, dtype=torch.bool)
    image = roles.mask("image")
    for b in range(2):
        first, on_image = int(roles.mask("text")[b].nonzero()[0]), image[b].nonzero().flatten()
        planted[b, first] = planted[b, on_image[0]] = planted[b, on_image[-1]] = True
    planted[2, int(roles.mask("text")[2].nonzero()[0])] = True

    def plant(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        hidden[..., 5] = torch.where(planted, 400.0, hidden[..., 5])
        hidden[..., 9] = torch.where(planted & image, -300.0, hidden[..., 9])
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    handle = llava.model.language_model.layers[2].register_forward_pre_hook(plant, with_kwargs=True)
    try:
        plain, _ = session_logits(llava, batch, [])
        same, _ = session_logits(llava, batch, ["var:p=1"])
        edit = Var(tau=4.0, summ=0.05)  # φ ≤ √32 ≈ 5.7 on a 32-wide state: the planted tokens reach ≈ 5.5
        edited, session = session_logits(llava, batch, [edit])
    finally:
        handle.remove()
    assert torch.equal(same, plain)
    changed = (edited != plain).any(dim=-1)  # (B, L)
    after = after_last_image(roles)
    assert changed[:2].any() and not changed[~after].any() and not changed[2].any()
    assert session.edit_report().calls_touched[0] == 1  # layers 2 … L-2 of 4: layer 2 only
    assert torch.equal(edit._prompt_sinks[2].cpu(), planted)  # the sinks are the planted tokens


@pytest.mark.parametrize("spec", ["var:tau=2,summ=0.05", "cca", "dual_stream:alpha=2", "gift:alpha=2,beta=0.5"])
def test_generate_runs_and_identity_keeps_the_tokens(llava, spec):
    from attnlab import Session
    from edits.vlm_helpers import llava_inputs

    batch = llava_inputs(MODEL_LAYOUTS[:2])
    identity = parse_edit_spec(spec)
    identity = type(identity)(**{**identity.params(), **type(identity).identity})

    def generate(edits):
        with torch.no_grad(), Session(llava, edits=edits, probes=["entropy"]) as session:
            return llava.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=3), session

    plain, _ = generate([])
    same, _ = generate([identity])
    assert torch.equal(same, plain)
    _, session = generate([spec])
    assert session.edit_report().calls_touched[0] > 0


def test_keys_name_the_tokens_that_receive_the_budget():
    roles, query, key, value, hidden = setup()
    plain = full_probs(role_edited_call([], query, key, value, roles=roles))
    image_only = full_probs(role_edited_call([Var(p=0.2, tau=3.0, dims=DIMS, summ=0.05)], query, key, value,
                                             roles=roles, hidden=hidden))
    spec = parse_edit_spec("var:p=0.2,tau=3,summ=0.05,dims=3+7,keys=image")
    assert torch.equal(full_probs(role_edited_call([spec], query, key, value, roles=roles, hidden=hidden)), image_only)
    wide = full_probs(role_edited_call([Var(p=0.2, tau=3.0, dims=DIMS, summ=0.05, keys=("image", "text"))], query,
                                       key, value, roles=roles, hidden=hidden))
    sinks = phi_sinks(hidden, roles.mask("text", "image"), DIMS, 3.0)
    text_non_sink = (roles.mask("text") & ~sinks)[:, None, None, :]
    gained = (wide - plain) * text_non_sink
    assert (gained >= 0).all() and gained.sum() > 0  # text tokens now receive part of the budget
    assert torch.equal(((image_only - plain) * text_non_sink).abs().sum(), torch.zeros((), dtype=torch.float64))
