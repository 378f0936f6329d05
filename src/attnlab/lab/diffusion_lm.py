"""A tiny masked-diffusion language-model sampler (LLaDA-style), for studying attention across denoising steps.

The answer region starts as ``[MASK]`` tokens after the prompt; at each of ``num_steps`` steps a bidirectional
masked LM (any ``AutoModelForMaskedLM``, e.g. ``BertForMaskedLM``) predicts every masked token at once, and the
``k_t`` most confident predictions are kept (unmasked); the rest stay masked for the next step. ``k_t`` splits the
answer length evenly over the steps, the first steps taking the remainder (LLaDA's ``get_num_transfer_tokens``;
Nie et al. 2025, "Large Language Diffusion Models", low-confidence remasking with temperature 0). With a
``session``, ``session.set_step(t)`` runs before step t's forward, so step-scheduled edits (``sparsed``,
``steps=``) and per-step probes see the denoising step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.errors import ConfigError, ShapeError

__all__ = ["DiffusionLMSample", "sample", "tokens_per_step"]


@dataclass(frozen=True)
class DiffusionLMSample:
    """The result of :func:`sample`.

    Attributes:
        tokens: (B, P + answer_len) long, the prompt followed by the generated answer.
        unmasked_at: (B, answer_len) long, the step at which each answer token was kept (0 … num_steps − 1).
    """

    tokens: Tensor
    unmasked_at: Tensor


def tokens_per_step(answer_len: int, num_steps: int) -> list[int]:
    """How many answer tokens each step unmasks: ``answer_len // num_steps`` each, one more for the first
    ``answer_len % num_steps`` steps (sums to answer_len).

    Raises:
        ConfigError: answer_len < 1, num_steps < 1 or num_steps > answer_len (a step would unmask nothing).
    """
    if answer_len < 1 or num_steps < 1:
        raise ConfigError(f"answer_len and num_steps must be >= 1, got {answer_len} and {num_steps}")
    if num_steps > answer_len:
        raise ConfigError(f"num_steps must be <= answer_len ({answer_len}) so every step unmasks a token, "
                          f"got {num_steps}")
    base, extra = divmod(answer_len, num_steps)
    return [base + (1 if step < extra else 0) for step in range(num_steps)]


@torch.no_grad()
def sample(model: nn.Module, prompt_ids: Tensor, *, answer_len: int, num_steps: int, mask_token_id: int,
           session: Any = None) -> DiffusionLMSample:
    """Generate ``answer_len`` tokens after ``prompt_ids`` in ``num_steps`` denoising steps.

    Args:
        model: a masked LM: ``model(input_ids=..., attention_mask=...).logits`` is (B, L, vocab); its attention must
            be bidirectional (every position sees every other).
        prompt_ids: (B, P) long, P ≥ 0 (no padding: every row has the same length).
        answer_len: tokens to generate. num_steps: denoising steps T (≤ answer_len).
        mask_token_id: the ``[MASK]`` token (``tokenizer.mask_token_id``; ``config.vocab_size − 1`` is a common choice
            for a random model).
        session: an active :class:`attnlab.Session` around ``model``, or None; ``session.set_step(t)`` is called
            before each step's forward.

    Returns:
        :class:`DiffusionLMSample`. Deterministic (argmax predictions; ties in confidence go to the earlier position).

    Raises:
        ShapeError: prompt_ids not 2-D. ConfigError: see :func:`tokens_per_step`.
    """
    if prompt_ids.dim() != 2:
        raise ShapeError(f"prompt_ids must be (batch, prompt_len), got shape {tuple(prompt_ids.shape)}")
    schedule = tokens_per_step(answer_len, num_steps)
    B, P = prompt_ids.shape
    device = prompt_ids.device
    answer = torch.full((B, answer_len), mask_token_id, dtype=torch.long, device=device)
    tokens = torch.cat([prompt_ids.long(), answer], dim=1)  # (B, P + A)
    unmasked_at = torch.full((B, answer_len), -1, dtype=torch.long, device=device)
    attention_mask = torch.ones_like(tokens)
    positions = torch.arange(answer_len, device=device)
    for step, count in enumerate(schedule):
        if session is not None:
            session.set_step(step)
        logits = model(input_ids=tokens, attention_mask=attention_mask).logits[:, P:]  # (B, A, vocab)
        probs = torch.softmax(logits.float(), dim=-1)
        confidence, prediction = probs.max(dim=-1)  # (B, A)
        masked = unmasked_at < 0
        # earlier positions win ties: a tiny position penalty far below any float32 confidence gap
        score = torch.where(masked, confidence.double() - positions * 1e-12, torch.full_like(confidence.double(),
                                                                                              -1.0))
        chosen = score.topk(count, dim=-1).indices  # (B, count)
        rows = torch.arange(B, device=device)[:, None]
        tokens[rows, P + chosen] = prediction[rows, chosen]
        unmasked_at[rows, chosen] = step
    return DiffusionLMSample(tokens=tokens, unmasked_at=unmasked_at)
