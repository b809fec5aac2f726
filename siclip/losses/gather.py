"""Cross-worker collectives the losses need: gathering embeddings into the global batch, syncing samples,
and the local-loss view (``loss.local``: each rank's rows of the global matrices, not all of them).

Pure torch.distributed (no Ray): the same code runs under Ray Train's DDP, torchrun, or a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def gather_features(x: Tensor, *, rank: int, world_size: int, with_grad: bool = False) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0 (rank order); identity when ``world_size == 1``.

    By default (open_clip's ``gather_with_grad=False``) the local slice keeps its autograd graph and the other
    ranks' slices are constants, so each rank's gradient w.r.t. its own ``x`` equals the single-process
    gradient of the same loss w.r.t. that slice. ``with_grad=True`` instead sums the gradient over ranks in
    backward (``torch.distributed.nn``), which makes DDP's gradient *average* equal the single-process
    gradient of a loss every rank computes on the global batch.
    """
    if world_size == 1:
        return x
    if not _distributed(world_size):
        raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ValueError(
            f"rank/world_size ({rank}/{world_size}) disagree with the process group "
            f"({dist.get_rank()}/{dist.get_world_size()})"
        )
    if with_grad:
        import torch.distributed.nn.functional as dist_fn

        return torch.cat(dist_fn.all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x  # all_gather's output is a constant; put the live local tensor back
    return torch.cat(parts, dim=0)


def broadcast_from_rank0(x: Tensor, *, world_size: int) -> Tensor:
    """Rank 0's ``x`` on every rank (in place and returned); a no-op on one worker.

    Used for random draws on the global batch (PM negatives): ranks may seed their RNGs differently, but
    they must all compute the same loss.
    """
    if world_size == 1:
        return x
    if not _distributed(world_size):
        raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised")
    x = x.contiguous()
    dist.broadcast(x, src=0)
    return x


def local_rows(rank: int, local_batch: int) -> slice:
    """The rows of the global batch that ``rank`` holds (ranks hold equal, consecutive slices).

    With ``loss.local`` each contrastive term computes only these rows of its global similarity matrices, in
    both directions (this rank's images against every text, this rank's texts against every image): memory
    ``B_local x B_global`` per rank instead of ``B_global x B_global``; labels are the global indices.
    """
    return slice(rank * local_batch, (rank + 1) * local_batch)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None  # type: ignore[attr-defined]


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """``x`` unchanged in the forward pass; its gradient multiplied by ``factor`` in the backward pass."""
    return x if factor == 1.0 else _ScaleGrad.apply(x, factor)
