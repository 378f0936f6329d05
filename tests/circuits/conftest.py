"""The planted-circuit model shared by the circuit tests."""

from __future__ import annotations

import pytest
import torch

from attnlab.circuits.pairs import collate_pairs
from tiny_models import tiny_llama


def build_planted(alive=((1, 2),), boost=(1, 2)):
    """A 2-layer, 4-head Llama (GQA, 2 kv heads) whose context reaches the logits only through the ``alive`` heads:
    every other head's output-projection columns and every MLP's down projection are zero; ``boost``'s columns
    are scaled by 20 (a strong effect, far from ties)."""
    model = tiny_llama(num_heads=4, num_kv_heads=2, layers=2, seed=3)
    head_dim = model.config.hidden_size // 4
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight.zero_()
            for head in range(4):
                columns = slice(head * head_dim, (head + 1) * head_dim)
                if (index, head) not in alive:
                    layer.self_attn.o_proj.weight[:, columns] = 0
                elif (index, head) == boost:
                    layer.self_attn.o_proj.weight[:, columns] *= 20
    return model


@pytest.fixture
def planted():
    return build_planted


def random_pairs(seed: int = 0, batch: int = 3, length: int = 7, vocab: int = 97, ragged: bool = True):
    """Random clean prompts; corrupted = the same with two early tokens resampled; 3 choices, answer 0 (with
    ``ragged``, the last row is shorter, so right-padded, and its answer is 1)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        clean = torch.randint(3, vocab, (length,), generator=generator).tolist()
        corrupted = list(clean)
        corrupted[1], corrupted[2] = (torch.randint(3, vocab, (2,), generator=generator) + 0).tolist()
        rows.append((clean, corrupted, [5, 9, 11], 0))
    if ragged:
        rows[-1] = (rows[-1][0][:-2], rows[-1][1][:-2], [5, 9, 11], 1)
    return [collate_pairs(rows[:2]), collate_pairs(rows[2:])]


@pytest.fixture
def pairs():
    return random_pairs
