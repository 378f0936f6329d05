"""MODA's modality groups from token roles: image tokens are the aligned group, the other real tokens the text
basis, padding in neither (METHODS.md #32)."""

from __future__ import annotations

import pytest
import torch

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.moda import align_keys, groups_of_roles
from attnlab.layers import LAYERS
from attnlab.roles import IMAGE, PAD, SYSTEM, TEXT, TokenRoles, given_roles
from attnlab.testing import assert_close

C, H, HKV = 16, 4, 2


def _layer(seed=0):
    torch.manual_seed(seed)
    layer = LAYERS.get("moda")(C, H, HKV).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def _codes():
    # row 0: system, text, 4 image, text; row 1: 2 pad, text, 4 image, text
    return torch.tensor([[SYSTEM, TEXT, IMAGE, IMAGE, IMAGE, IMAGE, TEXT, TEXT],
                         [PAD, PAD, TEXT, IMAGE, IMAGE, IMAGE, IMAGE, TEXT]], dtype=torch.int8)


def test_groups_of_roles():
    group_ids, basis = groups_of_roles(_codes(), (IMAGE,), PAD)
    assert group_ids.tolist() == [[0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 0]]
    assert basis.tolist() == [[True, True, False, False, False, False, True, True],
                              [False, False, True, False, False, False, False, True]]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "whole"])
def test_padding_stays_out_of_the_text_basis(causal):
    """Left-padded row 1 aligns its image keys exactly as the same tokens without the padding do."""
    generator = torch.Generator().manual_seed(0)
    key, value = (torch.randn(2, HKV, 8, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    gain, fuse = torch.randn(4, generator=generator, dtype=torch.float64), torch.nn.Identity()
    group_ids, basis = groups_of_roles(_codes(), (IMAGE,), PAD)
    padded = align_keys(key, value, group_ids, gain, fuse, causal=causal, basis=basis)
    alone = align_keys(key[1:, :, 2:], value[1:, :, 2:], group_ids[1:, 2:], gain, fuse, causal=causal)
    assert_close(padded[1:, :, 2:], alone)
    with_pad = align_keys(key, value, group_ids, gain, fuse, causal=causal)  # old behaviour: pad in the basis
    assert not torch.allclose(with_pad[1:, :, 2:], alone)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "whole"])
def test_with_roles_padding_content_never_reaches_real_tokens(causal):
    """Garbage in the padding positions leaves every real row of the layer's output unchanged (padding keys are
    hidden and out of the basis); without roles (group ids only) it leaks in."""
    torch.manual_seed(0)
    layer = LAYERS.get("moda")(C, H, HKV, causal_basis=causal).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    layer.eval()
    x = torch.randn(2, 8, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    garbage = x.clone()
    garbage[1, :2] = 100.0 * torch.randn(2, C, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    codes, real = _codes(), _codes() != PAD
    group_ids, _ = groups_of_roles(codes, (IMAGE,), PAD)
    with torch.no_grad():
        assert torch.equal(layer(x, roles=codes)[0][real], layer(garbage, roles=codes)[0][real])
        leaked = layer(x, group_ids=group_ids)[0][real] - layer(garbage, group_ids=group_ids)[0][real]
    assert leaked.abs().max() > 1e-3


def test_layer_takes_roles_explicitly_or_from_given_roles():
    layer = _layer().eval()
    x = torch.randn(2, 8, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    codes = _codes()
    group_ids, basis = groups_of_roles(codes, (IMAGE,), PAD)
    with torch.no_grad():
        by_codes = layer(x, roles=codes)[0]
        by_roles = layer(x, roles=TokenRoles(codes))[0]
        with given_roles(TokenRoles(codes)):
            given = layer(x)[0]
        plain = layer(x)[0]
    assert_close(by_codes, by_roles)
    assert_close(given, by_codes)
    assert not torch.allclose(plain, by_codes)  # the alignment ran
    row0 = codes[:1]
    with torch.no_grad():  # without padding, roles give exactly the group ids' result
        assert_close(layer(x[:1], roles=row0)[0], layer(x[:1], group_ids=group_ids[:1])[0])


def test_layer_refuses_both_and_wrong_shapes():
    layer = _layer()
    x = torch.randn(2, 8, C, dtype=torch.float64)
    with pytest.raises(ConfigError, match="not both"):
        layer(x, roles=_codes(), group_ids=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ShapeError):
        layer(x, roles=_codes()[:, :5])
    with given_roles(TokenRoles(_codes()[:, :5])), torch.no_grad():  # other shape: not this layer's tokens
        assert_close(layer(x)[0], layer(x, group_ids=torch.zeros(2, 8, dtype=torch.long))[0])
