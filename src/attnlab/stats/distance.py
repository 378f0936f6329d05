"""Attention as a function of query–key distance: binning and decay fits.

Shape legend: H heads, Dmax number of distinct distances (0 … Dmax-1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError


def log2_bin_starts(max_distance: int) -> list[int]:
    """Bin starts ``[0, 1, 2, 4, 8, …]`` covering distances 0 … max_distance (bin i = [start_i, start_{i+1}))."""
    starts, start = [0], 1
    while start <= max_distance:
        starts.append(start)
        start *= 2
    return starts


def bin_sums(per_distance: Tensor, starts: list[int]) -> Tensor:
    """Sum a (..., Dmax) per-distance tensor into (..., len(starts)) bins."""
    edges = [*starts, per_distance.shape[-1]]
    return torch.stack([per_distance[..., a:b].sum(-1) for a, b in zip(edges[:-1], edges[1:])], dim=-1)


def fit_decay(mean_attention: Tensor, counts: Tensor) -> dict[str, float]:
    """Fit a power law and an exponential to mean attention vs distance, for distances d ≥ 1.

    Power law: ``log a(d) = c - p log d`` (reports ``power_law_exponent`` = p). Exponential:
    ``log a(d) = c - lambda d`` (reports ``exp_decay_rate`` = lambda, per token). Each distance is weighted by
    1 / (number of distances in its log2 bin), so every octave of distance counts equally and long tails do not
    dominate. R² is the weighted coefficient of determination of each fit in log space.

    Args:
        mean_attention: (Dmax,) mean attention per visible (query, key) pair at distance d.
        counts: (Dmax,) number of visible pairs at distance d (distances with 0 pairs or 0 attention are skipped).

    Returns:
        dict with power_law_exponent, power_law_r2, exp_decay_rate, exp_decay_r2 (NaN with fewer than 3 points).
    """
    nan = float("nan")
    result = {"power_law_exponent": nan, "power_law_r2": nan, "exp_decay_rate": nan, "exp_decay_r2": nan}
    d = torch.arange(mean_attention.shape[-1], dtype=torch.float64)
    points = _fit_points(mean_attention, counts, d, "octave")
    if points is None:
        return result
    d, y, w = points
    for name, x in (("power_law", torch.log(d)), ("exp", d)):
        slope, r2 = _weighted_line(x, y, w)
        key = "power_law_exponent" if name == "power_law" else "exp_decay_rate"
        result[key] = -slope
        result[f"{name}_r2" if name == "power_law" else "exp_decay_r2"] = r2
    return result


def fit_power_law(values: Tensor, counts: Tensor, distance: Tensor, weighting: str = "octave") -> tuple[float, float]:
    """Exponent p and R² of ``log a = c - p log r`` over points with r >= 1, counts > 0 and a > 0.

    The one power-law fit of attnlab: ``weighting="octave"`` weights each point by 1 / (points in its log2 bin of r)
    (what :func:`fit_decay` and the ``distance`` probe use); ``"uniform"`` weights every point equally (the
    ``spatial_decay`` probe, whose grid offsets are not one point per distance). R² is weighted the same way.

    Args:
        values: (N,) mean attention per point. counts: (N,) pairs per point. distance: (N,) r per point (any float).
    Returns:
        (p, R²), NaN with fewer than 3 usable points.
    """
    points = _fit_points(values, counts, distance, weighting)
    if points is None:
        return float("nan"), float("nan")
    r, y, w = points
    slope, r2 = _weighted_line(torch.log(r), y, w)
    return -slope, r2


def _fit_points(values: Tensor, counts: Tensor, distance: Tensor, weighting: str
                ) -> tuple[Tensor, Tensor, Tensor] | None:
    """(r, log a, weights) of the usable points (r >= 1, counts > 0, finite a > 0), or None with fewer than 3."""
    if weighting not in ("octave", "uniform"):
        raise ConfigError(f"weighting must be 'octave' or 'uniform', got {weighting!r}")
    a, r = values.double(), distance.double()
    ok = (r >= 1) & (counts > 0) & (a > 0) & torch.isfinite(a)
    if int(ok.sum()) < 3:
        return None
    r, y = r[ok], torch.log(a[ok])
    if weighting == "uniform":
        return r, y, torch.ones_like(r)
    _, inverse, sizes = torch.unique(torch.floor(torch.log2(r)), return_inverse=True, return_counts=True)
    return r, y, 1.0 / sizes[inverse].double()


def _weighted_line(x: Tensor, y: Tensor, w: Tensor) -> tuple[float, float]:
    """Weighted least-squares slope of y on x and the weighted R²."""
    w = w / w.sum()
    mx, my = (w * x).sum(), (w * y).sum()
    sxx = (w * (x - mx) ** 2).sum()
    if sxx <= 0:
        return float("nan"), float("nan")
    slope = (w * (x - mx) * (y - my)).sum() / sxx
    residual = y - (my + slope * (x - mx))
    syy = (w * (y - my) ** 2).sum()
    r2 = 1.0 - float((w * residual**2).sum() / syy) if syy > 0 else 1.0
    return float(slope), r2 if math.isfinite(r2) else float("nan")


def mass_off_sink(probs: Tensor, sink_columns: list[int | None], *, dtype: torch.dtype = torch.float64) -> Tensor:
    """Float64 row sums of attention without each sequence's sink column: the mass a row puts elsewhere.

    Summed directly, not as ``1 - probs[sink]``: that difference cancels when the sink holds nearly all the mass
    (float32 leaves ~6e-8 / (1 - sink) relative accuracy; float64 of the row sum minus the sink, ~1e-16 / (1 - sink)).
    Two slices per sequence are summed, so no masked copy of the block is made.

    Args:
        probs: (B, H, n, w) attention rows, any float dtype.
        sink_columns: B entries, the sink's key index in each sequence, or None where the sink is not among the
            w keys (the whole row is then summed).
        dtype: the dtype the sums accumulate in. float64 (default, the oracle's) converts element by element;
            the fused kernel passes the probs' own dtype (float32: relative error ~1e-7 for these positive terms,
            ~80x faster on CPU). The result is float64 either way.

    Returns:
        (B, H, n, 1) float64.

    Raises:
        ShapeError: if ``sink_columns`` does not have B entries.
    """
    B, H, n, w = probs.shape
    if len(sink_columns) != B:
        raise ShapeError(f"sink_columns must have one entry per sequence ({B}), got {len(sink_columns)}")
    rows = []
    for b, column in enumerate(sink_columns):
        if column is None or not 0 <= column < w:
            rows.append(probs[b].sum(dim=-1, keepdim=True, dtype=dtype))
        else:
            rows.append(probs[b, ..., :column].sum(dim=-1, keepdim=True, dtype=dtype)
                        + probs[b, ..., column + 1 :].sum(dim=-1, keepdim=True, dtype=dtype))
    return torch.stack(rows).double()


def sums_by_distance_scatter(values: Tensor, distance: Tensor, length: int) -> Tensor:
    """Reference form: sum (N, bq, Lk) values into (N, length) by the (bq, Lk) distance of each entry."""
    N = values.shape[0]
    flat = values.reshape(N, -1)
    index = distance.reshape(1, -1).expand(N, -1)
    return torch.zeros(N, length, dtype=values.dtype, device=values.device).scatter_add_(1, index, flat)


class DiagonalSums:
    """Sums of attention-shaped blocks along their diagonals, i.e. by query–key distance, without a scatter.

    Query row i of a block sits at key index ``q_start + i`` (rows must be contiguous); distance is ``q - k``
    (causal: entries with k > q must be zero and are dropped) or ``|q - k|`` (bidirectional). Write a block into
    ``middle`` (shape (N, bq, width)); calling the object returns its sums by distance. The block lives inside a
    zero-padded buffer (bq zeros on each side of every row) that a strided view reads with row stride + 1, so
    each diagonal becomes a column: no scatter, no copy. Equals :func:`sums_by_distance_scatter` (tested).

    Args:
        n: rows of the flattened leading dims (e.g. batch · heads). bq: query rows of the block.
        width: keys of the block. q_start: key index of the block's first query row.
        length: size of the output's distance axis (> every distance). causal: see above.
        storage: optional float tensor of at least ``n * bq * (width + 2 * bq)`` elements to reuse across blocks
            (its contents are overwritten); a new zeroed buffer is allocated otherwise.
    """

    def __init__(self, n: int, bq: int, width: int, q_start: int, length: int, *, causal: bool,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                 storage: Tensor | None = None) -> None:
        self.n, self.bq, self.width, self.length = n, bq, width, length
        row = width + 2 * bq
        if storage is not None and storage.numel() >= n * bq * row:  # reuse: only the pads need zeroing
            self.buffer = storage.view(-1)[: n * bq * row].view(n, bq, row)
            self.buffer[:, :, :bq].zero_()
            self.buffer[:, :, bq + width :].zero_()
        else:
            self.buffer = torch.zeros(n, bq, row, dtype=dtype, device=device)
        self.middle = self.buffer[:, :, bq : bq + width]  # (n, bq, width)
        self._diagonals = self.buffer.as_strided((n, bq, width + bq), (bq * row, row + 1, 1))
        distance = q_start + bq - torch.arange(width + bq, device=device)  # column t holds distance q_start+bq-t
        ahead = (distance >= 0) & (distance < length)
        self._ahead_columns, self._ahead = ahead.nonzero().squeeze(1), distance[ahead]
        behind = (distance < 0) & (-distance < length) if not causal else torch.zeros_like(ahead)
        self._behind_columns, self._behind = behind.nonzero().squeeze(1), -distance[behind]

    def __call__(self) -> Tensor:
        """(n, length) sums by distance of what ``middle`` holds now."""
        columns = self._diagonals.sum(dim=1)  # (n, width + bq)
        out = torch.zeros(self.n, self.length, dtype=columns.dtype, device=columns.device)
        out.index_add_(1, self._ahead, columns[:, self._ahead_columns])
        if self._behind.numel():
            out.index_add_(1, self._behind, columns[:, self._behind_columns])
        return out


def sums_by_distance(values: Tensor, q_start: int, length: int, *, causal: bool) -> Tensor:
    """Sum (N, bq, Lk) values by distance along diagonals (see :class:`DiagonalSums`); returns (N, length)."""
    N, bq, Lk = values.shape
    sums = DiagonalSums(N, bq, Lk, q_start, length, causal=causal, device=values.device, dtype=values.dtype)
    sums.middle.copy_(values)
    return sums()
