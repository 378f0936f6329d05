"""Per-head interventions measured on the loss: shared by active_dormant, head_importance and head_overlap.

Each head is intervened on alone, through an edit (``first_key`` with α = 1, or ``head_scale`` with scale 0) that
the runner applies inside a Session, so every intervention is checked to have fired: one pass of the whole batch
per (layer, head).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from attnlab.analyses.base import Runner
from attnlab.params import check_indices


def check_layers(name: str, layers: list[int] | None, num_layers: int) -> None:
    """Raise ConfigError ``"<name> layers must be in 0..N-1, got 40"`` (:func:`attnlab.params.check_indices`)
    unless every layer index lies in 0 … num_layers - 1 (None: all layers)."""
    check_indices(f"{name} layers", layers, num_layers)


def head_effects(runner: Runner, batch: dict[str, Tensor], mode: str, layers: list[int] | None = None,
                 progress: Callable[[int, int, str], None] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Loss change and KL of every single-head intervention, per sequence.

    Args:
        runner: the runner of a causal LM. batch: ``input_ids``/``attention_mask`` (batch, seq_len).
        mode: ``"first_key"`` (one-hot attention on the first real key) or ``"zero"`` (head output × 0).
        layers: layers to intervene on (default all); the others get NaN.
        progress: called ``(done, total, "head")`` before the first and after every single-head pass.
    Returns:
        base_loss (batch,) mean next-token loss (nats); loss_change (batch, num_layers, num_heads) = edited - base;
        kl (batch, num_layers, num_heads) = mean over real targets of KL(p_base ‖ p_edited), float64 on CPU.
    """
    from attnlab.edits import EDITS

    L, H = runner.facts.num_layers, runner.facts.num_heads
    B = batch["input_ids"].shape[0]
    loss_change = torch.full((B, L, H), float("nan"), dtype=torch.float64)
    kl = torch.full((B, L, H), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        base = runner.forward(batch)
        base_loss = base.mean_loss().cpu()
        base_logp = torch.log_softmax(base.logits[:, :-1].float(), dim=-1)  # (B, L-1, V)
        count = base.target_valid.sum(-1).clamp(min=1).double()
        chosen = list(layers) if layers is not None else list(range(L))
        report = progress or (lambda done, total, what: None)
        report(0, len(chosen) * H, "head")
        for number, layer in enumerate(chosen):
            for head in range(H):
                if mode == "first_key":
                    edit = EDITS.get("first_key")(alpha=1.0, layers=[layer], heads=[head])
                else:
                    edit = EDITS.get("head_scale")(scale=0.0, layers=[layer], heads=[head])
                edited = runner.forward(batch, edits=[edit])
                loss_change[:, layer, head] = (edited.mean_loss().cpu() - base_loss).double()
                logp = torch.log_softmax(edited.logits[:, :-1].float(), dim=-1)
                token_kl = (base_logp.exp() * (base_logp - logp)).sum(-1)  # (B, L-1)
                kl[:, layer, head] = ((token_kl * base.target_valid).sum(-1).double() / count).cpu()
                report(number * H + head + 1, len(chosen) * H, "head")
    return base_loss.double(), loss_change, kl


def head_passes(facts: Any, layers: list[int] | None) -> int:
    """How many single-head passes :func:`head_effects` makes per batch (its progress total):
    ``len(layers)`` (default every layer) × num_heads."""
    return (facts.num_layers if layers is None else len(layers)) * facts.num_heads
