"""ProfilingDiT: foreground profile and block classes on hand-built probs; the block cache's schedule and reuse."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from attnlab.diffusion.profiling import (
    BlockCache, block_preference, choose_step_start, classify_blocks, foreground_share, preference, step_similarity,
)
from attnlab.errors import ConfigError, ShapeError


def test_foreground_share_pools_mass_on_foreground_keys():
    probs = torch.zeros(1, 2, 2, 4, dtype=torch.float64)  # 2 heads, 2 queries, 4 patches
    probs[0, 0, :, 0] = 1.0  # head 0: all on patch 0 (foreground)
    probs[0, 1, :, 3] = 1.0  # head 1: all on patch 3 (background)
    fg, total = foreground_share(probs, torch.tensor([True, False, False, False]))
    assert (float(fg), float(total)) == (1.0, 2.0)  # head mean 0.5 per query on patch 0, two queries
    with pytest.raises(ShapeError, match="foreground mask has 3 patches"):
        foreground_share(probs, torch.ones(3, dtype=torch.bool))


@given(st.floats(0.01, 0.99))
def test_preference_is_zero_when_attention_follows_area(area):
    share = torch.tensor(area, dtype=torch.float64)
    assert abs(float(preference(share, area))) < 1e-9
    assert float(preference(share + (1 - area) / 2, area)) > 0  # more than its area: foreground-focused


def test_blocks_average_their_layers_and_get_a_class():
    layer_pref = {0: 1.0, 1: 3.0, 2: -2.0, 3: float("nan"), 4: 0.05}
    blocks = block_preference(layer_pref, {0: 0, 1: 0, 2: 1, 3: 1, 4: 2})
    assert blocks == {0: 2.0, 1: -2.0, 2: 0.05}
    assert classify_blocks(blocks) == {0: "foreground", 1: "background", 2: "foreground"}
    assert classify_blocks(blocks, margin=0.1) == {0: "foreground", 1: "background", 2: "mixed"}
    with pytest.raises(ConfigError, match="layer 5 has no block"):
        block_preference({5: 1.0}, {0: 0})


def test_step_start_is_where_similarity_settles():
    assert choose_step_start([0.5, 0.8, 0.97, 0.99, 0.98], 0.95) == 3  # steps 2→3 onwards are similar
    assert choose_step_start([0.99, 0.99], 0.95) == 1
    assert choose_step_start([0.5, 0.99, 0.9], 0.95) == 4  # the tail never settles
    x = torch.randn(3, 4)
    assert step_similarity(x, 2 * x) == pytest.approx(1.0)
    assert step_similarity(x, -x) == pytest.approx(-1.0)


class _Residual(nn.Module):
    """hidden + tanh(W hidden + t): a residual block whose delta depends on its input and the timestep."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)))

    def forward(self, hidden_states, temb):
        return hidden_states + torch.tanh(self.linear(hidden_states) + temb)


class _Joint(nn.Module):
    """Returns (encoder_hidden_states, hidden_states) like diffusers' joint blocks."""

    def forward(self, hidden_states, encoder_hidden_states, temb):
        return encoder_hidden_states + temb.mean(), hidden_states * 2 + temb


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList([_Residual(0), _Residual(1), _Residual(2)])
        self.single_transformer_blocks = nn.ModuleList([_Joint()])

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        temb = timestep.double().view(-1, 1, 1) / 1000
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, temb)
        for block in self.single_transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states=hidden_states,
                                                         encoder_hidden_states=encoder_hidden_states, temb=temb)
        return hidden_states, encoder_hidden_states


def _reference(model: _Toy, x, t, enc, cached, stored):
    """The rule by hand: on a reuse step, a cached block returns its input + the delta stored at the compute step."""
    temb = t.double().view(-1, 1, 1) / 1000
    for i, block in enumerate(model.transformer_blocks):
        x = x + stored[i] if i in cached and i in stored else block(x, temb)
    return x


