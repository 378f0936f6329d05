"""``head_patch``: head outputs replaced by those recorded on another input, against an independent oracle (a
forward pre-hook on ``o_proj`` that reads the source's head outputs and writes them into the patched pass)."""

from __future__ import annotations

import pytest
import torch

from attnlab import Session
from attnlab.capture.head_record import record_head_outputs
from attnlab.edits import EDITS
from attnlab.edits.head_patch import HeadPatch
from attnlab.errors import ConfigError
from attnlab.testing import MODEL_LOGITS_ATOL
from tiny_models import tiny_llama

H, L = 4, 12
G = torch.Generator().manual_seed(5)
IDS = torch.randint(0, 97, (2, L), generator=G)
OTHER = torch.randint(0, 97, (2, L), generator=G)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_heads=H, num_kv_heads=2, layers=2)  # GQA: 2 query heads per kv head


def o_proj(model, layer):
    return model.model.layers[layer].self_attn.o_proj


def oracle_head_inputs(model, ids, mask=None):
    """{layer: (B, L, H, D)} o_proj inputs of a plain HF pass (no attnlab)."""
    seen, hooks = {}, []
    for layer in range(2):
        hooks.append(o_proj(model, layer).register_forward_pre_hook(
            lambda m, args, layer=layer: seen.__setitem__(layer, args[0].detach().view(*args[0].shape[:2], H, -1))))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def oracle_logits(model, ids, replace, mask=None):
    """Logits of a plain HF pass whose o_proj input slices are replaced: replace = {(layer, head): (B, L, D) or a
    function of the current (B, L, D) slice}; rows where ``mask`` is 0 are left alone."""
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    hooks = []

    def hook(module, args, layer):
        x = args[0].clone().view(*args[0].shape[:2], H, -1)
        for (lay, head), new in replace.items():
            if lay == layer:
                new = new(x[:, :, head]) if callable(new) else new
                x[:, :, head] = torch.where(valid[..., None], new.to(x.dtype), x[:, :, head])
        return (x.flatten(2),)

    for layer in range(2):
        hooks.append(o_proj(model, layer).register_forward_pre_hook(lambda m, a, layer=layer: hook(m, a, layer)))
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits
    finally:
        for handle in hooks:
            handle.remove()


def patched_logits(model, edits, ids, mask=None, probes=()):
    with torch.no_grad(), Session(model, edits=edits, probes=probes) as session:
        out = model(input_ids=ids, attention_mask=mask).logits
    return out, session


def test_patching_a_head_with_its_own_output_changes_nothing(model):
    source = record_head_outputs(model, IDS, layers=[0, 1], heads=[1, 2])
    plain, _ = patched_logits(model, [EDITS.get("head_scale")(scale=1.0)], IDS)
    patched, session = patched_logits(model, [HeadPatch.from_source(source)], IDS)
    assert (patched - plain).abs().max() <= 1e-6
    report = session.edit_report()
    assert report.calls_touched[0] == 2 and report.heads_touched[0] == 4 and report.max_change[0] <= 1e-6


@pytest.mark.parametrize("probes", [(), ("entropy",)], ids=["fast", "eager"])
def test_patching_from_another_input_equals_the_o_proj_oracle(model, probes):
    source = record_head_outputs(model, OTHER, layers=[1], heads=[0, 3])
    patched, session = patched_logits(model, [HeadPatch.from_source(source)], IDS, probes=probes)
    other = oracle_head_inputs(model, OTHER)
    expected = oracle_logits(model, IDS, {(1, 0): other[1][:, :, 0], (1, 3): other[1][:, :, 3]})
    torch.testing.assert_close(patched, expected, atol=MODEL_LOGITS_ATOL, rtol=0)
    assert not torch.allclose(patched, oracle_logits(model, IDS, {}), atol=1e-4), "the patch must change the logits"
    path = "sdpa+edits" if not probes else "blocked_eager+edits"
    assert session.attention_paths[1] == path
    report = session.edit_report()
    assert report.edit[0] == "head_patch" and report.calls_touched[0] == 1 and report.heads_touched[0] == 2
    assert report.max_change[0] > 0
    assert list(source.outputs[1].shape) == [2, 2, L, 8] and source.heads == (0, 3)


