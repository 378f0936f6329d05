"""The layer protocol, checked on every registered layer: from_config, (output, state), continuation, defaults."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from attnlab.errors import ConfigError
from attnlab.layers import LAYERS
from attnlab.layers.base import DEFAULT_NUM_HEADS, Layer, LayerProtocol
from attnlab.testing import TOLERANCES

C, T, SPLIT = 16, 13, 8  # SPLIT: a multiple of the chunk/segment size 4 (Titans memories chain there)
# One model-wide config for every layer (strict=False keeps the keys each constructor takes). A new layer whose
# constructor needs another argument adds it here.
CONFIG = {"hidden_size": C, "num_heads": 4, "chunk_size": 4, "segment_size": 4, "window": 5, "grid_width": 4,
          "gate_low_rank_dim": 4, "num_persistent": 2, "memory_expansion": 2, "layer_idx": 1, "num_layers": 3}
NAMES = LAYERS.names()


def build(name):
    torch.manual_seed(0)
    layer = LAYERS.get(name).from_config(CONFIG, strict=False).double().eval()
    with torch.no_grad():  # non-trivial gains, biases and zero-initialised gates
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def hidden(length=T, seed=1):
    return torch.randn(2, length, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def flat(state):
    if isinstance(state, torch.Tensor):
        return state.flatten()
    return torch.cat([flat(s) for s in state])


def test_every_builtin_layer_is_registered():
    assert {"retention", "gla", "lightning", "lightnet", "hedgehog", "titans", "titans_mac", "masked", "gated",
            "sigmoid", "relu", "sigma_reparam", "alibi", "decay_matrix", "dma", "moda", "deconstructed"} <= set(NAMES)


def test_the_registry_checks_entries_against_the_layer_base_class():
    assert LAYERS.base == "attnlab.layers.base.Layer" and "base" in LAYERS.infrastructure
    assert all(issubclass(LAYERS.get(name), Layer) for name in NAMES)
    with pytest.raises(TypeError, match="subclass of attnlab.layers.base.Layer"):
        LAYERS.register("test_plain_module")(torch.nn.Linear)  # an nn.Module outside the protocol is refused
    assert "test_plain_module" not in LAYERS


@pytest.mark.parametrize("name", NAMES)
def test_signature_and_defaults(name):
    cls = LAYERS.get(name)
    assert issubclass(cls, Layer)
    params = inspect.signature(cls.forward).parameters
    assert list(params)[:2] == ["self", "hidden_states"]
    assert params["state"].kind is inspect.Parameter.KEYWORD_ONLY and params["state"].default is None
    assert params["position_offset"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["position_offset"].default == (None if cls.positional else 0)
    extras = [p for p in list(params.values())[2:] if p.name not in ("state", "position_offset")]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extras)  # data-only extras come after
    assert inspect.signature(cls.__init__).parameters["num_heads"].default == DEFAULT_NUM_HEADS == 4


@pytest.mark.parametrize("name", NAMES)
def test_forward_returns_output_and_state(name):
    layer, x = build(name), hidden()
    assert isinstance(layer, LayerProtocol)
    with torch.no_grad():
        out, state = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert (state is not None) == layer.carries_state


@pytest.mark.parametrize("name", [n for n in NAMES if LAYERS.get(n).carries_state])
def test_two_halves_with_state_equal_the_whole(name):
    layer, x = build(name), hidden(seed=2)
    with torch.no_grad():
        whole, whole_state = layer(x)
        first, state = layer(x[:, :SPLIT])
        second, state = layer(x[:, SPLIT:], state=state, position_offset=SPLIT)
    tol = TOLERANCES[torch.float64]
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=tol["rtol"], atol=tol["atol"])
    torch.testing.assert_close(flat(state), flat(whole_state), rtol=tol["rtol"], atol=tol["atol"])


@pytest.mark.parametrize("name", [n for n in NAMES if not LAYERS.get(n).carries_state])
def test_stateless_layers_accept_the_protocol_arguments(name):
    layer, x = build(name), hidden(seed=3)
    with torch.no_grad():
        out, state = layer(x, state=None, position_offset=0)
        torch.testing.assert_close(out, layer(x)[0])
        shifted, shifted_state = layer(x[:, SPLIT:], state=None, position_offset=SPLIT)
        assert state is None and shifted_state is None and shifted.shape == x[:, SPLIT:].shape
        with pytest.raises(ConfigError, match="state=None"):
            layer(x, state=torch.zeros(1))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_position_offset_raises(name, bad):
    with pytest.raises(ConfigError, match="position_offset"):
        build(name)(hidden(), position_offset=bad)


def test_from_config_strict_mapping_and_dataclass():
    gla = LAYERS.get("gla")
    with pytest.raises(ConfigError, match=r"unknown \['chunk_sise'\].*did you mean 'chunk_size'"):
        gla.from_config({"hidden_size": C, "chunk_sise": 4})
    with pytest.raises(ConfigError, match="hidden_size"):
        gla.from_config({"num_heads": 4})
    with pytest.raises(ConfigError, match="mapping or a dataclass"):
        gla.from_config([("hidden_size", C)])

    @dataclasses.dataclass(frozen=True)
    class Small:
        hidden_size: int = C
        num_heads: int = 2
        vocab_size: int = 100  # a model-wide field no layer takes

    with pytest.raises(ConfigError, match="vocab_size"):
        gla.from_config(Small())
    layer = gla.from_config(Small(), strict=False)
    assert (layer.hidden_size, layer.num_heads) == (C, 2)
    assert LAYERS.get("retention").from_config({"hidden_size": C}).num_heads == DEFAULT_NUM_HEADS
