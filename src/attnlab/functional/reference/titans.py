"""Loop oracle for the Titans neural memory (``functional/titans.py``): per-token gradients by autograd.

Each token's surprise gradient is ``torch.autograd.grad`` of ‖M_W(k_t) - v_t‖² at the chunk-start weights W
(``create_graph=True``, so the oracle itself can be differentiated); momentum and forgetting are applied one
token at a time. Shares no algebra with the fast forms. Runs in the dtype it is given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def neural_memory_reference(query: Tensor, key: Tensor, value: Tensor, lr: Tensor, momentum: Tensor,
                            forget: Tensor, initial_state, *, chunk_size: int = 16):
    """Shapes as ``functional.titans.neural_memory``; returns ``(output, (W1, W2, S1, S2))``."""
    B, H, T, D = query.shape
    w1, w2, s1, s2 = initial_state
    outputs = []
    for start in range(0, T, chunk_size):
        w1_0, w2_0 = w1, w2
        if not w1_0.requires_grad:  # autograd.grad needs leaves on the graph
            w1_0, w2_0 = w1_0.detach().requires_grad_(), w2_0.detach().requires_grad_()
        for t in range(start, min(start + chunk_size, T)):
            outputs.append(F.silu(query[:, :, t, None, :] @ w1_0) @ w2_0)  # read at the chunk start
            loss = (F.silu(key[:, :, t, None, :] @ w1_0) @ w2_0 - value[:, :, t, None, :]).square().sum()
            g1, g2 = torch.autograd.grad(loss, (w1_0, w2_0), create_graph=True)  # sums over (B, H): independent
            s1 = momentum[:, :, t, None, None] * s1 - lr[:, :, t, None, None] * g1
            s2 = momentum[:, :, t, None, None] * s2 - lr[:, :, t, None, None] * g2
            w1 = (1 - forget[:, :, t, None, None]) * w1 + s1
            w2 = (1 - forget[:, :, t, None, None]) * w2 + s2
    return torch.cat(outputs, dim=2), (w1, w2, s1, s2)
