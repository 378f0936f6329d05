"""DiffusionSession on tiny random diffusers transformers: routing, layouts, steps, restore, bad input."""

from __future__ import annotations

import pytest
import torch
from vlm_fixtures import Recorder

from attnlab.diffusion import DiffusionSession
from attnlab.errors import ConfigError, EditNotFiredError, UnsupportedModelError
from attnlab.roles import role_codes
from attnlab.testing import DIFFUSERS_KINDS, tiny_diffusers

IMAGE, TEXT = (int(code) for code in role_codes(("image", "text")))


def _run(model, inputs, **session):
    with torch.no_grad(), DiffusionSession(model, **session) as s:
        output = model(**inputs)[0]
    return output, s


@pytest.mark.parametrize("kind", DIFFUSERS_KINDS)
def test_no_probe_and_identity_edits_are_bit_identical(kind):
    model, inputs = tiny_diffusers(kind)
    x = inputs(batch=2)
    with torch.no_grad():
        reference = model(**x)[0]
    plain, _ = _run(model, x)
    identity, session = _run(model, x, edits=["temperature:tau=1.0", "identity_blend:alpha=0"])
    assert torch.equal(plain, reference) and torch.equal(identity, reference)
    assert set(session.edit_report()["calls_touched"]) == {session.facts.num_layers}


@pytest.mark.parametrize("kind", DIFFUSERS_KINDS)
def test_probed_forward_matches_the_model(kind):
    model, inputs = tiny_diffusers(kind)
    x = inputs(batch=2)
    with torch.no_grad():
        reference = model(**x)[0]
    output, session = _run(model, x, probes=["entropy"], probe_kernel="blocked")
    torch.testing.assert_close(output, reference, atol=1e-5, rtol=1e-5)
    assert set(session.attention_paths.values()) == {"blocked_eager"}
    assert session.results()["value"].notna().all()


EXPECTED = {  # kind → per-layer call kinds, grid, whether joint text comes first
    "dit": (["self", "self"], (1, 4, 4), None),
    "pixart": (["self", "cross", "self", "cross"], (1, 4, 4), None),
    "sd3": (["joint", "joint"], (1, 4, 4), False),
    "flux": (["joint", "joint", "joint"], (1, 4, 4), True),
    "wan": (["self", "cross", "self", "cross"], (2, 4, 4), None),
}


@pytest.mark.parametrize("kind", DIFFUSERS_KINDS)
def test_call_records_know_kind_grid_and_roles(kind):
    model, inputs = tiny_diffusers(kind)
    recorder = Recorder()
    _, session = _run(model, inputs(batch=2, text=5), probes=[recorder])
    kinds, grid, text_first = EXPECTED[kind]
    recorded = session.probes_at(0)[0].calls
    assert [recorded[layer].kind for layer in sorted(recorded)] == kinds
    assert list(session.layer_table()["kind"]) == kinds
    for call in recorded.values():
        assert call.grid == grid and call.step == 0 and call.block == session.layer_table()["block"][call.layer_idx]
        patches = grid[0] * grid[1] * grid[2]
        assert int((call.query_roles[0] == IMAGE).sum()) == patches
        if call.kind == "cross":
            assert bool((call.key_roles == TEXT).all()) and call.kv_len == 5
        if call.kind == "joint":
            expected = [TEXT] * 5 + [IMAGE] * patches if text_first else [IMAGE] * patches + [TEXT] * 5
            assert call.key_roles[1].tolist() == expected
            assert call.images[0].start == (5 if text_first else 0) and call.images[0].frames == grid[0]


def test_steps_follow_the_timesteps_and_restart_per_sample():
    model, inputs = tiny_diffusers("pixart")
    with torch.no_grad(), DiffusionSession(model, probes=["entropy"]) as session:
        seen = []
        for t in (900.0, 500.0, 500.0, 100.0, 900.0, 400.0):
            model(**inputs(timestep=t))
            seen.append(session.step)
    assert seen == [0, 1, 1, 2, 0, 1] and session.samples == 2
    assert session.timesteps == {0: 900.0, 1: 500.0, 2: 100.0}
    frame = session.results()
    assert sorted(frame["denoising_step"].unique()) == [0, 1, 2]
    summed = session.results(per_step=False)
    assert "denoising_step" not in summed and len(summed) == len(frame[frame["denoising_step"] == 0])


