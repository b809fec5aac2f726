"""Evaluation sharded across the training ranks: each rank encodes a slice, the results are combined.

During training every rank evaluates its share of the images and captions (``1/N`` of the encoder work)
and the counts or embeddings are combined with collectives, so no rank waits idle in a collective while
rank 0 evaluates alone (a long ImageNet eval used to risk the collective timeout). The metrics equal the
single-process ones: accuracy is a sum of per-image hits, and retrieval ranks every image and caption
against the gathered whole set. Pure torch.distributed (no Ray); ``Shard()`` is the single-process case.

(The alternative, a separate Ray task evaluating each checkpoint, would keep the step loop running but
needs its own GPU beside the training workers, and Tune would get the metric only steps later.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Shard"]


@dataclass(frozen=True)
class Shard:
    """This process's part of an evaluation: rank ``rank`` of ``world_size`` (collectives when > 1)."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"shard rank {self.rank} outside world size {self.world_size}")

    @property
    def distributed(self) -> bool:
        """Whether combining needs collectives (checked: the process group must exist)."""
        if self.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"world_size={self.world_size} but torch.distributed is not initialised")
        return self.world_size > 1

    def span(self, n: int) -> range:
        """This rank's contiguous slice of ``n`` items (the first ``n % world_size`` ranks get one more)."""
        per, extra = divmod(n, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (self.rank < extra))

    def owns(self, i: int) -> bool:
        """Whether item ``i`` of a stream of unknown length is this rank's (round robin)."""
        return i % self.world_size == self.rank

    def sum(self, values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
        """Element-wise sum of ``values`` over ranks (one all-reduce)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()

    def gather_rows(self, x: Tensor) -> Tensor:
        """Every rank's rows of ``x`` (``[n]`` or ``[n, d]``) concatenated in rank order; ranks may hold
        different ``n`` (a rank with no rows may pass ``[0, 0]`` for a 2-D tensor), dtypes must agree."""
        if not self.distributed:
            return x
        rows = x if x.dim() == 2 else x[:, None]
        shape = torch.tensor(list(rows.shape), device=x.device)
        shapes = [torch.empty_like(shape) for _ in range(self.world_size)]
        dist.all_gather(shapes, shape)
        sizes = [int(s[0]) for s in shapes]
        width = max(int(s[1]) for s in shapes)
        padded = torch.zeros(max(sizes), width, dtype=x.dtype, device=x.device)
        if rows.numel():
            padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        out = torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])
        return out if x.dim() == 2 else out[:, 0]
