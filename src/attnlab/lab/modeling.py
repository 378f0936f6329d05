"""TinyLM: a small decoder built from any registered attnlab layer, as a transformers ``PreTrainedModel``.

    spec = TinyLMSpec(layer="masked", layer_args={"mask": "sliding_window:window=32"}, num_layers=2)
    model = build_model(spec, seed=0)
    model.save_pretrained("runs/x/checkpoint")               # model.safetensors + config.json
    register_auto()                                          # once per process (attnlab.load_model does it)
    model = AutoModelForCausalLM.from_pretrained("runs/x/checkpoint")

Architecture (pre-norm): token embedding (+ learned positions when ``positions="learned"``) → N blocks of
``x + mixer(norm(x))`` then ``x + mlp(norm(x))`` (GELU, width ``mlp_ratio · C``; no MLP when ``mlp_ratio == 0``)
→ final norm → LM head (tied to the embedding or not). The mixer is the registered layer
``LAYERS.get(spec.layer)`` built with ``hidden_size``, ``num_heads``, ``rope_base`` (10000.0 with
``positions="rope"``, None otherwise for layers that take an optional one; retention's rotation is mandatory, so
it needs "rope"), ``layer_idx``/``num_layers`` (layers that take
them, e.g. lightning) and ``spec.layer_args``; a ``"mask"`` entry there is a mask spec
(``"sliding_window:window=32"``, names from ``attnlab ls masks``) resolved through ``MASKS`` into ``mask_mod``.

Attention routing. Each block's :class:`TinyLMAttention` wraps its layer and is the layer's ``attention_hook``:

- softmax-family layers hand it their softmax (``hook.softmax(query, key, value, keep, scale)``), which calls
  ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` (``"sdpa"`` by default) with the layer mask ANDed with
  the padding mask (the forward's 2-D ``attention_mask``) as a 4-D bool mask, or with no mask (the ``is_causal``
  fast path) when the mask is plain causal and nothing is padded. attnlab's Session switches the model to its
  ``"attnlab"`` backend, so every probe and edit sees these calls.
- other layers (and softmax layers with a score_mod) compute their own output and show the hook the attention map
  they imply (``hook.implied(map)``, an :class:`attnlab.functional.implied.ImpliedMap`); under the ``"attnlab"``
  implementation it goes to the Session with ``implied_map=map`` (probes only: edits are refused there).

Padding: those other layers cannot mask keys, so a batch whose padding a real query could see (left padding on a
causal model, any padding on a bidirectional one) raises ConfigError for them; right padding on a causal model
is exact for every layer whose math does not depend on the sequence length (not for sigmoid's default bias
−log T). No KV cache: ``use_cache=True`` and ``past_key_values`` raise ConfigError; ``generate`` reruns the
whole sequence each step. ``from_pretrained`` builds the model for real (constructors compute their buffers)
and loads its safetensors strictly. Losses: ``labels`` shifted inside (transformers), ``targets`` aligned (tasks).

Shape legend: B batch, T seq_len, C hidden_size, H num_heads, Hkv num_kv_heads, D head_dim, V vocab_size.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from attnlab.errors import ConfigError
from attnlab.functional.masks import MASKS, MaskMod, full
from attnlab.lab.hosting import AttentionSite
from attnlab.lab.weights import checkpoint_folder, load_state, resolve_device, resolve_dtype, safetensors_files
from attnlab.layers import LAYERS
from attnlab.layers.base import Layer
from attnlab.params import coerce_arguments, parse_spec

__all__ = ["TinyLMAttention", "TinyLMConfig", "TinyLMForCausalLM", "TinyLMModel", "TinyLMSpec", "build_model",
           "parse_mask_spec", "register_auto"]

MODEL_TYPE = "attnlab_tinylm"
ROPE_BASE = 10000.0
POSITIONS = ("rope", "learned", "none")
NORMS = ("rmsnorm", "layernorm")


def rope_argument(layer: str, positions: str) -> dict[str, float | None]:
    """The ``rope_base`` argument layer ``layer`` gets under ``positions``: ``{"rope_base": 10000.0}`` with "rope",
    ``{"rope_base": None}`` otherwise when its annotation admits None (optional rotation), ``{}`` for a layer
    without ``rope_base``.

    Raises ConfigError when the layer's rotation is mandatory (``rope_base: float``) and positions is not "rope".
    """
    cls = LAYERS.get(layer)
    param = inspect.signature(cls.__init__).parameters.get("rope_base")
    if param is None:
        return {}
    if positions == "rope":
        return {"rope_base": ROPE_BASE}
    hint = typing.get_type_hints(cls.__init__).get("rope_base")
    optional = type(None) in typing.get_args(hint) if hint is not None else param.default is None
    if not optional:  # rope_base: float (unannotated: a default other than None)
        raise ConfigError(f"layer {layer!r} always rotates its queries and keys, so it needs positions='rope', "
                          f"got {positions!r}")
    return {"rope_base": None}


@dataclass(frozen=True)
class TinyLMSpec:
    """What a TinyLM is made of (JSON-serialisable; :meth:`to_dict` / :meth:`from_dict`).

    Attributes:
        layer: a name from ``attnlab ls layers``. layer_args: its extra constructor arguments (JSON values);
            ``"mask"`` is a mask spec ``"NAME:key=value,..."`` (``attnlab ls masks``), ``"num_kv_heads"`` sets GQA.
        vocab_size: V. num_layers: blocks. hidden_size: C. num_heads: H.
        mlp_ratio: MLP width / C (0 = attention-only blocks). positions: "rope" (layers that take ``rope_base``
            get 10000.0), "learned" (absolute position embeddings added to the tokens) or "none".
        max_position_embeddings: longest sequence for learned positions (recorded for every model).
        tie_word_embeddings: the LM head reuses the token embedding. norm: "rmsnorm" or "layernorm".
        causal: causal (default) or bidirectional (mask-taking layers only; the mixer gets ``masks.full()``).

    Raises ConfigError (``__post_init__``) for a value out of range or a layer_args value that is not JSON;
    RegistryError for an unknown layer name.
    """

    layer: str = "masked"
    layer_args: Mapping[str, Any] = field(default_factory=dict)
    vocab_size: int = 256
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    mlp_ratio: float = 4.0
    positions: Literal["rope", "learned", "none"] = "rope"
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    causal: bool = True

    def __post_init__(self) -> None:
        LAYERS.get(self.layer)  # RegistryError with a suggestion
        if self.positions in POSITIONS:
            rope_argument(self.layer, self.positions)  # ConfigError: this layer's rotation is mandatory
        if not isinstance(self.layer_args, Mapping) or not all(isinstance(k, str) for k in self.layer_args):
            raise ConfigError(f"expected layer_args as a mapping of names to JSON values, got {self.layer_args!r}")
        try:
            json.dumps(dict(self.layer_args))
        except (TypeError, ValueError):
            raise ConfigError(f"expected JSON values in layer_args, got {dict(self.layer_args)!r}") from None
        object.__setattr__(self, "layer_args", dict(self.layer_args))
        for name in ("vocab_size", "num_layers", "hidden_size", "num_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"expected {name} as an int >= 1, got {value!r}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or not \
                0 <= self.mlp_ratio < float("inf"):
            raise ConfigError(f"expected mlp_ratio as a finite number >= 0, got {self.mlp_ratio!r}")
        if self.positions not in POSITIONS:
            raise ConfigError(f"expected positions in {POSITIONS}, got {self.positions!r}")
        if self.norm not in NORMS:
            raise ConfigError(f"expected norm in {NORMS}, got {self.norm!r}")
        for name in ("tie_word_embeddings", "causal"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"expected {name} as a bool, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return {**dataclasses.asdict(self), "layer_args": dict(self.layer_args)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TinyLMSpec:
        """The inverse of :meth:`to_dict`; ConfigError naming an unknown key."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"expected TinyLMSpec keys among {names}, got unknown {unknown}")
        return cls(**values)


