"""The layer protocol: what every registered layer implements, and the base class that provides it.

    out, state = layer(hidden_states)                                        # a fresh sequence
    out, state = layer(next_tokens, state=state, position_offset=n_before)   # continue it

``forward(hidden_states, *, state=None, position_offset=0) -> (output, state)``:

- ``hidden_states`` (B, T, C), output (B, T, C) in the same dtype.
- ``state``: what the previous segment returned (layers with ``carries_state``: decaying linear attention,
  Hedgehog, Titans), or None for a fresh sequence. Softmax-family layers keep no state (no KV cache): they return
  None and refuse a non-None state with ConfigError.
- ``position_offset``: tokens before this segment (RoPE, LRPE, absolute-position masks, grid positions). Layers
  with ``positional`` set (retention, lightning, titans) default it to None and raise ConfigError when a state is
  given without it: positions are not stored in the state and restarting them at 0 would be silently wrong.
  Layers without positions accept it and ignore it.
- Data-only extras (MODA's ``group_ids``, deconstructed's ``static_states``, LightNet's ``spatial_shape``) are
  keyword-only arguments after these.

``from_config(config, *, strict=True)`` builds a layer from a mapping or a dataclass instance whose keys are the
constructor's arguments: ``LAYERS.get("gla").from_config({"hidden_size": 64, "num_heads": 4})``. Unknown keys raise
ConfigError (``strict=False`` drops them instead, so one model-wide config, e.g. a ``ModelFacts``, can feed every
layer). Every built-in layer defaults to ``num_heads=4``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import operator
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

from torch import Tensor, nn

from attnlab.errors import ConfigError

__all__ = ["DEFAULT_NUM_HEADS", "Layer", "LayerProtocol", "config_kwargs"]

DEFAULT_NUM_HEADS = 4

L = TypeVar("L", bound="Layer")


@runtime_checkable
class LayerProtocol(Protocol):
    """Structural type of a layer, for type hints (registered layers, plug-ins included, subclass :class:`Layer`)."""

    def forward(self, hidden_states: Tensor, *, state: Any = None,
                position_offset: int = 0) -> tuple[Tensor, Any]: ...

    @classmethod
    def from_config(cls, config: Any) -> LayerProtocol: ...


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    raise ConfigError(f"expected a layer config as a mapping or a dataclass instance, got {type(config).__name__}")


def config_kwargs(cls: type, config: Any, *, strict: bool = True) -> dict[str, Any]:
    """The constructor keyword arguments of ``cls`` that ``config`` (mapping or dataclass instance) gives.

    Raises ConfigError for a key the constructor does not take (``strict``; otherwise it is dropped) and for a
    missing required argument.
    """
    values = _as_dict(config)
    params = {name: p for name, p in inspect.signature(cls.__init__).parameters.items()
              if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
    unknown = sorted(set(values) - set(params))
    if unknown and not takes_any:
        if strict:
            close = difflib.get_close_matches(unknown[0], list(params), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"expected {cls.__name__} config keys among {sorted(params)}, got unknown "
                              f"{unknown}{hint}")
        values = {key: value for key, value in values.items() if key in params}
    missing = [name for name, p in params.items() if p.default is p.empty and name not in values]
    if missing:
        raise ConfigError(f"expected {cls.__name__} config to give {missing}, got keys {sorted(values)}")
    return values


class Layer(nn.Module):
    """Base class of registered layers: :meth:`from_config` and the protocol's shared checks.

    Subclasses implement ``forward(hidden_states, *, state=None, position_offset=0) -> (output, state)`` (module
    docstring) and set ``carries_state`` (returns a state that continues the sequence) and ``positional`` (uses
    absolute positions, so a state needs ``position_offset``).
    """

    carries_state: ClassVar[bool] = False
    positional: ClassVar[bool] = False
    attention_hook: Any = None
    """Set by a host model (``attnlab.lab.modeling``) to route attention through it, else None. Softmax-family
    layers hand it their softmax (``hook.softmax(query, key, value, keep, scale) -> (B, H, T, D)``); other layers
    show it the attention map they imply (``hook.implied(attention_map)``, an
    :class:`attnlab.functional.implied.ImpliedMap`) and keep computing their own output."""

    @property
    def wants_map(self) -> bool:
        """Whether a host hook reads implied maps now (its ``wants_maps``, e.g. only under attnlab's Session), so
        a layer may skip building a map nobody reads. True for a hook without that attribute; False without a hook."""
        hook = self.attention_hook
        return hook is not None and bool(getattr(hook, "wants_maps", True))

    def expose_map(self, attention_map: Any) -> None:
        """Show the attention map this call implies to the host model's hook, if one is set (else do nothing)."""
        if self.attention_hook is not None:
            self.attention_hook.implied(attention_map)

    @classmethod
    def from_config(cls: type[L], config: Any, *, strict: bool = True) -> L:
        """Build from a mapping or dataclass instance of constructor arguments (see the module docstring).

        Raises ConfigError for unknown keys (``strict``), missing required ones, or values the constructor rejects.
        """
        return cls(**config_kwargs(cls, config, strict=strict))

    def start_position(self, state: Any, position_offset: int | None) -> int:
        """The absolute position of this segment's first token.

        Raises ConfigError for a negative or non-integer offset, for a state passed to a layer that keeps none,
        and (``positional`` layers) for a state without ``position_offset``.
        """
        if state is not None and not self.carries_state:
            raise ConfigError(f"expected state=None: {type(self).__name__} keeps no state between calls (no KV "
                              f"cache), got a {type(state).__name__}")
        if position_offset is None:
            if state is not None and self.positional:
                raise ConfigError("pass position_offset (tokens before this segment) with state: positions are "
                                  "not stored in the state")
            return 0
        try:
            offset = operator.index(position_offset)  # int, numpy/torch integers; not floats
        except TypeError:
            offset = -1
        if isinstance(position_offset, bool) or offset < 0:
            raise ConfigError(f"expected position_offset as an int >= 0, got {position_offset!r}")
        return offset
