"""The hogformer app: generator pieces by hand, bad arguments, the model, the variants, HOG groups under a Session.
The checks every app shares (pure batches, a few training steps, a Session over every site) are in
test_app_machinery.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnlab.errors import ConfigError, ShapeError
from attnlab.lab.apps import APPS
from attnlab.lab.apps.hogformer import (
    DEGRADATIONS,
    HOGformerApp,
    RestorationData,
    _segment_distance,
    degrade,
    gaussian_blur,
    grid_positions,
    hog_cells,
    psnr,
    rain_layer,
    render_clean,
)
from attnlab.layers.hog_attention import hog_keep

SMALL = dict(image_size=16, patch_size=4)  # T = 16 patch tokens


# -- generator pieces by hand --------------------------------------------------------------------------------------
def test_segment_distance_by_hand():
    x, y = np.array([0.0, 3.0, 1.0, -1.0]), np.array([1.0, 0.0, 0.0, 0.0])
    got = _segment_distance(x, y, np.array([0.0, 0.0]), np.array([2.0, 0.0]))  # segment (0,0)-(2,0)
    np.testing.assert_allclose(got, [1.0, 1.0, 0.0, 1.0])


def test_blur_keeps_constants_and_spreads_an_impulse_by_the_gaussian_taps():
    np.testing.assert_allclose(gaussian_blur(np.full((9, 9), 0.3), 1.0), 0.3)
    impulse = np.zeros((15, 15))
    impulse[7, 7] = 1.0
    out = gaussian_blur(impulse, 1.0)
    taps = [math.exp(-i * i / 2) for i in range(-3, 4)]  # radius ceil(3·1) = 3
    centre, side = taps[3] / sum(taps), taps[4] / sum(taps)
    assert out[7, 7] == pytest.approx(centre**2) and out[7, 8] == pytest.approx(centre * side)
    assert out.sum() == pytest.approx(1.0) and out[0, 0] == 0.0


def test_hog_of_a_vertical_edge_sits_in_the_horizontal_gradient_bin():
    image = np.zeros((8, 8))
    image[:, 6:] = 1.0  # the edge lies inside the right column of 4x4 cells
    cells = hog_cells(image, 4)
    assert cells.shape == (4, 9)
    np.testing.assert_allclose(cells[[0, 2]], 0.0)  # left cells are flat: empty histograms
    for row in cells[[1, 3]]:  # gradient along x: orientation 0, bin 0, L1-normalised to (almost) 1
        assert row[0] == pytest.approx(1.0, abs=1e-3) and row[1:].sum() == pytest.approx(0.0, abs=1e-9)


def test_psnr_by_hand():
    target = torch.full((2, 1, 4, 4), 0.4)
    output = torch.full((2, 1, 4, 4), 0.5)
    output[1] = 0.2  # MSE 0.04 -> 10 log10(25) dB
    torch.testing.assert_close(psnr(output, target), torch.tensor([20.0, 10 * math.log10(25.0)]))
    assert psnr(torch.full((1, 1, 2, 2), 1.7), torch.ones(1, 1, 2, 2)).item() == pytest.approx(100.0)  # clipped


def test_degradations_change_the_image_as_described():
    rng = np.random.default_rng(0)
    clean = np.full((32, 32), 0.5)
    noisy = degrade(rng, clean, "noise", noise_sigma=0.1, blur_sigma=1.0, rain_streaks=4)
    assert 0.09 < (noisy - clean).std() < 0.11  # 1024 draws of N(0, 0.1²), nothing clipped at 0.5 ± 5σ
    np.testing.assert_allclose(degrade(rng, clean, "blur", noise_sigma=0.1, blur_sigma=1.0, rain_streaks=4), 0.5)
    rainy = degrade(rng, clean, "rain", noise_sigma=0.1, blur_sigma=1.0, rain_streaks=4)
    assert (rainy >= 0.5).all() and 0.5 + 0.3 <= rainy.max() <= 0.5 + 0.6  # streak brightness 0.3 … 0.6 added
    with pytest.raises(ConfigError, match="degradation"):
        degrade(rng, clean, "snow", noise_sigma=0.1, blur_sigma=1.0, rain_streaks=4)


def test_the_rain_layer_follows_the_documented_calls():
    """Direction first, then the streak count, then per streak start, length, brightness; layer = max of
    s·max(0, 1 − distance to the segment), recomputed here pixel by pixel."""
    S, streaks = 12, 5
    layer = rain_layer(np.random.default_rng(4), S, streaks)
    rng = np.random.default_rng(4)
    angle = math.pi / 2 + rng.uniform(-0.45, 0.45)
    want = np.zeros((S, S))
    for _ in range(int(rng.integers(3, streaks + 1))):  # ⌈5/2⌉ … 5
        start, length, s = rng.uniform(0.0, S, 2), rng.uniform(6.0, 14.0), rng.uniform(0.3, 0.6)
        end = start + length * np.array([math.cos(angle), math.sin(angle)])
        for row in range(S):
            for col in range(S):
                p = np.array([col + 0.5, row + 0.5])
                t = min(max(float((p - start) @ (end - start)) / length**2, 0.0), 1.0)
                distance = float(np.linalg.norm(p - start - t * (end - start)))
                want[row, col] = max(want[row, col], s * max(0.0, 1.0 - distance))
    np.testing.assert_allclose(layer, want, atol=1e-12)
    assert layer.max() > 0.29


def test_clean_images_are_in_range_and_reproducible():
    a = render_clean(np.random.default_rng(5), 24)
    assert a.shape == (24, 24) and 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, render_clean(np.random.default_rng(5), 24))


def test_grid_positions_by_hand():
    code = grid_positions(2, 3, 4)  # one frequency (1): sin(row), cos(row), sin(col), cos(col)
    token = 1 * 3 + 2  # row 1, col 2
    torch.testing.assert_close(code[token], torch.tensor([math.sin(1), math.cos(1), math.sin(2), math.cos(2)]))
    with pytest.raises(ConfigError, match="multiple of 4"):
        grid_positions(2, 2, 6)


# -- the generator ---------------------------------------------------------------------------------------------------
def test_batches_are_shaped_and_carry_the_hog_of_the_degraded_image():
    first = RestorationData(**SMALL, seed=3).batch(2, 5)
    assert first["degraded"].shape == first["clean"].shape == (5, 1, 16, 16)
    assert first["hog"].shape == (5, 16, 9) and first["hog"].dtype == torch.float32
    assert first["degradation"].dtype == torch.int64
    sums = first["hog"].sum(-1)
    assert ((sums >= 0) & (sums <= 1 + 1e-6)).all()  # v / (|v|₁ + 1e-5): 1 on edges, below 1 on faint gradients
    np.testing.assert_allclose(first["hog"][0].numpy(), hog_cells(first["degraded"][0, 0].double().numpy(), 4),
                               atol=1e-5)


def test_degradation_index_is_global_and_the_clean_image_is_degraded_accordingly():
    data = RestorationData(**SMALL, degradations=("rain",), seed=0)
    batch = data.batch(0, 6)
    assert batch["degradation"].tolist() == [DEGRADATIONS.index("rain")] * 6
    assert (batch["degraded"] >= batch["clean"] - 1e-7).all()  # rain only adds light
    noise = RestorationData(**SMALL, degradations=("noise",), noise_sigma=0.2, seed=0).batch(0, 6)
    assert (noise["degraded"] - noise["clean"]).abs().mean() > 0.05


@pytest.mark.parametrize("kwargs", [dict(image_size=30, patch_size=4), dict(degradations=("noise", "noise")),
                                    dict(degradations=("snow",)), dict(noise_sigma=0.0), dict(seed=-1)],
                         ids=["patch_divides", "twice", "unknown", "sigma", "seed"])
def test_bad_data_arguments(kwargs):
    with pytest.raises(ConfigError):
        RestorationData(**kwargs)


# -- the model and its variants ---------------------------------------------------------------------------------------
def _batch(seed=0, n=3):
    return RestorationData(**SMALL, seed=seed).batch(0, n)


def test_models_start_as_the_identity_and_share_their_initialisation():
    batch = _batch()
    models = {v: HOGformerApp(v).build_model(seed=7) for v in HOGformerApp.variants}
    states = [m.state_dict() for m in models.values()]
    assert all(s.keys() == states[0].keys() for s in states)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(states, states[1:]) for k in a)
    for model in models.values():
        assert model.config.num_hidden_layers == 2
        with torch.no_grad():
            assert torch.equal(model(batch["degraded"], batch["hog"]), batch["degraded"])  # zero-initialised head


def _perturbed(variant):
    model = HOGformerApp(variant).build_model(seed=0)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for p in model.pixel_out.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_only_the_guided_variants_read_the_hog_and_only_hog_groups_tokens():
    batch = _batch()
    other = batch["hog"].flip(1)
    for variant, reads in (("hog", True), ("hog_input", True), ("no_hog", False)):
        model = _perturbed(variant)
        with torch.no_grad():
            changed = not torch.equal(model(batch["degraded"], batch["hog"]), model(batch["degraded"], other))
        assert changed is reads, variant
    groups = {v: {site.layer.num_groups for site in HOGformerApp(v).build_model(0).attention_sites}
              for v in HOGformerApp.variants}
    assert groups == {"hog": {4}, "no_hog": {4}, "hog_input": {1}}


def test_forward_backward_shapes_and_bad_shapes():
    app = HOGformerApp("hog")
    model = app.build_model(seed=0)
    batch = _batch()
    out = app.restore(model, batch)
    assert out.shape == batch["clean"].shape
    app.loss(model, batch).backward()
    assert model.token_embed.weight.grad is not None and model.pixel_out[2].weight.grad.abs().sum() > 0
    with pytest.raises(ShapeError, match="patch_size"):
        model(batch["degraded"], RestorationData(image_size=16, patch_size=2).batch(0, 3)["hog"])
    with pytest.raises(ShapeError, match="batch, 1, S, S"):
        model(batch["degraded"][:, :, :, :15], batch["hog"])


def test_bad_app_arguments():
    with pytest.raises(ConfigError, match="multiple of 4"):
        HOGformerApp(hidden_size=6, num_heads=2)
    with pytest.raises(ConfigError, match="num_blocks"):
        HOGformerApp(num_blocks=0)
    with pytest.raises(ConfigError, match="variant"):
        HOGformerApp("hog_only")
    assert APPS.get("hogformer") is HOGformerApp and HOGformerApp.layer == "hog_attention"


def test_metrics_count_images_per_degradation():
    app = HOGformerApp("no_hog")
    model = app.build_model(seed=0).eval()
    batch = RestorationData(**SMALL, seed=0).batch(0, 8)
    with torch.no_grad():
        metrics = app.metrics(model, batch)
    assert metrics["psnr"][1] == 8
    counts = {name: int((batch["degradation"] == i).sum()) for i, name in enumerate(DEGRADATIONS)}
    for name, count in counts.items():
        if count:
            assert metrics[f"psnr_{name}"][1] == count
            # the untrained model returns its input: output PSNR = input PSNR
            assert metrics[f"psnr_{name}"][0] == pytest.approx(metrics[f"psnr_in_{name}"][0], rel=1e-5)


# -- probes --------------------------------------------------------------------------------------------------------
def test_a_session_sees_attention_only_within_hog_groups():
    from attnlab import Session
    from attnlab.capture.patterns import PatternProbe

    app = HOGformerApp("hog")
    model = app.build_model(seed=0).eval()
    batch = _batch(n=2)
    pattern = PatternProbe()
    with torch.no_grad(), Session(model, probes=[pattern]) as session:
        app.loss(model, batch)
    probs = pattern.patterns(session.attention_paths)[0].probs  # (batch, sites, heads, q, k)
    assert probs.shape == (2, 2, 4, 16, 16)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 4, 16))
    outside = ~hog_keep(batch["hog"], 4, 4)  # (B, H, T, T): pairs in different HOG groups
    assert probs.masked_select(outside[:, None].expand_as(probs)).abs().max() == 0