class TinyLMConfig(PreTrainedConfig):
    """The transformers config of a TinyLM (``model_type = "attnlab_tinylm"``; :meth:`from_spec`, :attr:`spec`).

    Field names follow transformers (``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
    ``max_position_embeddings``, ``rope_theta``), so attnlab's ``model_facts`` and the Auto classes read it like
    any other model config; ``rope_theta`` is 10000.0 with ``positions="rope"`` on a layer that takes ``rope_base``,
and None otherwise.
    """

    model_type = MODEL_TYPE

    layer: str = "masked"
    layer_args: dict | None = None
    vocab_size: int = 256
    num_hidden_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    mlp_ratio: int | float = 4.0
    positions: str = "rope"
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    norm: str = "rmsnorm"
    causal: bool = True
    rope_theta: int | float | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        self.layer_args = dict(self.layer_args or {})
        kv_heads = self.layer_args.get("num_kv_heads")
        self.num_key_value_heads = int(kv_heads) if kv_heads is not None else self.num_attention_heads
        self.rope_theta = rope_argument(self.layer, self.positions).get("rope_base")
        super().__post_init__(**kwargs)

    @classmethod
    def from_spec(cls, spec: TinyLMSpec) -> TinyLMConfig:
        """The config of ``spec``."""
        return cls(layer=spec.layer, layer_args=dict(spec.layer_args), vocab_size=spec.vocab_size,
                   num_hidden_layers=spec.num_layers, hidden_size=spec.hidden_size,
                   num_attention_heads=spec.num_heads, mlp_ratio=float(spec.mlp_ratio), positions=spec.positions,
                   max_position_embeddings=spec.max_position_embeddings,
                   tie_word_embeddings=spec.tie_word_embeddings, norm=spec.norm, causal=spec.causal)

    @property
    def spec(self) -> TinyLMSpec:
        """The :class:`TinyLMSpec` this config describes (validated)."""
        return TinyLMSpec(layer=self.layer, layer_args=dict(self.layer_args), vocab_size=self.vocab_size,
                          num_layers=self.num_hidden_layers, hidden_size=self.hidden_size,
                          num_heads=self.num_attention_heads, mlp_ratio=self.mlp_ratio, positions=self.positions,
                          max_position_embeddings=self.max_position_embeddings,
                          tie_word_embeddings=self.tie_word_embeddings, norm=self.norm, causal=self.causal)


