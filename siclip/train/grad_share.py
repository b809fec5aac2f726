"""How hard each loss term pulls on the student: the gradient norm of every weighted term, and its share.

The loss weights (FD 4000, CRD 1, ICL 1, PM 0.1, ...) say little by themselves about which term drives
training, because the terms' gradients differ by orders of magnitude. Every ``train.grad_share_every``
steps rank 0 runs one extra forward of its local batch (``keep_terms=True`` returns each weighted term
with its graph) and one backward per term, and logs ``grad/<term>`` (L2 norm of that term's gradient over
the chosen parameters) and ``grad_share/<term>`` (that norm over the sum of all terms' norms) to
TensorBoard. It touches no ``.grad``, and restores buffers (BatchNorm statistics) and the RNG afterwards,
so a run with it on follows the same trajectory as one with it off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["GradShare", "format_shares", "term_gradient_norms"]

TERM_PREFIX = "term/"


@dataclass
class GradShare:
    """What the loop needs: how often, which (unwrapped) module to run, and whose gradients to measure."""

    every: int
    model: nn.Module
    params: list[nn.Parameter]

    def due(self, next_step: int) -> bool:
        return self.every > 0 and next_step % self.every == 0


@contextlib.contextmanager
def side_effects_undone(model: nn.Module) -> Iterator[None]:
    """Restore ``model``'s buffers (BatchNorm statistics) and the CPU/CUDA RNG after the block."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def format_shares(shares: dict[str, float], *, unit: str = "") -> str:
    """``fd 92, clip 3.6, pm 0.0047``: shares (fractions) as percentages, largest first, two significant
    digits without exponents."""

    def pct(x: float) -> str:
        if x == 0:
            return "0"
        return f"{x:.0f}" if x >= 10 else f"{x:.2g}" if x >= 1e-3 else "<0.001"

    ranked = sorted(shares.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{name} {pct(100 * v)}{unit}" for name, v in ranked)


def _norm(grads: tuple[Tensor | None, ...]) -> float:
    parts = [torch.linalg.vector_norm(g.float()) for g in grads if g is not None]
    return float(torch.linalg.vector_norm(torch.stack(parts)).item()) if parts else 0.0


def term_gradient_norms(
    model: nn.Module,
    batch: dict[str, Tensor],
    params: list[nn.Parameter],
    *,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, float]:
    """``grad/<term>`` and ``grad_share/<term>`` for every ``term/<name>`` output of ``model(batch,
    keep_terms=True)``, over ``params``. A term with no path to ``params`` has norm 0."""
    if not params:
        raise ValueError("no parameters to measure gradients over")
    with side_effects_undone(model):
        with autocast():
            out = model(batch, keep_terms=True)
        terms = {k[len(TERM_PREFIX) :]: v for k, v in out.items() if k.startswith(TERM_PREFIX)}
        if not terms:
            raise ValueError("the model returned no 'term/<name>' outputs for keep_terms=True")
        norms: dict[str, float] = {}
        for name in terms:
            value = terms[name].float()
            if not value.requires_grad:
                norms[name] = 0.0
                continue
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            norms[name] = _norm(grads)
    total = sum(norms.values())
    metrics = {f"grad/{name}": v for name, v in norms.items()}
    metrics.update({f"grad_share/{name}": (v / total if total > 0 else 0.0) for name, v in norms.items()})
    return metrics
