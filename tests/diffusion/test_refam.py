"""RefAM pieces on hand-built cross maps: per-token spatial maps, magnets, global sinks, grounding map, point, mask."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnlab.functional.cross_maps import image_text_block, normalise_maps, spatial_maps
from attnlab.probes.refam_maps import (
    append_stop_words, content_indices, detect_gas, gas_scores, grounding_map, magnet_indices, peak_point,
    threshold_mask,
)
from attnlab.errors import ConfigError, ShapeError
from attnlab.roles import IMAGE, TEXT


def test_spatial_maps_average_heads_and_keep_raster_order():
    P, T = 6, 2
    attn = torch.zeros(1, 2, P, T, dtype=torch.float64)
    attn[0, 0, :, 0] = torch.arange(P, dtype=torch.float64) / 10  # both heads: patch p gives p/10 to token 0
    attn[0, 1, :, 0] = torch.arange(P, dtype=torch.float64) / 10
    attn[0, 0, :, 1] = 1.0  # head 0 gives 1 to token 1, head 1 gives 0: mean 0.5
    maps = spatial_maps(attn, (2, 3))  # one frame, 2 rows, 3 cols
    assert maps.shape == (1, T, 1, 2, 3) and maps.dtype == torch.float64
    assert maps[0, 0, 0].flatten().tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert torch.equal(maps[0, 1], torch.full((1, 2, 3), 0.5, dtype=torch.float64))
    stacked = torch.stack([attn, 3 * attn])  # (L, B, H, P, T): mean over layers doubles the maps
    assert torch.allclose(spatial_maps(stacked, (1, 2, 3)), 2 * maps)


def test_spatial_maps_refuse_a_grid_that_does_not_tile_the_patches():
    with pytest.raises(ShapeError, match="grid 1x2x2 has 4 patches, the maps have 6"):
        spatial_maps(torch.zeros(1, 1, 6, 2), (2, 2))
    with pytest.raises(ShapeError, match="attn must be"):
        spatial_maps(torch.zeros(6, 2), (2, 3))


@given(st.integers(0, 10_000), st.sampled_from(["sum", "max", "minmax"]))
def test_normalised_maps_obey_their_mode(seed, mode):
    maps = torch.rand(2, 3, 1, 4, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = normalise_maps(maps, mode)
    flat = out.flatten(2)
    assert out.dtype == torch.float64 and (flat >= 0).all()
    if mode == "sum":
        assert torch.allclose(flat.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    else:
        assert torch.allclose(flat.amax(-1), torch.ones(2, 3, dtype=torch.float64))
    if mode == "minmax":
        assert torch.allclose(flat.amin(-1), torch.zeros(2, 3, dtype=torch.float64))


def test_image_text_block_of_a_joint_call_picks_image_rows_and_text_columns():
    roles = torch.tensor([[TEXT, TEXT, IMAGE, IMAGE, IMAGE]], dtype=torch.int8)  # Flux: text first
    probs = torch.arange(25, dtype=torch.float64).reshape(1, 1, 5, 5)
    block = image_text_block(probs, roles, roles)
    assert block.shape == (1, 1, 3, 2)
    assert block[0, 0].tolist() == [[10.0, 11.0], [15.0, 16.0], [20.0, 21.0]]
    with pytest.raises(ShapeError, match="0 image queries and 2 text keys"):
        image_text_block(probs[:, :, :2], roles[:, :2], roles)


def test_magnets_are_stop_words_punctuation_and_specials():
    tokens = ["▁a", "▁red", "▁car", "▁on", "▁the", "▁road", ".", "</s>"]
    assert magnet_indices(tokens) == [0, 3, 4, 6, 7]


def test_append_stop_words_adds_magnets_only():
    assert append_stop_words("a red car ") == "a red car the of and a with"
    assert append_stop_words("a red car", ("and", "the")) == "a red car and the"
    with pytest.raises(ConfigError, match="appends stop words"):
        append_stop_words("a red car", ("banana",))


def _sink_maps() -> torch.Tensor:
    """T = 4 tokens over 16 patches: token 0 takes 0.6 of every patch; tokens 1–3 split the rest by region."""
    maps = torch.zeros(4, 16, dtype=torch.float64)
    maps[0] = 0.6
    maps[1, :5], maps[2, 5:10], maps[3, 10:] = 0.4, 0.4, 0.4
    return maps.reshape(4, 1, 4, 4)


def test_gas_is_the_token_with_high_mass_from_every_patch():
    enrichment, coverage = gas_scores(_sink_maps())
    # token 0: share 9.6 / 16 = 0.6 of the text mass, × 4 tokens = 2.4; every patch gives it ≥ 1/4 of its mass
    assert enrichment.tolist() == pytest.approx([2.4, 0.5, 0.5, 0.6])
    assert coverage.tolist() == pytest.approx([1.0, 5 / 16, 5 / 16, 6 / 16])
    assert detect_gas(_sink_maps()).tolist() == [True, False, False, False]
    assert detect_gas(_sink_maps(), min_enrichment=3.0).tolist() == [False] * 4


def test_gas_ignores_padding_tokens():
    maps = torch.cat([_sink_maps(), torch.full((1, 1, 4, 4), 5.0, dtype=torch.float64)])  # a loud padding token
    valid = torch.tensor([True, True, True, True, False])
    enrichment, _ = gas_scores(maps, valid)
    assert enrichment[:4].tolist() == pytest.approx([2.4, 0.5, 0.5, 0.6]) and torch.isnan(enrichment[4])
    with pytest.raises(ConfigError, match="min_enrichment >= 1"):
        detect_gas(maps, min_enrichment=0.5)


def test_grounding_map_averages_content_tokens_and_finds_their_peak():
    maps = _sink_maps()
    content = content_indices(4, magnets=[3], sinks=detect_gas(maps))
    assert content == [1, 2]
    g = grounding_map(maps, content)  # mean of tokens 1, 2: 0.2 on patches 0–9, 0 elsewhere → minmax: 1 / 0
    expected = torch.zeros(16, dtype=torch.float64)
    expected[:10] = 1.0
    assert torch.equal(g.reshape(-1), expected)
    assert peak_point(g).tolist() == [0, 0, 0]
    assert torch.equal(threshold_mask(g).reshape(-1), expected.bool())


def test_content_indices_refuse_to_leave_nothing():
    with pytest.raises(ConfigError, match="no content token left"):
        content_indices(2, magnets=[0], sinks=[1])
    with pytest.raises(ConfigError, match="magnets must be distinct token indices in 0…1"):
        content_indices(2, magnets=[2])


@given(st.integers(0, 10_000))
def test_peak_point_points_at_a_maximum_and_the_mask_contains_it(seed):
    g = torch.rand(2, 2, 3, 5, generator=torch.Generator().manual_seed(seed))
    points = peak_point(g)
    mask = threshold_mask(g, 0.7)
    for b, (f, r, c) in enumerate(points.tolist()):
        assert g[b, f, r, c] == g[b].max() and mask[b, f, r, c]
    assert ((g >= 0.7 * g.amax(dim=(1, 2, 3), keepdim=True)) == mask).all()
