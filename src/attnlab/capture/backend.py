"""The "attnlab" attention backend: registration with transformers and dispatch to the active session.

transformers calls ``fn(module, query, key, value, attention_mask, **kwargs) -> (output, probs | None)`` for every
attention layer of a model whose ``config._attn_implementation`` is ``"attnlab"``; query arrives as
(B, Hq, Lq, D), key/value as (B, Hkv, Lk, D) with RoPE applied and **not** repeated for GQA, and the output must
be (B, Lq, Hq, D). The paired mask function is transformers' own ``sdpa_mask`` (boolean, True = attend, or None
when the mask is plain causal/full), registered under the same name: without it transformers would silently pass
``attention_mask=None`` and padding or sliding windows would be ignored.

A call with ``implied_map=`` (attnlab's own models, :mod:`attnlab.lab.modeling`, for layers that compute their own
attention) carries no query/key: it shows the session the map the layer implies and returns ``(None, None)``.

The active :class:`~attnlab.capture.session.Session` is found through a ``contextvars.ContextVar``; with no active
session (which only happens if a model was left switched to "attnlab" by hand) the call runs plain SDPA.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Any

from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

if TYPE_CHECKING:
    from attnlab.capture.session import Session

BACKEND_NAME = "attnlab"

ACTIVE_SESSION: contextvars.ContextVar[Session | None] = contextvars.ContextVar("attnlab_session", default=None)


def attnlab_attention(
    module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor | None, None]:
    """The function registered in transformers' AttentionInterface under the name "attnlab"."""
    session = ACTIVE_SESSION.get()
    if kwargs.get("implied_map") is not None:
        return (None, None) if session is None else session.implied(module, kwargs["implied_map"])
    if session is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return session.attention(module, query, key, value, attention_mask, **kwargs)


def ensure_registered() -> None:
    """Register the attention function and its mask function under "attnlab" (idempotent)."""
    AttentionInterface.register(BACKEND_NAME, attnlab_attention)
    AttentionMaskInterface.register(BACKEND_NAME, sdpa_mask)