def parse_mask_spec(spec: str) -> MaskMod:
    """``"sliding_window:window=32"`` → that registered mask_mod (values typed by the factory's annotations).

    Raises RegistryError for an unknown mask name; ConfigError for a malformed spec, a key given twice or a bad
    parameter.
    """
    name, values = parse_spec(spec, "mask")
    factory = MASKS.get(name)
    return factory(**coerce_arguments(factory, values, owner=f"mask {name!r}"))


def build_layer(config: TinyLMConfig, layer_idx: int) -> Layer:
    """The mixer layer of block ``layer_idx`` (see the module docstring for the arguments it gets).

    Raises ConfigError for a layer_args key the layer does not take, a mask on a layer without ``mask_mod``, a
    bidirectional model with a layer that cannot take a mask, or positions other than "rope" for a layer whose
    rotation is mandatory (retention).
    """
    cls = LAYERS.get(config.layer)
    params = inspect.signature(cls.__init__).parameters
    args: dict[str, Any] = {"hidden_size": config.hidden_size, "num_heads": config.num_attention_heads,
                            "layer_idx": layer_idx, "num_layers": config.num_hidden_layers,
                            **rope_argument(config.layer, config.positions)}
    layer_args = dict(config.layer_args)
    unknown = sorted(set(layer_args) - set(params) - {"mask", "self"})
    if unknown:
        raise ConfigError(f"layer {config.layer!r} takes no argument {unknown}; it takes "
                          f"{sorted(p for p in params if p != 'self')} and 'mask'")
    mask_spec = layer_args.pop("mask", None)
    if (mask_spec is not None or not config.causal) and "mask_mod" not in params:
        why = "a mask" if mask_spec is not None else "causal=False"
        raise ConfigError(f"layer {config.layer!r} takes no mask_mod, so it cannot run with {why}")
    if mask_spec is not None:
        args["mask_mod"] = parse_mask_spec(mask_spec)
    elif not config.causal:
        args["mask_mod"] = full()
    return cls.from_config({**args, **layer_args}, strict=False)


