"""ProfilingDiT on tiny random diffusers models: the fg_profile probe against recomputed self-attention, block
classes from the layer table, and BlockCache on joint (tuple-output) and video blocks, also inside a session."""

from __future__ import annotations

import pytest
import torch
from diffusion.maps_oracle import captured_probs

from attnlab.diffusion import DiffusionSession
from attnlab.diffusion.profiling import BlockCache, block_preference, classify_blocks
from attnlab.probes import PROBES
from attnlab.testing import tiny_diffusers

FOREGROUND = torch.zeros(1, 4, 4, dtype=torch.bool)
FOREGROUND[0, 1:3, 1:3] = True  # the centre 2x2 of a 4x4 patch grid


def test_fg_profile_matches_the_recomputed_self_attention_and_classifies_blocks():
    model, inputs = tiny_diffusers("pixart")
    kwargs = inputs(batch=2, text=5)
    selfs = {0: model.transformer_blocks[0].attn1, 2: model.transformer_blocks[1].attn1}
    probe = PROBES.get("fg_profile")(foreground=FOREGROUND)
    with torch.no_grad(), captured_probs(selfs) as seen, DiffusionSession(model, probes=[probe]) as s:
        model(**kwargs)
    frame = s.results()
    shares = {int(r.layer): r.value for r in frame[frame.statistic == "fg_share"].itertuples()}
    assert set(shares) == {0, 2}  # cross layers have no image keys
    fg = FOREGROUND.reshape(-1)
    for layer in (0, 2):
        mean = seen[layer][0].double().mean(dim=1)  # (B, P, P)
        assert shares[layer] == pytest.approx(float(mean[..., fg].sum() / mean.sum()), abs=1e-6)
    prefs = {int(r.layer): r.value for r in frame[frame.statistic == "fg_preference"].itertuples()}
    table = s.layer_table()
    layer_block = dict(zip(table.layer, table.block))
    assert s.extras()["fg_profile"]["layer_block"] == {"0": 0, "2": 1} and layer_block[2] == 1
    blocks = block_preference(prefs, layer_block)
    assert set(blocks) == {0, 1} and set(classify_blocks(blocks).values()) <= {"foreground", "background"}
    tensors, side = s.probe("fg_profile").export_state()
    copy = PROBES.get("fg_profile")(foreground=FOREGROUND)
    copy.bind(s.facts)
    copy.import_state(tensors, side)
    assert copy.rows() == s.probe("fg_profile").rows() and copy.layer_block == {0: 0, 2: 1}


def _plain_and_cached(kind, cached, step_start=1, interval=2, **extra):
    model, inputs = tiny_diffusers(kind)
    kwargs = inputs(batch=1, text=5, **extra)
    timesteps = (0.9, 0.7, 0.5, 0.3) if kind == "flux" else (900.0, 700.0, 500.0, 300.0)

    def run():
        return [model(**{**kwargs, "timestep": torch.tensor([t])}).sample for t in timesteps]

    with torch.no_grad():
        plain = run()
        with BlockCache(model, cached_blocks=cached, step_start=step_start, interval=interval) as cache:
            cached_out = run()
    return model, plain, cached_out, cache


@pytest.mark.parametrize("kind, extra", [("sd3", {}), ("flux", {}), ("wan", {"frames": 2})])
def test_block_cache_on_joint_and_video_blocks(kind, extra):
    model, plain, cached, cache = _plain_and_cached(kind, cached=[1], **extra)
    assert cache.report()["per_block"][1] == {"evaluated": 3, "skipped": 1}  # step 2 reuses block 1
    for step in (0, 1, 3):
        assert torch.equal(plain[step], cached[step]), step
    assert not torch.equal(plain[2], cached[2])
    _, plain, uncached, cache = _plain_and_cached(kind, cached=[], **extra)
    assert cache.report()["skipped"] == 0 and all(torch.equal(a, b) for a, b in zip(plain, uncached))


def test_a_session_sees_fewer_attention_calls_when_blocks_are_reused():
    model, inputs = tiny_diffusers("pixart")
    kwargs = inputs(batch=1, text=5)
    with torch.no_grad(), DiffusionSession(model, probes=["refam"]) as s, \
            BlockCache(model, cached_blocks=[1], step_start=1, interval=2) as cache:
        for t in (900.0, 700.0, 500.0, 300.0):
            model(**{**kwargs, "timestep": torch.tensor([t])})
    assert s.calls_per_layer == {0: 4, 1: 4, 2: 3, 3: 3}  # block 1 (layers 2, 3) skipped at step 2
    assert cache.report()["skipped"] == 1 and sorted(s.results().denoising_step.unique()) == [0, 1, 2, 3]
