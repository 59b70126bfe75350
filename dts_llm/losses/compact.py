"""The compact teacher: the top-k logits plus an exact normaliser at every temperature of a range.

The teacher's distribution at T is softmax(z / T) over the whole vocabulary. For its top-k ids K,
log p_i(T) = z_i / T - log Z(T) with log Z(T) = logaddexp(logsumexp_K(z_i / T), log Z_tail(1 / T)),
where log Z_tail(beta) = logsumexp over the other tokens of beta z_j. That one function of beta is
smooth and convex (its derivative is the tail's mean logit under the tail's own softmax, its second
the variance), so its values and slopes at a few inverse temperatures give it anywhere in between
by cubic Hermite interpolation: the top-k probabilities stay exact and the rest of the vocabulary
becomes one bucket of exact mass, for any T in the grid's range, from k + O(grid) numbers a token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .chunks import default_chunk_size

MAX_EXACT_ID = 1 << 24  # float32 holds every integer up to 2^24 exactly


def inverse_temperature_grid(t_min: float, t_max: float, size: int = 8) -> Tensor:
    """``size`` inverse temperatures 1 / T, ascending, from 1 / t_max to 1 / t_min, evenly spaced in 1 / T.

    Measured, not assumed: with 8 points over T in [1, 10] on GPT-2-vocabulary logits, the worst
    Hermite error of log Z_tail was 9.9e-5 even in 1/T, 3.7e-4 Chebyshev in 1/T, 6.0e-4 even in
    log(1/T) and 8.0e-3 even in T (``benchmarks/topk_accuracy.py --grid-study``): the spacings that
    crowd the high temperatures leave the widest intervals where T is low, and lose there.
    """
    if not 0 < t_min < t_max:
        raise ValueError(f"the temperature range needs 0 < t_min < t_max, got [{t_min}, {t_max}]")
    if size < 2:
        raise ValueError(f"an interpolation grid needs at least 2 points, got {size}")
    return torch.linspace(1.0 / t_max, 1.0 / t_min, size, dtype=torch.float64)


@dataclass(frozen=True)
class CompactLayout:
    """Where each field sits in a packed row of ``width`` float32 values:
    ``[top-k logits (descending) | their ids | log Z_tail at each beta | its slope at each beta]``."""

    k: int
    grid_size: int

    @classmethod
    def of(cls, packed_rows: Tensor, grid_size: int) -> CompactLayout:
        """The layout of rows packed for ``grid_size`` inverse temperatures (k follows from the width)."""
        return cls((packed_rows.size(-1) - 2 * grid_size) // 2, grid_size)

    @property
    def width(self) -> int:
        return 2 * (self.k + self.grid_size)

    @property
    def logits(self) -> slice:
        return slice(0, self.k)

    @property
    def ids(self) -> slice:
        return slice(self.k, 2 * self.k)

    @property
    def tail(self) -> slice:
        return slice(2 * self.k, 2 * self.k + self.grid_size)

    @property
    def slope(self) -> slice:
        return slice(2 * self.k + self.grid_size, self.width)

    def token_ids(self, packed_rows: Tensor) -> Tensor:
        """The top-k ids as indices (int64)."""
        return packed_rows[:, self.ids].long()


@torch.no_grad()
def compact_teacher_rows(logits_rows: Tensor, k: int, betas: Tensor, chunk_size: int | None = None) -> Tensor:
    """``[N, V]`` teacher logits packed into ``[N, CompactLayout(k, len(betas)).width]`` float32 rows.

    The tail's log-partition and slope are computed in float64 (a sum over ~50k terms whose result
    an interpolation then has to resolve to ~1e-5), ``chunk_size`` rows at a time, so memory stays
    O(chunk_size x V) whatever N.
    """
    num_rows, vocab_size = logits_rows.shape
    if not 0 < k <= vocab_size:
        raise ValueError(f"k must be in [1, {vocab_size}] (the vocabulary), got {k}")
    if vocab_size > MAX_EXACT_ID:
        raise ValueError(f"token ids are stored as float32, exact only below 2^24; the vocabulary is {vocab_size}")
    layout = CompactLayout(k, len(betas))
    packed = logits_rows.new_empty((num_rows, layout.width), dtype=torch.float32)
    betas = betas.tolist()
    chunk_size = chunk_size or default_chunk_size(num_rows, vocab_size)
    for start in range(0, num_rows, chunk_size):
        logits = logits_rows[start : start + chunk_size].double()
        top, ids = logits.topk(k, -1)
        rows = packed[start : start + chunk_size]
        rows[:, layout.logits], rows[:, layout.ids] = top, ids
        rows[:, layout.tail], rows[:, layout.slope] = _tail_log_partition_and_slope(
            logits.scatter_(1, ids, -math.inf), betas
        )
    return packed


def _tail_log_partition_and_slope(tail: Tensor, betas: list[float]) -> tuple[Tensor, Tensor]:
    """log Z_tail(beta) and its derivative, the tail's mean logit under softmax(beta z_tail), per row and beta,
    for float64 logits whose top-k entries are -inf. A row with no finite tail gets -inf and slope 0."""
    finite = tail.nan_to_num(neginf=0.0)  # a -inf logit has weight 0 in the mean
    values, slopes = [], []
    for beta in betas:
        scaled = tail * beta
        log_partition = scaled.logsumexp(-1, keepdim=True)
        mean_logit = scaled.sub_(log_partition).exp_().mul_(finite).sum(-1, keepdim=True)
        values.append(log_partition)
        slopes.append(mean_logit.where(log_partition.isfinite(), 0.0))
    return torch.cat(values, 1), torch.cat(slopes, 1)


def tail_log_partition(packed_rows: Tensor, betas: Tensor, beta: Tensor | float) -> Tensor:
    """log Z_tail at ``beta`` per row (float64, shape ``[rows]``), by cubic Hermite interpolation
    between the grid points around it; ``beta`` is a float or one value per row (``[rows, 1]``).

    Outside the grid the end cubic extrapolates: callers keep beta in range.
    """
    layout = CompactLayout.of(packed_rows, len(betas))
    grid = betas.to(packed_rows.device, torch.float64)
    beta = torch.as_tensor(beta, dtype=torch.float64, device=grid.device).reshape(-1, 1)
    beta = beta.expand(packed_rows.size(0), 1).contiguous()
    left = torch.searchsorted(grid, beta).clamp_(1, len(grid) - 1).sub_(1)
    right = left + 1
    values, slopes = packed_rows[:, layout.tail].double(), packed_rows[:, layout.slope].double()
    width = grid[right] - grid[left]
    t = (beta - grid[left]) / width
    t2, t3 = t * t, t * t * t
    value_left = values.gather(1, left)
    interpolated = (
        (2 * t3 - 3 * t2 + 1) * value_left
        + (t3 - 2 * t2 + t) * width * slopes.gather(1, left)
        + (3 * t2 - 2 * t3) * values.gather(1, right)
        + (t3 - t2) * width * slopes.gather(1, right)
    )
    return interpolated.where(value_left > -math.inf, -math.inf).squeeze(1)


def teacher_bucket_log_probs(packed_rows: Tensor, betas: Tensor, temperature: Tensor | float) -> Tensor:
    """The teacher's log-probabilities at ``temperature`` (a float or a ``[rows, 1]`` column) over the
    k + 1 buckets, ``[rows, k + 1]`` float32: its top-k tokens (exact), then the rest of the vocabulary."""
    layout = CompactLayout.of(packed_rows, len(betas))
    scaled = packed_rows[:, layout.logits] / temperature
    log_tail = tail_log_partition(packed_rows, betas, 1.0 / temperature).float()[:, None]
    log_partition = torch.logaddexp(scaled.logsumexp(-1, keepdim=True), log_tail)
    return torch.cat([scaled, log_tail], 1).sub_(log_partition)
