"""Attention sinks per (layer, head): sink scores of the first keys, the sink indicator, and hidden sinks.

Definitions (METHODS.md):
- Gu et al. 2025, "When Attention Sink Emerges", §1 (METHODS.md #1): the importance of key position k is
  ``alpha_k = 1/(T-k) * sum_{i>=k} A_ik``, the mean attention k receives from the queries that can see it; a head
  has a sink on k when ``alpha_k > epsilon`` (default 0.3); the sink rate is the mean indicator over heads.
  Positions count real tokens only: k = 0 is each sequence's first real token (BOS when one is fed).
- Yu et al. 2024, ACT (METHODS.md #2): a *hidden sink* is a non-initial key whose column score
  ``s_k = sum_i A_ik / (number of queries that see k)`` exceeds theta (default 0.1, the released scripts' absolute
  threshold; the paper's alpha/N form is low confidence and not used here). Scores are computed per sequence.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import torch
from torch import Tensor

from attnlab.functional.attention import BlockView
from attnlab.probes import PROBES
from attnlab.probes.base import AttentionCall, ModelShape, Probe, Row, RowWriter, safe_div

MAX_LISTED_HIDDEN_SINKS = 200


@PROBES.register("sink")
class SinkProbe(Probe):
    """Sink scores alpha_k for the first ``num_keys`` keys, the sink indicator, sink rate, and hidden sinks.

    Args:
        num_keys: K, how many initial key positions get an alpha_k (default 4).
        epsilon: sink-indicator threshold on alpha_0 (default 0.3, Gu et al. 2025).
        theta: hidden-sink threshold on the column score (default 0.1, ACT's released scripts).
        min_queries: keys seen by fewer real queries than this are not hidden-sink candidates (default 16). The
            last keys of a window are seen by only a few queries, so their column mean is dominated by local
            (diagonal) attention and would flag nearly every head; ``min_queries=1`` gives ACT's rule exactly.
    """

    name = "sink"
    needs = frozenset({"probs"})

    def __init__(self, num_keys: int = 4, epsilon: float = 0.3, theta: float = 0.1, min_queries: int = 16) -> None:
        if num_keys < 1:
            raise ValueError(f"num_keys must be >= 1, got {num_keys}")
        if not (0 < epsilon < 1 and 0 < theta < 1):
            raise ValueError(f"epsilon and theta must lie in (0, 1), got epsilon={epsilon}, theta={theta}")
        if min_queries < 1:
            raise ValueError(f"min_queries must be >= 1, got {min_queries}")
        self.num_keys, self.epsilon, self.theta, self.min_queries = num_keys, epsilon, theta, min_queries

    def bind(self, shape: ModelShape) -> None:
        super().bind(shape)
        L, H, K = shape.num_layers, shape.num_heads, self.num_keys
        self.alpha_sum = torch.zeros(L, H, K, dtype=torch.float64)
        self.alpha_count = torch.zeros(L, H, K, dtype=torch.float64)
        self.hidden_count = torch.zeros(L, H, dtype=torch.float64)
        self.sequences = torch.zeros(L, dtype=torch.float64)
        self.hits: list[tuple[int, int, int, int, int, float]] = []  # sequence, layer, head, position, token, score

    def begin_call(self, call: AttentionCall) -> None:
        B, Lk = call.key_positions.shape
        # Index of the key holding position k in each sequence, or 0 with a "missing" flag.
        ranks = torch.arange(self.num_keys, device=call.key_positions.device)
        match = call.key_positions[:, None, :] == ranks[None, :, None]  # (B, K, Lk)
        self._key_index = match.long().argmax(dim=-1)  # (B, K)
        self._key_present = match.any(dim=-1)  # (B, K)
        self._col_sum = torch.zeros(B, call.num_heads, Lk, dtype=torch.float64, device=call.value.device)
        self._col_count = torch.zeros(B, call.num_heads, Lk, dtype=torch.float64, device=call.value.device)

    def update(self, call: AttentionCall, block: BlockView) -> None:
        probs = block.probs  # (B, H, bq, Lk)
        B, H, bq, Lk = probs.shape
        query_ok = call.query_valid[:, block.q_index][:, None, :, None]  # (B, 1, bq, 1)
        sees = query_ok if block.keep is None else (block.keep & query_ok)  # (B|1, H|1, bq, Lk)
        sees = sees.expand(B, H, bq, Lk)
        index = self._key_index[:, None, None, :].expand(B, H, bq, self.num_keys)
        seen_first = sees.gather(-1, index) & self._key_present[:, None, None, :]  # (B, H, bq, K)
        on_first = probs.gather(-1, index) * seen_first
        layer = call.layer_idx
        self.alpha_sum[layer] += on_first.sum(dim=(0, 2)).double().cpu()
        self.alpha_count[layer] += seen_first.sum(dim=(0, 2)).double().cpu()
        self._col_sum += (probs * sees).sum(dim=2).double()
        self._col_count += sees.sum(dim=2).double()

    def end_call(self, call: AttentionCall) -> None:
        score = safe_div(self._col_sum, self._col_count)  # (B, H, Lk)
        candidate = (call.key_positions >= 1) & call.key_valid  # (B, Lk)
        hit = (score > self.theta) & candidate[:, None, :] & (self._col_count >= self.min_queries)
        layer = call.layer_idx
        self.hidden_count[layer] += hit.sum(dim=(0, 2)).double().cpu()
        self.sequences[layer] += score.shape[0]
        ids = call.sequence.input_ids
        for b, h, j in hit.nonzero().tolist():
            token = int(ids[b, j]) if ids is not None and ids.shape[1] == call.kv_len else -1
            position = int(call.key_positions[b, j])
            self.hits.append((call.sequence.sequence_offset + b, layer, h, position, token, float(score[b, h, j])))
        del self._col_sum, self._col_count

    def state(self) -> dict[str, Tensor]:
        return {"alpha_sum": self.alpha_sum, "alpha_count": self.alpha_count,
                "hidden_count": self.hidden_count, "sequences": self.sequences}

    def merge(self, other: Probe) -> None:
        super().merge(other)
        self.hits.extend(other.hits)  # type: ignore[attr-defined]

    def alpha(self) -> Tensor:
        """(num_layers, num_heads, num_keys) alpha_k; NaN where no query saw the key."""
        return safe_div(self.alpha_sum, self.alpha_count)

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        alpha = self.alpha()
        for k in range(self.num_keys):
            out.add_grid("alpha", alpha[..., k], position=k, valid=self.alpha_count[..., k] > 0)
        seen = self.alpha_count[..., 0] > 0
        indicator = (alpha[..., 0] > self.epsilon).double()
        out.add_grid("sink_indicator", indicator, position=0, valid=seen)
        for layer in range(indicator.shape[0]):
            if bool(seen[layer].any()):
                out.add("sink_rate", indicator[layer][seen[layer]].mean().item(), layer, None, 0)
        per_sequence = safe_div(self.hidden_count, self.sequences[:, None].expand_as(self.hidden_count))
        out.add_grid("hidden_sinks", per_sequence, valid=self.sequences[:, None].expand_as(per_sequence) > 0)
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        label = (lambda t: decode(t) if t >= 0 else "?") if decode is not None else (lambda t: str(t))
        top = sorted(self.hits, key=lambda hit: -hit[5])[:MAX_LISTED_HIDDEN_SINKS]
        listed = [{"window": s, "layer": layer, "head": h, "position": p, "token_id": t, "token": label(t),
                   "score": round(score, 6)} for s, layer, h, p, t, score in top]
        by_token: dict[int, list[float]] = defaultdict(list)
        heads_by_token: dict[int, Counter] = defaultdict(Counter)
        for _, layer, h, _, t, score in self.hits:
            by_token[t].append(score)
            heads_by_token[t][(layer, h)] += 1
        extreme = sorted(
            ({"token_id": t, "token": label(t), "hits": len(scores), "heads": len(heads_by_token[t]),
              "max_score": round(max(scores), 6), "mean_score": round(sum(scores) / len(scores), 6)}
             for t, scores in by_token.items()),
            key=lambda row: -row["hits"],
        )[:50]
        return {"epsilon": self.epsilon, "theta": self.theta, "num_keys": self.num_keys, "min_queries": self.min_queries,
                "num_hidden_sinks": len(self.hits), "hidden_sinks": listed, "extreme_tokens": extreme}
