"""The host model of an application: a transformers ``PreTrainedModel`` whose attention sites route through the
attention interface, so attnlab's Session probes (and edits) them like any other model.

    class Forecaster(AppModel):
        def __init__(self, config):
            super().__init__(config)
            layer = LAYERS.get("masked")(config.hidden_size, config.num_attention_heads, mask_mod=full())
            self.temporal = self.site(layer)
            self.finish_sites()

A model calls :meth:`AppModel.site` once for every attention it has, in a fixed order: site ``i`` is "layer" ``i``
of a probe row (``config.num_hidden_layers`` = the number of sites, set by :meth:`AppModel.finish_sites`). Every
site has ``config.num_attention_heads`` heads of ``head_dim = hidden_size // num_attention_heads`` and no GQA, so
probes sized by the model's facts fit each one. The forward's inputs are the application's batch (no
``input_ids``): probes see every key of a call as real, at positions 0 … kv_len − 1 of that call, and the masks
the layers build (per-call ``keep``) decide what is attended.

Shared pieces: :class:`AppBlock` (a pre-norm residual block around one site) and :func:`recording_probs` (keep the
probs of layers that offer ``record_probs`` for the length of a ``with`` block).

Checkpoints: ``model.save_pretrained(DIR)`` writes ``model.safetensors`` + ``config.json`` (app, variant, model
arguments, sizes); :func:`load_app` rebuilds the model from them (no pickle, strict loading).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedConfig, PreTrainedModel

from attnlab.errors import ConfigError
from attnlab.lab.hosting import AttentionSite
from attnlab.lab.weights import load_state, safetensors_files
from attnlab.layers.base import Layer

__all__ = ["AppBlock", "AppConfig", "AppModel", "load_app", "recording_probs"]

MODEL_TYPE = "attnlab_app"


class AppConfig(PreTrainedConfig):
    """The transformers config of an application model (``model_type = "attnlab_app"``).

    Fields: ``app`` and ``variant`` (registry names), ``model_args`` (the app's model knobs), ``hidden_size``,
    ``num_attention_heads`` (= ``num_key_value_heads``; every site), ``num_hidden_layers`` (the number of
    attention sites, set by the model), ``head_dim``, ``data_args`` (the generator's arguments, seed included, of
    the run that trained the weights: ``app.data(**config.data_args)`` rebuilds its data; None when untrained).
    """

    model_type = MODEL_TYPE

    app: str = ""
    variant: str = ""
    model_args: dict | None = None
    hidden_size: int = 32
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    num_hidden_layers: int = 0
    head_dim: int | None = None
    data_args: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        self.model_args = dict(self.model_args or {})
        self.num_key_value_heads = self.num_attention_heads
        self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)


class AppModel(PreTrainedModel):
    """Base class of application models (see the module docstring): :meth:`site`, :meth:`finish_sites`."""

    config: AppConfig
    config_class = AppConfig
    base_model_prefix = "app"
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: AppConfig) -> None:
        super().__init__(config)
        self.attention_sites: list[AttentionSite] = []  # references in creation order (registered where assigned)

    def _init_weights(self, module: nn.Module) -> None:
        """Keep every module's constructor initialisation (the layers' own inits are part of their definition)."""

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """True: every attention goes through a site, which reads the implementation at each call. (transformers
        guesses this from the module's source, which fails for models defined in a notebook or a test file.)"""
        return True

    def site(self, layer: Layer) -> AttentionSite:
        """Wrap ``layer`` as the next attention site (``layer_idx`` = sites so far). Assign the result to an
        attribute (or a ModuleList) so its parameters belong to the model. The site attends as the layer does:
        causal with the layer's default mask, bidirectional with ``mask_mod=masks.full()``.

        Raises ConfigError when the layer's heads or head_dim differ from the config's (probes size by them)."""
        heads, head_dim = getattr(layer, "num_heads", None), getattr(layer, "head_dim", None)
        want = (self.config.num_attention_heads, self.config.head_dim)
        if (heads, head_dim) != want or getattr(layer, "num_kv_heads", heads) != heads:
            raise ConfigError(f"{type(self).__name__}: expected every attention site with {want[0]} heads of "
                              f"head_dim {want[1]} and no GQA, got {type(layer).__name__} with {heads} heads of "
                              f"head_dim {head_dim}")
        site = AttentionSite(self.config, len(self.attention_sites), layer)
        self.attention_sites.append(site)
        return site

    def finish_sites(self) -> None:
        """Record the number of sites as ``config.num_hidden_layers`` and run transformers' ``post_init``. Call it
        at the end of ``__init__``. Raises ConfigError for a model without sites or a reloaded config whose count
        differs."""
        count = len(self.attention_sites)
        if count == 0:
            raise ConfigError(f"{type(self).__name__} has no attention site; wrap each attention with self.site(...)")
        if self.config.num_hidden_layers not in (0, count):
            raise ConfigError(f"{type(self).__name__}: the config says {self.config.num_hidden_layers} attention "
                              f"sites, the model has {count}")
        self.config.num_hidden_layers = count
        self.post_init()


class AppBlock(nn.Module):
    """Pre-LayerNorm residual block around one attention site: ``h + site(LN(h), **extras)``, then
    ``h + MLP(LN(h))`` with a GELU MLP of width ``max(1, round(mlp_ratio · width))``.

    Modules, created in this order (so a model's random initialisation is fixed by it): the given ``site``,
    ``norm1``, ``norm2`` (LayerNorm(width)), ``mlp`` = Linear(width, hidden), GELU, Linear(hidden, width).

    ``forward(h, memory=None, **extras)``: h (B, L, width); ``memory`` (B, M, width) or None: the site attends
    over ``LN([memory, h])`` (a decoder reading an encoder's memory) and only h's last L rows are kept;
    ``extras`` go to the site (per-call layer inputs). Returns (B, L, width), h's dtype.
    """

    def __init__(self, site: nn.Module, width: int, mlp_ratio: float) -> None:
        super().__init__()
        self.site, self.norm1, self.norm2 = site, nn.LayerNorm(width), nn.LayerNorm(width)
        hidden = max(1, int(round(mlp_ratio * width)))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, h: Tensor, memory: Tensor | None = None, **extras: Any) -> Tensor:
        x = self.norm1(h if memory is None else torch.cat([memory, h], dim=1))
        h = h + self.site(x, **extras)[:, x.shape[1] - h.shape[1]:]
        return h + self.mlp(self.norm2(h))


