"""Attention sinks per (layer, head): sink scores of the first keys, the sink indicator, and hidden sinks.

Definitions (METHODS.md):
- Gu et al. 2025, "When Attention Sink Emerges", §1 (METHODS.md #1): the importance of key position k is
  ``alpha_k = 1/(T-k) * sum_{i>=k} A_ik``, the mean attention k receives from the queries that can see it; a head
  has a sink on k when ``alpha_k > epsilon`` (default 0.3); the sink rate is the mean indicator over heads.
  As in the paper's code, alpha_k and the indicator are computed **per sequence** and then averaged over
  sequences: ``sink_indicator`` is the fraction of sequences with alpha_0 > epsilon, ``sink_rate`` its mean over
  heads (per layer, and over all layers and heads in the row with an empty layer). The paper truncates probe
  texts to T = 64 tokens; attnlab uses the run's window length, so rates are comparable only at equal lengths.
  Positions count real tokens only: k = 0 is each sequence's first real token (BOS when one is fed).
- Yu et al. 2024, ACT (METHODS.md #2): a *hidden sink* is a non-initial key whose column score
  ``s_k = sum_i A_ik / (number of queries that see k)`` exceeds theta (default 0.1, the released scripts' absolute
  threshold; the paper's alpha/N form is low confidence and not used here). Scores are computed per sequence.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Annotated, Any

import torch
from torch import Tensor

from attnlab.functional.attention import BlockView
from attnlab.functional.fused_attention import FusedRequest, FusedStats
from attnlab.params import Range, validated
from attnlab.probes import PROBES
from attnlab.probes.base import (
    AttentionCall, ModelFacts, Probe, Row, RowWriter, key_index_of_positions, safe_div, visible,
)
from attnlab.report.sections import Column, Heatmap, LayerCurve, Section, Series, Table, Text

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

    shardable = True  # export_state/import_state carry the whole state
    hit_lists = ("hits",)

    needs = frozenset({"probs"})

    sections = (
        Section("sinks", "Attention sinks", (
            Text(when="sink_indicator",
                 template="Sink rate over all layers and heads: {percent.sink_indicator} % (the share of (window, "
                          "layer, head) triples whose α₀ exceeds ε = {epsilon}, Gu et al. 2025)."),
            Heatmap((Series("alpha", "α₀: mean attention on key 0", "α₀ (fraction of attention, 0–1)", position=0,
                            vmin=0.0, vmax=1.0),),
                    side=Series("sink_rate", "sink rate (ε = {epsilon})", "% of heads × windows", scale=100.0),
                    alt="Heatmap of alpha_0 by layer and head, with the sink rate per layer",
                    caption="Left: α₀, the mean attention that queries pay to key position 0 (the first token fed), "
                            "per layer (rows) and query head (columns); 0–1, grey = no data. Right: sink rate per "
                            "layer, the percentage of (window, head) pairs with α₀ > ε. Metric and threshold follow "
                            "Gu et al. 2025 (When Attention Sink Emerges in Language Models)."),
            LayerCurve((Series("hidden_sinks", "hidden sinks"),), title="hidden sinks per layer",
                       ylabel="per window and head", alt="Hidden sinks per layer",
                       caption="Hidden sinks: non-initial keys whose column score (mean attention from the queries "
                               "that see them) exceeds θ = {theta}, per window and head, by layer (Yu et al. 2024, "
                               "ACT). The tokens are listed under Extreme tokens."),
        )),
        Section("extreme-tokens", "Extreme tokens", (
            Table((Column("token", "token", "token"), Column("hits", "hits"), Column("max_score", "max score"),
                   Column("mean_score", "mean score")),
                  title="Tokens that attract attention", extras="extreme_tokens", sort_by="hits", top=25,
                  empty="No token exceeded θ.",
                  caption="Token strings that were hidden sinks most often (hits = number of (window, layer, head) "
                          "sinks on that token; score = column score, the mean attention a key receives from the "
                          "queries that see it). Top {shown} of {total}. Hidden sinks after Yu et al. 2024 (ACT)."),
            Table((Column("window", "window"), Column("layer", "layer"), Column("head", "head"),
                   Column("position", "position"), Column("token", "token", "token"), Column("score", "score")),
                  title="Strongest hidden sinks", extras="hidden_sinks", sort_by="score", top=25,
                  empty="No hidden sinks above θ.",
                  caption="Non-initial keys whose column score exceeds θ = {theta} (Yu et al. 2024, ACT), highest "
                          "first; top {shown} of {total}."),
        )),
    )

    @validated
    def __init__(self, num_keys: Annotated[int, Range(ge=1, le=1024)] = 4,
                 epsilon: Annotated[float, Range(gt=0.0, lt=1.0)] = 0.3,
                 theta: Annotated[float, Range(gt=0.0, lt=1.0)] = 0.1,
                 min_queries: Annotated[int, Range(ge=1)] = 16) -> None:
        self.num_keys, self.epsilon, self.theta, self.min_queries = num_keys, epsilon, theta, min_queries

    def bind(self, facts: ModelFacts) -> None:
        super().bind(facts)
        L, H, K = facts.num_layers, facts.num_heads, self.num_keys
        self.alpha_sum = torch.zeros(L, H, K, dtype=torch.float64)  # sum over sequences of per-sequence alpha_k
        self.alpha_count = torch.zeros(L, H, K, dtype=torch.float64)  # sequences where key k was seen
        self.indicator_sum = torch.zeros(L, H, dtype=torch.float64)  # sequences with alpha_0 > epsilon
        self.hidden_count = torch.zeros(L, H, dtype=torch.float64)
        self.sequences = torch.zeros(L, dtype=torch.float64)
        self.hits: list[tuple[int, int, int, int, int, float]] = []  # sequence, layer, head, position, token, score

    def begin_call(self, call: AttentionCall) -> None:
        B, Lk, H, K = call.key_positions.shape[0], call.kv_len, call.num_heads, self.num_keys
        self._key_index, self._key_present = key_index_of_positions(call.key_positions, K)  # (B, K)
        device = call.value.device
        self._alpha_sum = torch.zeros(B, H, K, device=device)
        self._alpha_count = torch.zeros(B, H, K, device=device)
        self._col_sum = torch.zeros(B, H, Lk, device=device)
        self._col_count = torch.zeros(B, H, Lk, device=device)
        self._rows = 0

    def update(self, call: AttentionCall, block: BlockView) -> None:
        block = block.without_nan_rows()  # NaN rows count as rows with no visible key (entropy counts them)
        probs = block.probs  # (B, H, bq, width); keys at width and beyond got no attention from this block
        B, H, bq, width = probs.shape
        sees = visible(call, block)  # (B, H, bq, width) (an expanded view)
        in_block = self._key_present & (self._key_index < width)  # (B, K)
        index = self._key_index.clamp(max=width - 1)[:, None, None, :].expand(B, H, bq, self.num_keys)
        seen_first = sees.gather(-1, index) & in_block[:, None, None, :]  # (B, H, bq, K)
        self._alpha_sum += (probs.gather(-1, index) * seen_first).sum(dim=2).float()
        self._alpha_count += seen_first.sum(dim=2)
        # Column sums over the block's real query rows; probs are already 0 on keys a row cannot see.
        query_ok = call.query_valid[:, block.q_index].to(probs.dtype)  # (B, bq)
        self._col_sum[..., :width] += (query_ok[:, None, None, :] @ probs).squeeze(2).float()  # (B, H, width)
        keep = block.keep if block.keep is not None else probs.new_ones(1, 1, bq, width, dtype=torch.bool)
        seen_by = (keep & call.query_valid[:, block.q_index][:, None, :, None]).sum(dim=2)  # (B|1, 1|H, width)
        self._col_count[..., :width] += seen_by
        self._rows += bq

    def fused_request(self, call: AttentionCall) -> FusedRequest:
        """What the fused kernel computes for this probe: column sums and counts over the real query rows
        (:mod:`attnlab.functional.fused_attention`)."""
        return FusedRequest(column_weights=call.query_valid.float())

    def update_fused(self, call: AttentionCall, stats: FusedStats) -> None:
        """The same per-call sums as :meth:`update` over every block, from the fused kernel's column sums: alpha_k
        is the column sum at key position k (probs are 0 where a row cannot see the key), its count the column
        count there."""
        B, H, K = self._alpha_sum.shape
        index = self._key_index[:, None, :]  # (B, 1, K)
        present = self._key_present[:, None, :]  # (B, 1, K)
        self._col_sum += stats.column_sums
        self._col_count += stats.column_counts
        self._alpha_sum += stats.column_sums.gather(-1, index.expand(B, H, K)) * present
        self._alpha_count += stats.column_counts.expand(B, H, -1).gather(-1, index.expand(B, H, K)) * present
        self._rows += call.q_len

    def end_call(self, call: AttentionCall) -> None:
        layer = call.layer_idx
        alpha = safe_div(self._alpha_sum.double(), self._alpha_count.double()).cpu()  # (B, H, K) per sequence
        seen = ~torch.isnan(alpha)
        self.alpha_sum[layer] += torch.nan_to_num(alpha, nan=0.0).sum(dim=0)
        self.alpha_count[layer] += seen.sum(dim=0)
        self.indicator_sum[layer] += ((alpha[..., 0] > self.epsilon) & seen[..., 0]).sum(dim=0)
        # Hidden sinks, per sequence; with sampled query rows the minimum scales with the fraction seen.
        score = safe_div(self._col_sum.double(), self._col_count.double())  # (B, H, Lk)
        min_queries = max(1, math.ceil(self.min_queries * min(1.0, self._rows / max(call.q_len, 1))))
        candidate = (call.key_positions >= 1) & call.key_valid  # (B, Lk)
        hit = (score > self.theta) & candidate[:, None, :] & (self._col_count >= min_queries)
        self.hidden_count[layer] += hit.sum(dim=(0, 2)).double().cpu()
        self.sequences[layer] += score.shape[0]
        ids = call.sequence.input_ids
        for b, h, j in hit.nonzero().tolist():
            token = int(ids[b, j]) if ids is not None and ids.shape[1] == call.kv_len else -1
            position = int(call.key_positions[b, j])
            self.hits.append((call.sequence.sequence_offset + b, layer, h, position, token, float(score[b, h, j])))
        del self._alpha_sum, self._alpha_count, self._col_sum, self._col_count

    def state(self) -> dict[str, Tensor]:
        return {"alpha_sum": self.alpha_sum, "alpha_count": self.alpha_count, "indicator_sum": self.indicator_sum,
                "hidden_count": self.hidden_count, "sequences": self.sequences}

    def alpha(self) -> Tensor:
        """(num_layers, num_heads, num_keys) alpha_k averaged over sequences; NaN where no query saw the key."""
        return safe_div(self.alpha_sum, self.alpha_count)

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        alpha = self.alpha()
        for k in range(self.num_keys):
            out.add_grid("alpha", alpha[..., k], position=k, valid=self.alpha_count[..., k] > 0)
        seen = self.alpha_count[..., 0] > 0
        indicator = safe_div(self.indicator_sum, self.alpha_count[..., 0])  # fraction of sequences with a sink
        out.add_grid("sink_indicator", indicator, position=0, valid=seen)
        for layer in range(indicator.shape[0]):
            if bool(seen[layer].any()):
                out.add("sink_rate", indicator[layer][seen[layer]].mean().item(), layer, None, 0)
        if bool(seen.any()):
            out.add("sink_rate", indicator[seen].mean().item(), None, None, 0)
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
