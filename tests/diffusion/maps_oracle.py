"""An independent oracle for the maps tests: the attention probs of a diffusers attention module recomputed from
its inputs (to_q / to_k and a plain softmax), captured with a forward pre-hook."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def plain_probs(attn: nn.Module, hidden: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """(B, H, Lq, Lk) softmax(q kᵀ / √d) of a diffusers ``Attention`` without q/k norms (PixArt, Wan cross)."""
    context = hidden if context is None else context
    q, k = attn.to_q(hidden), attn.to_k(context)
    B, Lq, width = q.shape
    H = attn.heads
    q = q.view(B, Lq, H, width // H).transpose(1, 2)
    k = k.view(B, k.shape[1], H, width // H).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) * (width // H) ** -0.5, dim=-1)


@contextlib.contextmanager
def captured_probs(modules: dict[int, nn.Module]):
    """Yields {layer: [probs per call]} for ``modules`` ({attnlab layer: diffusers Attention}), recomputed from the
    inputs each call receives."""
    seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in modules}
    handles = []
    for layer, attn in modules.items():
        def hook(module, args, kwargs, layer=layer):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            with torch.no_grad():
                seen[layer].append(plain_probs(module, hidden, context))
        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