def test_block_cache_schedule_counts_and_restores_the_model():
    model, cached = _Toy(), {1}
    x, enc = torch.randn(1, 5, 4, dtype=torch.float64), torch.randn(1, 2, 4, dtype=torch.float64)
    timesteps = torch.linspace(1000, 100, 10)
    with BlockCache(model, cached_blocks=cached, step_start=2, interval=3) as cache:
        assert cache.schedule(10)[:, 1].tolist() == [False, False, False, True, True, False, True, True, False, True]
        outputs = [model(x, t[None], enc)[0] for t in timesteps]
    report = cache.report()
    assert report["skipped"] == 5 and report["per_block"][1] == {"evaluated": 5, "skipped": 5}
    assert report["per_block"][0] == {"evaluated": 10, "skipped": 0}
    assert report["skipped_fraction"] == pytest.approx(5 / 40)
    assert all(type(b) is _Residual for b in model.transformer_blocks)  # unwrapped on exit
    stored: dict[int, torch.Tensor] = {}
    for step, t in enumerate(timesteps):  # the expected outputs, step by step
        temb = t.double().view(-1, 1, 1) / 1000
        compute = step < 2 or (step - 2) % 3 == 0
        h = x
        for i, block in enumerate(model.transformer_blocks):
            if i in cached and not compute:
                h = h + stored[i]
            else:
                out = block(h, temb)
                if i in cached and step >= 2:
                    stored[i] = out - h
                h = out
        expected = h * 2 + temb
        assert torch.allclose(outputs[step], expected, atol=1e-12), step


def test_block_cache_reuses_joint_block_deltas_per_output():
    model = _Toy()
    x, enc = torch.randn(1, 5, 4, dtype=torch.float64), torch.randn(1, 2, 4, dtype=torch.float64)
    with BlockCache(model, cached_blocks=[3], step_start=1, interval=2):  # step 1 stores, step 2 reuses
        outs = [model(x, torch.tensor([t]), enc) for t in (900.0, 800.0, 700.0)]

    def joint_input(t):  # what the residual blocks hand the joint block at timestep t
        h = x
        for block in model.transformer_blocks:
            h = block(h, torch.tensor(t / 1000, dtype=torch.float64))
        return h

    with torch.no_grad():
        stored_hidden = joint_input(800.0) + 0.8  # (2h + t) - h at step 1
        hidden, encoder = outs[2]
        assert torch.allclose(encoder, enc + 0.8)  # the encoder delta of step 1 (temb 0.8), not 0.7
        assert torch.allclose(hidden, joint_input(700.0) + stored_hidden)


def test_block_cache_keeps_one_cache_per_forward_of_a_step():
    model = _Toy()
    x, enc = torch.randn(1, 5, 4, dtype=torch.float64), torch.randn(1, 2, 4, dtype=torch.float64)
    with BlockCache(model, cached_blocks=[0], step_start=1, interval=5) as cache:
        for t in (900.0, 800.0, 700.0):
            model(x, torch.tensor([t]), enc)  # conditional pass
            model(-x, torch.tensor([t]), enc)  # unconditional pass at the same timestep: same step
        cond, uncond = model(x, torch.tensor([600.0]), enc), model(-x, torch.tensor([600.0]), enc)
    assert cache.step == 3 and cache.report()["per_block"][0]["skipped"] == 4
    stored_cond = model.transformer_blocks[0](x, torch.tensor(0.8, dtype=torch.float64)) - x  # step 1, pass 0
    temb = torch.tensor(0.6, dtype=torch.float64)
    h = x + stored_cond
    for block in list(model.transformer_blocks)[1:]:
        h = block(h, temb)
    assert torch.allclose(cond[0], h * 2 + temb)
    assert not torch.allclose(cond[0], -uncond[0])


def test_block_cache_refuses_bad_settings():
    with pytest.raises(ConfigError, match=r"cached_blocks \[7\] outside the model's 4 blocks"):
        BlockCache(_Toy(), cached_blocks=[7])
    with pytest.raises(ConfigError, match="interval >= 1"):
        BlockCache(_Toy(), cached_blocks=[0], interval=0)
    with pytest.raises(ConfigError, match="has no block list"):
        BlockCache(nn.Linear(2, 2), cached_blocks=[0])


def _tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=3,
                                     attention_head_dim=8, num_attention_heads=2, cross_attention_dim=16,
                                     caption_channels=12, norm_type="ada_norm_single", use_additional_conditions=False)
    return model.eval()


def test_block_cache_on_a_tiny_pixart_matches_the_plain_model_on_compute_steps():
    model = _tiny_pixart()
    g = torch.Generator().manual_seed(1)
    latents, caption = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 12, generator=g)
    steps = [torch.tensor([t]) for t in (999, 750, 500, 250)]
    with torch.no_grad():
        plain = [model(latents, encoder_hidden_states=caption, timestep=t).sample for t in steps]
        with BlockCache(model, cached_blocks=[1, 2], step_start=1, interval=2) as cache:
            cached = [model(latents, encoder_hidden_states=caption, timestep=t).sample for t in steps]
    assert cache.report()["skipped"] == 2  # step 2: blocks 1 and 2 reused
    for step in (0, 1, 3):  # compute steps run every block
        assert torch.equal(plain[step], cached[step])
    assert not torch.equal(plain[2], cached[2])
    assert type(model.transformer_blocks[1]).__name__ == "BasicTransformerBlock"