def test_a_head_of_a_gqa_group_is_patched_alone(model):
    source = record_head_outputs(model, OTHER, layers=[0], heads=[1])
    seen = {}
    hook = o_proj(model, 0).register_forward_pre_hook(
        lambda m, a: seen.__setitem__("x", a[0].detach().view(2, L, H, -1)))
    try:
        patched_logits(model, [HeadPatch.from_source(source)], IDS)
    finally:
        hook.remove()
    plain, other = oracle_head_inputs(model, IDS)[0], oracle_head_inputs(model, OTHER)[0]
    torch.testing.assert_close(seen["x"][:, :, 1], other[:, :, 1], atol=1e-6, rtol=0)
    # head 0 shares head 1's kv head and is left alone
    torch.testing.assert_close(seen["x"][:, :, [0, 2, 3]], plain[:, :, [0, 2, 3]], atol=1e-6, rtol=0)


def test_fraction_mixes_and_zero_is_the_identity(model):
    source = record_head_outputs(model, OTHER, layers=[0], heads=[2])
    half, _ = patched_logits(model, [HeadPatch.from_source(source, fraction=0.5)], IDS)
    other = oracle_head_inputs(model, OTHER)[0][:, :, 2]
    expected = oracle_logits(model, IDS, {(0, 2): lambda own: 0.5 * own + 0.5 * other})
    torch.testing.assert_close(half, expected, atol=MODEL_LOGITS_ATOL, rtol=0)
    plain, _ = patched_logits(model, ["head_scale:scale=1"], IDS)
    none, session = patched_logits(model, ["head_patch:fraction=0"], IDS)  # the identity needs no source
    assert torch.equal(none, plain) and bool(session.edit_report().identity[0])


def test_left_padded_batch_patches_real_tokens_like_each_sequence_alone(model):
    mask = torch.ones_like(IDS)
    mask[1, :5] = 0
    source = record_head_outputs(model, {"input_ids": OTHER, "attention_mask": mask}, layers=[0], heads=[0, 1])
    assert source.valid.tolist() == mask.bool().tolist()
    patched, _ = patched_logits(model, [HeadPatch.from_source(source)], IDS, mask=mask)
    other = oracle_head_inputs(model, OTHER, mask)[0]
    expected = oracle_logits(model, IDS, {(0, 0): other[:, :, 0], (0, 1): other[:, :, 1]}, mask=mask)
    real = mask.bool()
    torch.testing.assert_close(patched[real], expected[real], atol=MODEL_LOGITS_ATOL, rtol=0)
    alone_source = record_head_outputs(model, OTHER[1:, 5:], layers=[0], heads=[0, 1])
    alone, _ = patched_logits(model, [HeadPatch.from_source(alone_source)], IDS[1:, 5:])
    torch.testing.assert_close(patched[1, 5:], alone[0], atol=1e-4, rtol=0)


def test_shape_and_padding_mismatches_are_one_line_config_errors(model):
    source = record_head_outputs(model, OTHER[:, :8], layers=[0], heads=[0])
    with pytest.raises(ConfigError, match=r"source has batch 2 and q_len 8.*batch 2 and q_len 12") as info:
        patched_logits(model, [HeadPatch.from_source(source)], IDS)
    assert "\n" not in str(info.value)
    mask = torch.ones_like(IDS)
    mask[0, :3] = 0
    padded = record_head_outputs(model, {"input_ids": OTHER, "attention_mask": mask}, layers=[0], heads=[0])
    with pytest.raises(ConfigError, match="3 real query position"):
        patched_logits(model, [HeadPatch.from_source(padded)], IDS)


def test_without_a_source_the_spec_form_says_to_use_the_python_api(model):
    with pytest.raises(ConfigError, match="head_patch needs recorded head outputs; use the Python API") as info:
        Session(model, edits=["head_patch:heads=1"])
    assert "\n" not in str(info.value)
    source = record_head_outputs(model, OTHER, layers=[0], heads=[1])
    with pytest.raises(ConfigError, match=r"head\(s\) \[2\] were not recorded"):
        EDITS.get("head_patch")(heads=[1, 2]).with_source(source)
    with pytest.raises(ConfigError, match=r"layer\(s\) \[1\] were not recorded"):
        Session(model, edits=[EDITS.get("head_patch")(heads=[1]).with_source(source)])  # layers=None: all layers
    edit = EDITS.get("head_patch")(layers=[0], heads=[1]).with_source(source)
    assert edit.spec() == "head_patch:fraction=1.0,layers=0,heads=1"