@contextmanager
def recording_probs(layers: Iterable[nn.Module]) -> Iterator[list[nn.Module]]:
    """Within the ``with`` block every layer keeps its last call's attention probabilities in ``last_probs``
    ((B, H, Lq, Lk) float32, detached; layers with a ``record_probs`` switch: ``tscan``, ``object_attention``).
    Yields the layers as a list. On exit each switch is restored, and ``last_probs`` is cleared where the switch
    was off before.

        with recording_probs(site.layer for site in model.attention_sites) as layers:
            logits = model(**batch)
            probs = [layer.last_probs for layer in layers]

    Raises ConfigError for a layer without ``record_probs``."""
    layers = list(layers)
    for layer in layers:
        if not hasattr(layer, "record_probs"):
            raise ConfigError(f"expected layers with record_probs (tscan, object_attention), got "
                              f"{type(layer).__name__}")
    before = [layer.record_probs for layer in layers]
    for layer in layers:
        layer.record_probs = True
    try:
        yield layers
    finally:
        for layer, was in zip(layers, before):
            layer.record_probs = was
            if not was:
                layer.last_probs = None


def load_app(folder: str | os.PathLike) -> tuple[Any, AppModel]:
    """``(app, model)`` from a folder written by ``model.save_pretrained`` (``attnlab app train --out DIR`` writes
    ``DIR/checkpoint``): the application instance of the saved variant and the model in eval mode.

    Raises ConfigError when the folder holds no app config or safetensors, or the weights do not match."""
    from safetensors.torch import load_file

    from attnlab.lab.apps import APPS

    path = os.fspath(folder)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"expected an application checkpoint folder with config.json, got {path}")
    config = AppConfig.from_pretrained(path)
    if getattr(config, "model_type", None) != MODEL_TYPE or not config.app:
        raise ConfigError(f"{path}/config.json is not an attnlab application config (model_type {MODEL_TYPE!r})")
    app = APPS.get(config.app)(config.variant, hidden_size=config.hidden_size,
                               num_heads=config.num_attention_heads, **config.model_args)
    state: dict[str, Any] = {}
    for file in safetensors_files(path):
        state.update(load_file(file))
    with torch.random.fork_rng(devices=[]):
        model = app.model_class(config)
    load_state(model, state, path)
    return app, model.eval()
