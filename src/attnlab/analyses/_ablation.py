"""Per-head interventions measured on the loss: shared by active_dormant, head_importance and head_overlap.

Each head is intervened on alone. One pass per layer replicates a sequence once per head and intervenes on a
different head in each replica (per-row selections of :meth:`attnlab.capture.model_probes.ModelRunner.forward`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab.errors import ConfigError


def check_layers(name: str, layers: list[int] | None, num_layers: int) -> None:
    """Raise ConfigError unless every layer index lies in 0 … num_layers - 1 (negative indices are rejected)."""
    bad = [layer for layer in layers or [] if not 0 <= layer < num_layers]
    if bad:
        raise ConfigError(f"{name} layers must lie in 0..{num_layers - 1}, got {bad}")


def head_effects(runner: Any, batch: dict[str, Tensor], mode: str, layers: list[int] | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Loss change and KL of every single-head intervention, per sequence.

    Args:
        runner: a ModelRunner of a causal LM. batch: ``input_ids``/``attention_mask`` (batch, seq_len).
        mode: ``"first_key"`` (one-hot attention on the first real key) or ``"zero"`` (head output × 0).
        layers: layers to intervene on (default all); the others get NaN.
    Returns:
        base_loss (batch,) mean next-token loss (nats); loss_change (batch, num_layers, num_heads) = edited - base;
        kl (batch, num_layers, num_heads) = mean over real targets of KL(p_base ‖ p_edited), float64 on CPU.
    """
    info = runner.info
    L, H = info.num_layers, info.num_heads
    ids = batch["input_ids"]
    valid = batch.get("attention_mask", torch.ones_like(ids)).bool()
    B = ids.shape[0]
    loss_change = torch.full((B, L, H), float("nan"), dtype=torch.float64)
    kl = torch.full((B, L, H), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        base = runner.forward(batch)
    base_loss = base.mean_loss().cpu()
    eye = torch.eye(H, dtype=torch.bool)
    for b in range(B):
        replicas = {"input_ids": ids[b : b + 1].expand(H, -1), "attention_mask": valid[b : b + 1].expand(H, -1).long()}
        base_logp = torch.log_softmax(base.logits[b : b + 1, :-1].float(), dim=-1)  # (1, L-1, V)
        targets = base.target_valid[b : b + 1].expand(H, -1)
        count = targets.sum(-1).clamp(min=1).double()
        for layer in layers if layers is not None else range(L):
            if mode == "first_key":
                edited = runner.forward(replicas, first_key={layer: eye})
            else:
                edited = runner.forward(replicas, head_scale={layer: (~eye).float()})
            loss_change[b, layer] = (edited.mean_loss().cpu() - base_loss[b]).double()
            logp = torch.log_softmax(edited.logits[:, :-1].float(), dim=-1)
            token_kl = (base_logp.exp() * (base_logp - logp)).sum(-1)  # (H, L-1)
            kl[b, layer] = ((token_kl * targets).sum(-1).double() / count).cpu()
    return base_loss.double(), loss_change, kl
