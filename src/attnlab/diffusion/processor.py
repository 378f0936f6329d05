"""The attnlab attention processor for diffusers models: the model's own processor, with its SDPA call routed to
the active :class:`~attnlab.diffusion.session.DiffusionSession`.

diffusers' extension point for attention is the processor: every attention module (``Attention``, and the
``AttentionModuleMixin`` modules of Flux, Wan, …) calls ``module.processor(module, hidden_states, …)``, and
``module.set_processor`` swaps it. The processor computes query, key and value (projections, q/k norms, RoPE, the
joint concatenation of text and patch tokens) and hands them to torch's ``scaled_dot_product_attention`` (directly,
or through diffusers' ``dispatch_attention_fn`` with its ``native`` backend). :class:`AttnlabProcessor` runs the
module's original processor unchanged, inside a scoped :class:`torch.overrides.TorchFunctionMode` that routes that
one SDPA call to the session, so attnlab sees query (B, H, Lq, D), key/value (B, Hkv, Lk, D) and the mask exactly
as the model built them, for every architecture, without reimplementing any model's processor. Nothing of
diffusers or torch is replaced: the session installs the processors on enter and puts the originals back on exit,
and the processors force diffusers' ``native`` backend only while they run.

When the session has nothing to do on a call (no probe reads it, no edit acts) the SDPA call runs as the model
asked, so outputs are bit-identical to running without a session.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from attnlab.errors import UnsupportedModelError

if TYPE_CHECKING:
    from attnlab.diffusion.session import DiffusionSession


class _RouteSdpa(TorchFunctionMode):
    """Route ``F.scaled_dot_product_attention`` to ``handler``; a handler result of None runs the call as asked."""

    def __init__(self, handler: Callable[..., Tensor | None]) -> None:
        super().__init__()
        self.handler = handler

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            output = self.handler(*args, **kwargs)
            if output is not None:
                return output
        return func(*args, **kwargs)


class _ProcessorWrapper:
    """Base of the per-class wrappers :func:`wrap_processor` builds; attributes read through to the original."""

    def __init__(self, original: Any, session: DiffusionSession, layer: int) -> None:
        self._original, self._session, self._layer = original, session, layer

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") and name in ("_original", "_session", "_layer"):
            raise AttributeError(name)
        return getattr(self._original, name)


@functools.lru_cache(maxsize=None)
def _wrapper_class(processor_class: type) -> type:
    """A wrapper class for processors of ``processor_class`` whose ``__call__`` has the original's signature
    (diffusers drops keyword arguments a processor's signature does not name)."""
    original_call = processor_class.__call__

    @functools.wraps(original_call)
    def __call__(self: _ProcessorWrapper, attn: Any, *args: Any, **kwargs: Any) -> Any:
        # processors take (hidden_states, encoder_hidden_states, ...): by keyword (Attention) or position (Flux)
        encoder = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        crossing = encoder is not None or bool(getattr(attn, "is_cross_attention", False))
        handler = functools.partial(self._session.sdpa_call, attn, self._layer, crossing)
        with _native_backend(), _RouteSdpa(handler):
            return original_call(self._original, attn, *args, **kwargs)

    return type(f"Attnlab{processor_class.__name__}", (_ProcessorWrapper,), {"__call__": __call__})


def _native_backend() -> Any:
    """diffusers' context manager selecting its ``native`` (torch SDPA) attention backend."""
    from diffusers.models.attention_dispatch import attention_backend

    return attention_backend("native")


def wrap_processor(original: Any, session: DiffusionSession, layer: int) -> Any:
    """The attnlab processor for one attention module: ``original`` run with its SDPA call routed to
    ``session.sdpa_call(module, layer, encoder, query, key, value, attn_mask=…, is_causal=…, scale=…, …)``, where
    ``encoder`` says whether the module was handed ``encoder_hidden_states`` (or is a cross-attention module)."""
    return _wrapper_class(type(original))(original, session, layer)


def sdpa_arguments(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False) -> dict[str, Any]:
    """torch SDPA's arguments by name (positional or keyword as the caller passed them)."""
    return {"query": query, "key": key, "value": value, "attn_mask": attn_mask, "dropout_p": dropout_p,
            "is_causal": is_causal, "scale": scale, "enable_gqa": enable_gqa}


MASKED_BIAS = -1e3
"""An additive mask value at or below this masks the key (diffusers writes padding as −10000, exp(−10000) = 0)."""


def keep_from_mask(attn_mask: Tensor | None, batch: int, q_len: int, kv_len: int) -> Tensor | None:
    """The bool keep mask (B|1, 1|H, Lq, Lk) of an SDPA ``attn_mask`` (bool, True = attend; or an additive float
    mask of 0 = attend and ≤ :data:`MASKED_BIAS` = masked), broadcast views only; per-head masks that agree across
    heads keep one head.

    Raises:
        UnsupportedModelError: an additive mask holding real biases (values other than 0 and ≤ MASKED_BIAS).
    """
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        keep = attn_mask
    else:
        keep = attn_mask > MASKED_BIAS
        if bool((keep & (attn_mask != 0)).any()):
            raise UnsupportedModelError("this diffusers model passes an additive attention bias (not a 0/−inf padding "
                                        "mask) to SDPA, which attnlab does not model")
    while keep.dim() < 4:
        keep = keep.unsqueeze(0) if keep.dim() < 2 else keep.unsqueeze(1)
    if keep.shape[1] > 1 and bool((keep == keep[:, :1]).all()):
        keep = keep[:, :1]
    return keep.expand(keep.shape[0] if keep.shape[0] > 1 else batch, keep.shape[1], q_len, kv_len)