def test_step_scheduled_edit_acts_only_on_its_steps():
    model, inputs = tiny_diffusers("pixart")
    with torch.no_grad():
        plain = [model(**inputs(timestep=t))[0] for t in (900.0, 500.0)]
    with torch.no_grad(), DiffusionSession(model, edits=["temperature:tau=0.5,steps=1"]) as session:
        edited = [model(**inputs(timestep=t))[0] for t in (900.0, 500.0)]
    assert torch.equal(edited[0], plain[0]) and not torch.allclose(edited[1], plain[1])
    assert int(session.edit_report()["calls_touched"][0]) == session.facts.num_layers
    assert session.edits[0].spec().endswith(",steps=1")


def test_set_step_overrides_the_timesteps_and_unfired_steps_fail_loudly():
    model, inputs = tiny_diffusers("dit")
    with torch.no_grad(), DiffusionSession(model, edits=["temperature:tau=0.5,steps=3"]) as session:
        session.set_step(3)
        model(**inputs(timestep=10.0))
        assert session.step == 3
    with pytest.raises(EditNotFiredError), torch.no_grad(), DiffusionSession(model, edits=["temperature:tau=0.5,steps=7"]):
        model(**inputs())
    with pytest.raises(ConfigError, match="step must be"):
        session.set_step(-1)


def test_processors_are_restored_on_exit_and_on_errors():
    model, inputs = tiny_diffusers("wan")
    before = [module.processor for _, module in model.named_modules() if hasattr(module, "set_processor")]
    with pytest.raises(RuntimeError, match="boom"), DiffusionSession(model, probes=["entropy"]):
        raise RuntimeError("boom")
    after = [module.processor for _, module in model.named_modules() if hasattr(module, "set_processor")]
    assert all(a is b for a, b in zip(before, after))


def test_roles_select_keys_in_a_joint_call():
    model, inputs = tiny_diffusers("sd3")
    x = inputs()
    with torch.no_grad():
        reference = model(**x)[0]
    text_only, _ = _run(model, x, edits=["mask:name=full,keys=text"])
    masked_text, _ = _run(model, x, edits=["temperature:tau=0.5,keys=text"])
    torch.testing.assert_close(text_only, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(masked_text, reference)


def test_bad_input():
    with pytest.raises(UnsupportedModelError, match="not a diffusers model"):
        DiffusionSession(torch.nn.Linear(2, 2))
    model, _ = tiny_diffusers("dit")
    with pytest.raises(ConfigError, match="hidden states"):
        DiffusionSession(model, probes=["norms"])
    with pytest.raises(ConfigError, match="layers"):
        DiffusionSession(model, edits=["temperature:tau=0.5,layers=5"])
    with pytest.raises(ConfigError):
        DiffusionSession(model, edits=["temperature:tau=0.5,steps=-1"])


@pytest.mark.parametrize("kind", ["pixart", "wan"])
def test_cross_attention_with_as_many_text_tokens_as_patches_is_cross(kind):
    model, inputs = tiny_diffusers(kind)
    patches = 16 if kind == "pixart" else 32  # 4×4 patches; Wan: 2 frames of 4×4
    _, session = _run(model, inputs(text=patches), probes=[Recorder()])
    calls = session.probes_at(0)[0].calls
    assert [calls[layer].kind for layer in sorted(calls)] == ["self", "cross", "self", "cross"]
    assert bool((calls[1].key_roles == TEXT).all())


def test_keyword_forwards_count_sequences():
    model, inputs = tiny_diffusers("wan")
    with torch.no_grad(), DiffusionSession(model, probes=["entropy"]) as session:
        model(**inputs(batch=2))
        model(**inputs(batch=2, timestep=100.0))
    assert session.num_sequences == 4


def test_padded_caption_keys_are_not_attended_or_counted():
    """A caption of 3 tokens padded to 5 gives the cross layers' probes what the 3-token caption alone gives."""
    model, inputs = tiny_diffusers("pixart")
    padded = inputs(text=5)
    short = {**padded, "encoder_hidden_states": padded["encoder_hidden_states"][:, :3]}
    padded["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0]])

    def cross_entropy(x):
        _, session = _run(model, x, probes=["entropy"], probe_kernel="blocked")
        frame = session.results()
        rows = frame[(frame.statistic == "entropy") & frame.layer.isin([1, 3])]
        return torch.tensor(rows["value"].to_numpy(dtype=float))

    torch.testing.assert_close(cross_entropy(padded), cross_entropy(short), atol=1e-5, rtol=1e-5)