class TinyLMAttention(AttentionSite):
    """One block's mixer: an :class:`attnlab.lab.hosting.AttentionSite` (the layer's ``attention_hook``) that also
    masks the forward's padding (see the module docstring).

    Attributes (as transformers' attention modules have them): ``layer_idx``, ``is_causal``, ``config``,
    ``num_key_value_groups`` (H // Hkv, read by transformers' SDPA for GQA). There is no ``scaling``: every call
    passes the layer's own scale (``scaling=``), which depends on its head (key) dim.
    """

    def __init__(self, config: TinyLMConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx, build_layer(config, layer_idx), is_causal=bool(config.causal))
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self._padding: Tensor | None = None  # (B, T) bool of the forward in flight, None = nothing padded
        self._keys_exposed = False  # padding a real query could see (only the hooked softmax masks it)

    def forward(self, hidden_states: Tensor, padding: Tensor | None = None, keys_exposed: bool = False) -> Tensor:
        """hidden_states (B, T, C); padding (B, T) bool (True = real token) or None; ``keys_exposed``: some
        padding is visible to a real query under the layer's own mask. Returns (B, T, C).

        Raises ConfigError when ``keys_exposed`` and the layer did not route its softmax through the hook."""
        self._padding, self._keys_exposed = padding, keys_exposed
        try:
            output = super().forward(hidden_states)
        finally:
            self._padding = None
        if keys_exposed and not self._routed:
            self._refuse_padding()
        return output

    def _refuse_padding(self) -> None:
        raise ConfigError(f"layer {self.config.layer!r} computes its own attention and cannot mask padded keys; "
                          "use right padding (causal models) or unpadded batches")

    def keep_mask(self, keep: Tensor | None, q_len: int, kv_len: int, device: torch.device) -> Tensor | None:
        """keep ∧ padding as bool (B|1, H|1, Lq, Lk), or None for the plain causal fast path."""
        if self._padding is None:
            return keep
        if keep is None:
            keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)[None, None]
        mask = keep & self._padding[:, None, None, :].to(device)
        # a query that sees no key (a left-padded position) sees itself, so SDPA gives no NaN row whose zero
        # weights would meet NaN values downstream; padded queries never reach a loss or a statistic
        empty = ~mask.any(dim=-1, keepdim=True)
        return mask | (empty & torch.eye(q_len, kv_len, dtype=torch.bool, device=device))

    def implied(self, attention_map: Any) -> None:
        """As :meth:`AttentionSite.implied`; raises ConfigError when padding is visible to real queries (the map
        and the output would include it)."""
        if self._keys_exposed:
            self._refuse_padding()
        super().implied(attention_map)


def _norm(config: TinyLMConfig) -> nn.Module:
    return nn.RMSNorm(config.hidden_size, eps=1e-6) if config.norm == "rmsnorm" else nn.LayerNorm(config.hidden_size)


class TinyLMBlock(nn.Module):
    """Pre-norm block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))`` when ``mlp_ratio > 0``."""

    def __init__(self, config: TinyLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_norm = _norm(config)
        self.mixer = TinyLMAttention(config, layer_idx)
        width = round(config.mlp_ratio * config.hidden_size)
        self.mlp_norm = _norm(config) if width > 0 else None
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, width), nn.GELU(),
                                 nn.Linear(width, config.hidden_size)) if width > 0 else None

    def forward(self, hidden_states: Tensor, padding: Tensor | None = None, keys_exposed: bool = False) -> Tensor:
        """hidden_states (B, T, C) → (B, T, C); padding as in :meth:`TinyLMAttention.forward`."""
        hidden_states = hidden_states + self.mixer(self.input_norm(hidden_states), padding, keys_exposed)
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states))
        return hidden_states


