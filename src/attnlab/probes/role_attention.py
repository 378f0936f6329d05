"""Attention by token role: how much of each query's attention goes to image, text, system and generated tokens.

For every layer and query head, and every pair of roles (r, s) of :data:`attnlab.roles.ROLES`, the probe keeps

    mass[l, h, r, s] = mean over real query rows i of role r of  Σ_{j of role s} A[l, h, i, j]

Each query row's attention sums to 1 over the keys it sees, so ``mass[l, h, r, :]`` sums to 1: the statistic is
normalised per query, then averaged over the queries of role r (every sequence, window and batch pooled). Rows
``text_to_image`` are the share of a text token's attention that lands on image tokens, the quantity the LVLM
papers track layer by layer (VAR's visual budget Σ_{j∈I} A_ij, METHODS.md #8; MODA's "attention deficit" on visual
tokens, #32; CARVE's attention over image tokens, #19).

Per image it also keeps the attention each image token receives from the ``queries`` roles (default text) of its
sequence, averaged over layers, heads and those queries (queries that cannot see the image count with 0): a
rows × cols grid drawn on the image (``ImageOverlay``, frames averaged for a video); its sum is that image's share
of the mean query's attention. Grids come from the forward pass that holds the image (the prefill); decoding steps
add to the role shares only. Only the first ``overlays`` sequences keep grids (global sequence order, so
the grids do not depend on how windows were split over batches or processes).

Roles come from ``call.query_roles`` / ``call.key_roles`` (set by the Session on a vision-language model); without
them every real token is text (a text-only model gives ``text_to_text`` = 1). Padding never enters: padded queries
are skipped and padded keys get no attention. Heads are query heads (GQA: the probs are per query head already).
The probe reads probs, so the session runs the blocked kernel (no fused form).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.functional.attention import BlockView
from attnlab.params import Range, validated
from attnlab.probes import PROBES
from attnlab.probes.base import AttentionCall, ModelFacts, Probe, Row, RowWriter, safe_div, visible
from attnlab.report.sections import Column, Heatmap, ImageOverlay, LayerCurve, Section, Series, Table, Text
from attnlab.roles import PAD, ROLES, TEXT, RoleList, role_codes

MARKED_CELLS = 5
FLAT_RANGE = 0.01  # a grid whose (max - min) / max is below this gets no markers: nothing stands out
"""The overlay circles this many image tokens with the most attention."""

_PAIRS = tuple(f"{q}_to_{k}" for q in ROLES for k in ROLES if PAD not in (ROLES.index(q), ROLES.index(k)))
_LINES = ("text_to_image", "text_to_text", "text_to_system", "generated_to_image", "image_to_image")


def call_roles(call: AttentionCall) -> tuple[Tensor, Tensor]:
    """(query roles (B, Lq) long, key roles (B, Lk) long): the call's role codes, or text/pad from the validity
    masks when the model has no roles (text-only)."""
    def of(codes: Tensor | None, valid: Tensor) -> Tensor:
        if codes is not None:
            return codes.long().to(valid.device)
        return torch.where(valid, torch.full_like(valid, TEXT, dtype=torch.long),
                           torch.full_like(valid, PAD, dtype=torch.long))
    return of(call.query_roles, call.query_valid), of(call.key_roles, call.key_valid)


@PROBES.register("role_attention")
class RoleAttentionProbe(Probe):
    """Attention mass from queries of each role to keys of each role, per layer × head, and per image token.

    Args:
        queries: the query roles whose attention makes the per-image-token grids (default ``text``; text joins
            roles with ``+``, e.g. ``text+system``).
        overlays: how many sequences (the first ones, in global order) keep per-image-token grids (default 4).
    """

    shardable = True  # export_state/import_state carry the whole state (grids as JSON side parts)
    needs = frozenset({"probs"})

    sections = (Section("role-attention", "Attention by token role", (
        Text(when="text_to_image",
             template="Text tokens give {percent.text_to_image} % of their attention to image tokens and "
                      "{percent.text_to_text} % to text tokens (mean over layers, heads and text queries)."),
        Heatmap((Series("text_to_image", "text → image", "share of attention (0–1)", vmin=0.0),),
                when="text_to_image", alt="Heatmap of attention from text to image tokens by layer and head",
                caption="Share of each text query's attention that lands on image tokens, per layer (rows) and query "
                        "head (columns), averaged over the text queries of every sequence; grey = no data. Each "
                        "query's attention sums to 1 over the keys it sees."),
        LayerCurve(tuple(Series(stat, stat.replace("_to_", " → ")) for stat in _LINES), title="attention by role",
                   ylabel="share of the query's attention", ylim=(0.0, 1.0), alt="Attention share by role per layer",
                   caption="Share of a query's attention that goes to keys of a role, by layer (mean over heads "
                           "and the queries of the first role)."),
        Table(tuple(Column(stat, stat.replace("_to_", " → ")) for stat in _PAIRS), index="picked_layers",
              index_header="layer", title="Attention share by role", present_only=True,
              caption="Mean over heads and the queries of the first role, for each pair of roles present; first, "
                      "middle and last layer, then every layer."),
        ImageOverlay(extras="image_grids", label="mean attention per image token", when="image_grids",
                     alt="Attention each image token receives, drawn on each input image",
                     caption="Attention each image token receives from {overlay_queries} queries, averaged over "
                             "layers, heads and those queries, drawn on the image; circles mark the "
                             f"{MARKED_CELLS} tokens with the most (no circles where the grid's values differ "
                             f"by under {100 * FLAT_RANGE:g} % of its largest: a near-uniform map)."),
    )),)

    @validated
    def __init__(self, queries: RoleList = ("text",), overlays: Annotated[int, Range(ge=0, le=4096)] = 4) -> None:
        self.queries, self.overlays = tuple(queries), overlays
        self._query_codes = role_codes(self.queries)

    def bind(self, facts: ModelFacts) -> None:
        super().bind(facts)
        L, H, R = facts.num_layers, facts.num_heads, len(ROLES)
        self.mass_sum = torch.zeros(L, H, R, R, dtype=torch.float64)  # Σ over query rows of role r of mass to s
        self.query_count = torch.zeros(L, H, R, dtype=torch.float64)  # query rows of role r that saw a key
        self.key_count = torch.zeros(L, R, dtype=torch.float64)  # real keys of role s (rows only for roles present)
        # (global sequence, image index) -> [sum (length,) float64, rows counted, rows, cols, frames]
        self.grids: dict[tuple[int, int], list[Any]] = {}

    def begin_call(self, call: AttentionCall) -> None:
        if call.num_heads != self.mass_sum.shape[1]:
            raise ConfigError(f"role_attention was bound to {self.mass_sum.shape[1]} heads, the call has "
                              f"{call.num_heads}")
        self._qroles, self._kroles = call_roles(call)
        self._offset = call.sequence.valid.shape[1] - call.kv_len  # key index j is mask column offset + j
        present = torch.bincount(self._kroles[call.key_valid.to(self._kroles.device)], minlength=len(ROLES))
        self.key_count[call.layer_idx] += present.double().cpu()
        R = len(ROLES)
        self._mass = torch.zeros(call.num_heads, R, R, dtype=torch.float32, device=call.device)
        self._count = torch.zeros(call.num_heads, R, dtype=torch.float32, device=call.device)
        first, q_offset = call.sequence.sequence_offset, call.sequence.valid.shape[1] - call.q_len
        # grids come from the forward pass whose queries hold the image (a decoding step is numbered as a new
        # sequence: its attention counts in the role shares, not in the grids)
        self._spans = [span for span in call.images if first + span.sequence < self.overlays and span.start >= q_offset]
        self._received = {span: torch.zeros(span.length, dtype=torch.float32, device=call.device)
                          for span in self._spans}
        self._received_rows = {span: 0.0 for span in self._spans}

    def update(self, call: AttentionCall, block: BlockView) -> None:
        block = block.without_nan_rows()  # NaN rows become rows that see no key: not counted
        probs = block.probs  # (B, H, bq, width); keys at width … Lk-1 got no attention from this block
        B, H, bq, width = probs.shape
        R = len(ROLES)
        row_ok = visible(call, block).any(dim=-1)  # (B, H, bq): real rows that see at least one key
        key_onehot = torch.nn.functional.one_hot(self._kroles[:, :width], R).to(probs.dtype)  # (B, width, R)
        by_key_role = probs @ key_onehot[:, None]  # (B, H, bq, R)
        query_onehot = torch.nn.functional.one_hot(self._qroles[:, block.q_index], R).to(probs.dtype)  # (B, bq, R)
        weights = query_onehot[:, None] * row_ok[..., None].to(probs.dtype)  # (B, H, bq, R)
        self._mass += torch.einsum("bhqr,bhqs->hrs", weights, by_key_role).float()
        self._count += weights.sum(dim=(0, 2)).float()
        if not self._spans:
            return
        chosen = torch.isin(self._qroles[:, block.q_index], torch.tensor(self._query_codes, device=probs.device))
        chosen = chosen[:, None, :] & row_ok  # (B, H, bq)
        for span in self._spans:
            weight = chosen[span.sequence].to(probs.dtype)  # (H, bq)
            self._received_rows[span] += float(weight.sum())  # rows that cannot see the image count, with mass 0
            start, end = span.start - self._offset, span.end - self._offset
            if start < 0 or start >= width:  # the image is outside the keys this block sees
                continue
            stop = min(end, width)
            block_probs = probs[span.sequence, :, :, start:stop]  # (H, bq, n)
            self._received[span][: stop - start] += torch.einsum("hq,hqk->k", weight, block_probs).float()

    def end_call(self, call: AttentionCall) -> None:
        layer = call.layer_idx
        self.mass_sum[layer] += self._mass.double().cpu()
        self.query_count[layer] += self._count.double().cpu()
        first = call.sequence.sequence_offset
        for span in self._spans:
            rows = self._received_rows[span]
            if rows == 0:
                continue
            key = (first + span.sequence, span.index)
            entry = self.grids.setdefault(key, [torch.zeros(span.length, dtype=torch.float64), 0.0, span.rows,
                                                span.cols, span.frames])
            entry[0] = entry[0] + self._received[span].double().cpu()
            entry[1] += rows
        del self._mass, self._count, self._received, self._received_rows, self._spans

    def state(self) -> dict[str, Tensor]:
        return {"mass_sum": self.mass_sum, "query_count": self.query_count, "key_count": self.key_count}

    def merge(self, other: Probe) -> None:
        super().merge(other)
        for key, (sums, rows, *shape) in other.grids.items():  # type: ignore[attr-defined]
            mine = self.grids.get(key)
            self.grids[key] = [sums.clone(), rows, *shape] if mine is None else [mine[0] + sums, mine[1] + rows,
                                                                                   *shape]

    def export_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``state()`` plus ``grids``: ``[[sequence, image, rows_counted, rows, cols, frames, [sums]]]``."""
        tensors, side = super().export_state()
        grids = [[s, i, rows, r, c, f, sums.tolist()] for (s, i), (sums, rows, r, c, f) in sorted(self.grids.items())]
        return tensors, {**side, "grids": grids}

    def import_state(self, tensors: dict[str, Tensor], side: dict[str, Any]) -> None:
        super().import_state(tensors, side)
        self.grids = {(s, i): [torch.tensor(sums, dtype=torch.float64), rows, r, c, f]
                      for s, i, rows, r, c, f, sums in side["grids"]}

    def mass(self) -> Tensor:
        """(num_layers, num_heads, R, R) mean share of a role-r query's attention on role-s keys; NaN where no
        query of role r was seen."""
        return safe_div(self.mass_sum, self.query_count[..., None].expand_as(self.mass_sum))

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        mass = self.mass()
        seen = self.query_count > 0  # (L, H, R)
        for r, query_role in enumerate(ROLES):
            if r == PAD or not bool(seen[..., r].any()):
                continue
            for s, key_role in enumerate(ROLES):
                keys = self.key_count[:, s, None] > 0  # (L, 1): layers where keys of role s existed
                if s != PAD and bool(keys.any()):
                    out.add_grid(f"{query_role}_to_{key_role}", mass[..., r, s], valid=seen[..., r] & keys)
        return out.rows

    def image_grids(self) -> list[dict[str, Any]]:
        """One record per image with a grid: sequence, image_index, rows, cols, frames, grid (rows × cols, mean
        over frames), markers (the most attended cells), title."""
        records = []
        for (sequence, index), (sums, rows, r, c, f) in sorted(self.grids.items()):
            grid = (sums / rows).reshape(f, r, c).mean(dim=0)  # (rows, cols)
            high, low = float(grid.max()), float(grid.min())
            flat = not high > 0 or (high - low) / high < FLAT_RANGE
            top = [] if flat else grid.flatten().topk(min(MARKED_CELLS, grid.numel())).indices.tolist()
            records.append({"sequence": sequence, "image_index": index, "rows": r, "cols": c, "frames": f,
                            "grid": [[round(v, 8) for v in line] for line in grid.tolist()],
                            "markers": [[t // c, t % c] for t in top],
                            "share": round(float(sums.sum() / rows), 6),
                            "title": f"sequence {sequence}, image {index}" + (" (near-uniform)" if flat else "")})
        return records

    def extras(self, decode: Any = None) -> dict[str, Any]:
        return {"roles": list(ROLES), "overlay_queries": "+".join(self.queries), "overlays": self.overlays,
                "image_grids": self.image_grids()}
