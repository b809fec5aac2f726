"""``siclip bench memory``: training memory with weight inheritance (frozen backbone) vs full fine-tuning.

Same model, same batch, same loss, side by side in one process. On a GPU the number is
``torch.cuda.max_memory_allocated``. On a CPU there is no allocator high-water mark, so the peak is
accounted from what a training step must hold at once: parameters + gradients + AdamW state + the tensors
autograd saves for backward (counted once per storage through ``saved_tensors_hooks``).
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any

import torch
from torch import nn

from siclip.config import LossCfg, ModelCfg, SaspCfg
from siclip.eval.tables import save_table

__all__ = ["format_table", "measure_step_memory", "run_bench_memory"]

MB = 1024 * 1024


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_step_memory(
    student: Any, *, batch: int, image_size: int, context_length: int, device: torch.device
) -> dict[str, float]:
    """Memory of one CLIP-loss training step of ``student`` (bytes), and its trainable parameter count."""
    from siclip.losses.total import build_loss

    loss_fn = build_loss(
        LossCfg(fd_weight=0, crd_weight=0, icl_weight=0, pm_weight=0), student_dim=1, teacher_dim=None
    )
    student.to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    tokens = torch.randint(1, 1000, (batch, context_length), device=device)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(RuntimeError, NotImplementedError):  # tensors without storage (sparse)
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    param_ptrs = {p.untyped_storage().data_ptr() for p in student.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        img = student.encode_image(images, normalize=True)
        txt = student.encode_text(tokens, normalize=True)
        loss = loss_fn(img, txt, student.logit_scale)["loss"]
    loss.backward()
    opt.step()
    activations = sum(n for ptr, n in seen.items() if ptr not in param_ptrs)
    grads = _bytes(p.grad for p in params if p.grad is not None)
    opt_state = _bytes(
        v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0
    )
    weights = _bytes(student.parameters())
    out = {
        "trainable_params": float(sum(p.numel() for p in params)),
        "weights_mb": weights / MB,
        "grads_mb": grads / MB,
        "optimizer_mb": opt_state / MB,
        "activations_mb": activations / MB,
        "peak_mb": (weights + grads + opt_state + activations) / MB,
    }
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / MB
    out["peak_mb_per_sample"] = out.get("cuda_peak_mb", out["peak_mb"]) / batch
    return out


def run_bench_memory(
    *,
    model: str = "siclip-s0",
    base: str = "mobileclip-s0",
    batch: int = 8,
    out: str | None = "benchmarks/memory.md",
) -> tuple[dict[str, Any], str]:
    """Weight inheritance (frozen, only SAS-P + logit scale train) vs full fine-tuning of the same model."""
    from siclip.models.inherit import build_student, set_train_mode
    from siclip.models.presets import preset_info

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = preset_info(model)
    rows: dict[str, Any] = {}
    for label, freeze in (("weight inheritance (frozen backbone)", True), ("full fine-tuning", False)):
        torch.manual_seed(0)
        # no source weights here: freezing acts the same on random weights; only the memory is measured
        student, _ = build_student(
            ModelCfg(name=model, source="", inherit=freeze, freeze_inherited=freeze, sasp=SaspCfg())
        )
        if freeze:
            _freeze_unchanged(student)
        set_train_mode(student, True)
        rows[label] = measure_step_memory(
            student,
            batch=batch,
            image_size=info.image_size,
            context_length=info.context_length,
            device=device,
        )
        del student
        gc.collect()
    wi, full = rows.values()
    result = {
        "model": model,
        "base": base,
        "batch": batch,
        "device": str(device),
        "rows": rows,
        "peak_ratio_full_over_wi": full["peak_mb"] / wi["peak_mb"],
        "trainable_ratio_full_over_wi": full["trainable_params"] / wi["trainable_params"],
    }
    table = format_table(result)
    save_table(table, out)
    return result, table


def _freeze_unchanged(student: nn.Module) -> None:
    """Freeze as inheritance would, without a source file: everything but SAS-P blocks and the logit scale."""
    from siclip.models.inherit import freeze_inherited

    freeze_inherited(student)


def format_table(result: dict[str, Any]) -> str:
    cols = [
        "trainable_params",
        "weights_mb",
        "grads_mb",
        "optimizer_mb",
        "activations_mb",
        "peak_mb",
        "peak_mb_per_sample",
    ]
    lines = [
        f"# Training memory: {result['model']}, batch {result['batch']}, {result['device']}",
        "",
        "Produced by `siclip bench memory`. On CPU, peak = weights + gradients + AdamW state + tensors saved for "
        "backward (accounted, one count per storage); on CUDA also `max_memory_allocated`.",
        "",
        "| setting | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for label, row in result["rows"].items():
        cells = [f"{row[c] / 1e6:.2f} M" if c == "trainable_params" else f"{row[c]:.1f}" for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"full fine-tuning / weight inheritance: peak memory x{result['peak_ratio_full_over_wi']:.2f}, "
        f"trainable parameters x{result['trainable_ratio_full_over_wi']:.1f}",
    ]
    return "\n".join(lines)