class TinyLMPreTrainedModel(PreTrainedModel):
    """Shared transformers settings of the TinyLM classes (attention interface, init)."""

    config: TinyLMConfig
    config_class = TinyLMConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["TinyLMBlock"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """Embeddings (and an untied LM head) N(0, 0.02); every other module keeps its constructor's init (the
        layers' own initialisations, e.g. MODA's identity fuse, are part of their definition)."""
        if isinstance(module, nn.Embedding) or module is getattr(self, "lm_head", None):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        config: TinyLMConfig | None = None, dtype: Any = None, torch_dtype: Any = None,
                        device_map: Any = None, attn_implementation: str | None = None, subfolder: str = "",
                        use_safetensors: bool | None = None, **kwargs: Any) -> TinyLMPreTrainedModel:
        """A TinyLM saved by ``save_pretrained`` in a local folder, in eval mode.

        transformers' own loader builds models on the meta device, which leaves the buffers a layer computes in
        its constructor (retention's and lightning's decays, ALiBi slopes, sigma_reparam's spectral norm) unset
        or makes the constructor fail. This one builds the model for real from its config (CPU, the global RNG
        left as it was), then loads ``model.safetensors`` (or the shards of ``model.safetensors.index.json``)
        strictly: only a tied ``lm_head.weight`` may be missing. ``AutoModelForCausalLM.from_pretrained(DIR)``
        and ``attnlab.load_model(DIR)`` come here.

        Args:
            pretrained_model_name_or_path: the folder (``subfolder`` inside it, if given).
            config: a :class:`TinyLMConfig` to use instead of the folder's ``config.json``.
            dtype / torch_dtype: a torch dtype, its name (``"bfloat16"``) or ``"auto"`` (the default: the
                config's saved ``dtype``, else the stored weights' dtype); applied to the tensors built in the
                default dtype (float32), as transformers does, so a layer's float64 buffers stay float64.
            device_map: one device (``"cpu"``, ``"cuda:0"``, ``0``, a torch.device) to move the model to.
            attn_implementation: the attention implementation (default ``"sdpa"``).

        Raises ConfigError for a path that is not a local folder (hub ids), no safetensors, missing or
        unexpected weights, another config type, a bad dtype or device_map, or keywords it does not take.
        """
        from safetensors.torch import load_file

        folder = checkpoint_folder(pretrained_model_name_or_path, subfolder, model_args, kwargs, use_safetensors)
        config = TinyLMConfig.from_pretrained(folder) if config is None else config
        if not isinstance(config, TinyLMConfig):
            raise ConfigError(f"expected a TinyLMConfig (model_type {MODEL_TYPE!r}), got {type(config).__name__}")
        state = {}
        for file in safetensors_files(folder):
            state.update(load_file(file))
        with torch.random.fork_rng(devices=[]):
            model = cls(config)
        load_state(model, state, folder)
        built, target = torch.get_default_dtype(), resolve_dtype(torch_dtype if dtype is None else dtype, config, state)
        if target != built:  # tensors a layer keeps in another dtype on purpose (float64 decays) keep it
            model._apply(lambda t: t.to(target) if t.dtype == built else t)
        model.config.dtype = target
        if device_map is not None:
            model.to(resolve_device(device_map))
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        return model.eval()


def _check_no_cache(past_key_values: Any, use_cache: bool | None) -> None:
    if past_key_values is not None or use_cache:
        raise ConfigError("TinyLM keeps no KV cache: call it on whole sequences with use_cache=False and no "
                          "past_key_values")


class TinyLMModel(TinyLMPreTrainedModel):
    """Embedding → blocks → final norm. ``.layers`` is the ModuleList of :class:`TinyLMBlock`."""

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                                if config.positions == "learned" else None)
        self.layers = nn.ModuleList(TinyLMBlock(config, index) for index in range(config.num_hidden_layers))
        self.norm = _norm(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                output_hidden_states: bool | None = None, past_key_values: Any = None, use_cache: bool | None = None,
                **kwargs: Any) -> BaseModelOutput:
        """input_ids (B, T) long or inputs_embeds (B, T, C); attention_mask (B, T) 1 = real token (2-D only);
        position_ids (B, T) long for learned positions (default 0 … T-1). Returns last_hidden_state (B, T, C)
        and, with output_hidden_states, the embeddings and each block's output (the last one normed).

        Raises ConfigError for both or neither of input_ids/inputs_embeds, a mask that is not (B, T), a cache,
        positions beyond max_position_embeddings, or padding a layer cannot mask (module docstring)."""
        _check_no_cache(past_key_values, use_cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ConfigError("expected exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = hidden.shape[:2]
        if self.embed_positions is not None:
            if position_ids is None:
                position_ids = torch.arange(T, device=hidden.device)[None]
            if int(position_ids.max()) >= self.config.max_position_embeddings:
                raise ConfigError(f"expected positions < max_position_embeddings="
                                  f"{self.config.max_position_embeddings}, got {int(position_ids.max())}")
            hidden = hidden + self.embed_positions(position_ids)
        padding, exposed = self._padding(attention_mask, B, T)
        states = [hidden] if output_hidden_states else None
        for block in self.layers:
            hidden = block(hidden, padding, exposed)
            if states is not None:
                states.append(hidden)
        hidden = self.norm(hidden)
        if states is not None:
            states[-1] = hidden
        return BaseModelOutput(last_hidden_state=hidden, hidden_states=None if states is None else tuple(states))

    def _padding(self, attention_mask: Tensor | None, batch: int, length: int) -> tuple[Tensor | None, bool]:
        """(padding (B, T) bool or None when nothing is padded, whether a real query can see a padded key)."""
        if attention_mask is None:
            return None, False
        if attention_mask.shape != (batch, length):
            raise ConfigError(f"expected a 2-D attention_mask of shape {(batch, length)}, got "
                              f"{tuple(attention_mask.shape)}")
        padding = attention_mask.bool()
        if bool(padding.all()):
            return None, False
        exposed = not self.config.causal or bool((~padding[:, :-1] & padding[:, 1:]).any())  # a pad before a token
        return padding, exposed


class TinyLMForCausalLM(TinyLMPreTrainedModel, GenerationMixin):
    """TinyLM with its LM head: ``forward(...) -> CausalLMOutput(loss, logits, hidden_states)``.

    ``generate`` works without a KV cache: every step runs the whole sequence again
    (:meth:`prepare_inputs_for_generation`), so it costs O(T²) per token (fine for lab-sized models).

    Two ways to ask for a loss (mean cross-entropy in float32 over the scored tokens, -100 = not scored; NaN when
    nothing is scored):

    - ``labels`` (B, T): transformers' convention, shifted inside: position t is scored on ``labels[t + 1]``
      (``model(input_ids=x, labels=x)`` is next-token prediction), as every transformers CausalLM does.
    - ``targets`` (B, T): already aligned, ``targets[t]`` is the token position t predicts (no shift); the
      lab's tasks produce these (``Task.batch``), and :mod:`attnlab.lab.train` passes them.
    """

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__(config)
        self.model = TinyLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, inputs_embeds: Tensor | None = None,
                output_hidden_states: bool | None = None, position_ids: Tensor | None = None,
                past_key_values: Any = None, use_cache: bool | None = None, logits_to_keep: int = 0,
                targets: Tensor | None = None, output_attentions: bool | None = None,
                **kwargs: Any) -> CausalLMOutput:
        """As :meth:`TinyLMModel.forward`, plus ``labels`` (B, T) long, shifted inside (position t is scored on
        labels[t + 1]), or ``targets`` (B, T) long, aligned (position t is scored on targets[t]), -100 = not
        scored (class docstring); and ``logits_to_keep`` (0 = all; n = the last n positions). Returns loss
        (scalar or None), logits (B, T or n, V) and hidden_states (with output_hidden_states).

        Raises ConfigError for both labels and targets, either of another shape than (B, T),
        ``output_attentions=True`` (attention maps come from :class:`attnlab.Session` probes) and as
        :meth:`TinyLMModel.forward`."""
        if output_attentions:
            raise ConfigError("TinyLM returns no attention weights (output_attentions=True); read attention "
                              "through attnlab.Session probes")
        if labels is not None and targets is not None:
            raise ConfigError("expected labels (shifted inside, as in transformers) or targets (aligned to "
                              "positions), not both")
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states,
                             past_key_values=past_key_values, use_cache=use_cache)
        hidden = outputs.last_hidden_state
        logits = self.lm_head(hidden if not logits_to_keep else hidden[:, -logits_to_keep:])
        loss = None
        scored = labels if labels is not None else targets
        if scored is not None:
            if scored.shape != hidden.shape[:2]:
                name = "labels" if labels is not None else "targets"
                raise ConfigError(f"expected {name} of shape {tuple(hidden.shape[:2])}, got {tuple(scored.shape)}")
            full_logits = logits if not logits_to_keep else self.lm_head(hidden)
            if labels is not None:  # transformers' convention: position t predicts labels[t + 1]
                full_logits, scored = full_logits[:, :-1], labels[:, 1:]
            # training sums this loss instead (attnlab.lab.data_parallel.token_loss_sum): keep the two in step
            loss = F.cross_entropy(full_logits.float().flatten(0, 1), scored.flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)

    def prepare_inputs_for_generation(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """The whole sequence so far at every step (no KV cache): input_ids (B, T), its attention_mask and, with
        a mask, position_ids counting real tokens (``cumsum - 1``, 0 on padding, as GPT-2), so learned positions
        stay right under left padding."""
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if attention_mask is not None:
            inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return inputs


def build_model(spec: TinyLMSpec, *, seed: int = 0) -> TinyLMForCausalLM:
    """A freshly initialised TinyLM for ``spec``; the same seed gives the same weights (the global torch RNG is
    left as it was). Raises ConfigError / RegistryError as :class:`TinyLMSpec` and :func:`build_layer`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyLMForCausalLM(TinyLMConfig.from_spec(spec))


def register_auto() -> None:
    """Register TinyLM with AutoConfig, AutoModel and AutoModelForCausalLM (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, TinyLMConfig)
    for auto, cls in ((AutoModel, TinyLMModel), (AutoModelForCausalLM, TinyLMForCausalLM)):
        if TinyLMConfig not in auto._model_mapping:
            auto.register(TinyLMConfig, cls)
