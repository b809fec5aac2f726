"""``siclip bench memory``: training memory with weight inheritance (frozen backbone) vs full fine-tuning,
and the WIKD + PM loss's memory per rank in its global vs local form (``loss.local``) at a large batch.

Same model, same batch, same loss, side by side in one process. On a GPU the number is
``torch.cuda.max_memory_allocated``. On a CPU there is no allocator high-water mark, so the peak is
accounted from what a training step must hold at once: parameters + gradients + AdamW state + the tensors
autograd saves for backward (counted once per storage through ``saved_tensors_hooks``).

The loss rows simulate one rank of an N-rank run in this process: the gather returns this rank's live
embeddings between N-1 constant slices (what ``all_gather`` hands a rank), so the loss builds exactly the
tensors one rank builds; no process group is needed.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from siclip.config import LossCfg, ModelCfg, SaspCfg
from siclip.eval.markdown_tables import save_table

__all__ = ["format_table", "measure_loss_memory", "measure_step_memory", "run_bench_memory"]

MB = 1024 * 1024


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@contextlib.contextmanager
def _saved_storages() -> Iterator[dict[int, int]]:
    """Bytes of every storage autograd saves for backward inside the block, one count per storage."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(RuntimeError, NotImplementedError):  # tensors without storage (sparse)
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


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
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    param_ptrs = {p.untyped_storage().data_ptr() for p in student.parameters()}
    with _saved_storages() as seen:
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


@contextlib.contextmanager
def _one_rank_of(world_size: int, rank: int) -> Iterator[None]:
    """Run the loss as rank ``rank`` of ``world_size`` in this process: the gather puts the live local slice
    among constant random unit rows (the other ranks' embeddings), and PM's broadcast keeps the local draw."""
    import siclip.losses.pm as pm_mod
    import siclip.losses.total as total_mod

    def gather(x: torch.Tensor, *, rank: int, world_size: int, with_grad: bool = False) -> torch.Tensor:
        others = [
            torch.nn.functional.normalize(torch.randn_like(x.detach()), dim=-1) for _ in range(world_size)
        ]
        return torch.cat([x if r == rank else others[r] for r in range(world_size)])

    saved = total_mod.gather_features, pm_mod.broadcast_from_rank0
    total_mod.gather_features = gather  # type: ignore[assignment]
    pm_mod.broadcast_from_rank0 = lambda x, *, world_size: x
    try:
        yield
    finally:
        total_mod.gather_features, pm_mod.broadcast_from_rank0 = saved


def measure_loss_memory(
    *,
    global_batch: int,
    world_size: int,
    local: bool,
    dim: int = 32,
    teacher_dim: int = 64,
    rank: int = 0,
    device: torch.device,
    track_rss: bool = False,
) -> dict[str, float]:
    """One rank's memory for the full WIKD + PM loss (default weights, real + teacher embeddings) forward and
    backward: tensors saved for backward (bytes, one count per storage), on CUDA the allocator's peak, and
    with ``track_rss`` (CPU, Linux) the peak rise of the resident memory, temporaries included."""
    from siclip.losses.total import build_loss

    torch.manual_seed(0)
    n = global_batch // world_size
    loss_fn = build_loss(LossCfg(local=local), student_dim=dim, teacher_dim=teacher_dim).to(device)

    def unit(d: int, grad: bool) -> torch.Tensor:
        x = torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=-1)
        return x.requires_grad_(grad)

    s_img, s_txt, t_img, t_txt = (
        unit(dim, True),
        unit(dim, True),
        unit(teacher_dim, False),
        unit(teacher_dim, False),
    )
    logit_scale = torch.tensor(2.659, device=device, requires_grad=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with contextlib.ExitStack() as stack:
        rise = stack.enter_context(_peak_rss_rise()) if track_rss else None
        with _one_rank_of(world_size, rank), _saved_storages() as seen:
            out = loss_fn(s_img, s_txt, logit_scale, t_img, t_txt, rank=rank, world_size=world_size)
        out["loss"].backward()
        del out
    row = {
        "local_batch": float(n),
        "matrix_mb": (n if local else global_batch) * global_batch * 4 / MB,
        "saved_for_backward_mb": sum(seen.values()) / MB,
    }
    if rise is not None:
        row["peak_rss_rise_mb"] = rise[0]
    if device.type == "cuda":
        row["cuda_peak_mb"] = (torch.cuda.max_memory_allocated(device) - before) / MB
    return row


def run_bench_memory(
    *,
    model: str = "siclip-s0",
    base: str = "mobileclip-s0",
    batch: int = 8,
    loss_global_batch: int = 8192,
    loss_world_size: int = 8,
    out: str | None = "benchmarks/memory.md",
) -> tuple[dict[str, Any], str]:
    """Weight inheritance (frozen, only SAS-P + logit scale train) vs full fine-tuning of the same model; then
    the loss's global vs local form for one of ``loss_world_size`` ranks at global batch ``loss_global_batch``."""
    from siclip.models.build import build_student
    from siclip.models.inherit import set_train_mode
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
    if loss_global_batch:
        result["loss"] = _loss_rows(global_batch=loss_global_batch, world_size=loss_world_size, device=device)
    table = format_table(result)
    save_table(table, out)
    return result, table


@contextlib.contextmanager
def _peak_rss_rise() -> Iterator[list[float]]:
    """Rise of the resident memory over the block (MiB, in ``[0]`` afterwards): a thread samples
    ``/proc/self/statm`` every millisecond, so temporaries (softmax, sampling probabilities) count too."""
    import os
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base = rss()
    peak = [base]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            stop.wait(0.001)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    result = [0.0]
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result[0] = (max(peak[0], rss()) - base) / MB


def _loss_row_in_fresh_process(kw: dict[str, Any]) -> dict[str, float]:
    return measure_loss_memory(**kw, device=torch.device("cpu"), track_rss=True)


def _loss_rows(*, global_batch: int, world_size: int, device: torch.device) -> dict[str, Any]:
    import multiprocessing

    rows = {}
    for label, local in (("global (loss.local: false)", False), ("local (loss.local: true)", True)):
        kw: dict[str, Any] = {"global_batch": global_batch, "world_size": world_size, "local": local}
        if device.type == "cuda":
            rows[label] = measure_loss_memory(**kw, device=device)
        else:  # a fresh process each: memory the allocator kept from an earlier run would hide the rise
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                rows[label] = pool.apply(_loss_row_in_fresh_process, (kw,))
        gc.collect()
    glob, loc = rows.values()
    key = next(k for k in ("cuda_peak_mb", "peak_rss_rise_mb", "saved_for_backward_mb") if k in loc)
    return {
        "global_batch": global_batch,
        "world_size": world_size,
        "rows": rows,
        "ratio_global_over_local": glob[key] / loc[key],
        "ratio_key": key,
    }


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
    if "loss" in result:
        lines += ["", *format_loss_table(result["loss"], str(result["device"]))]
    return "\n".join(lines)


def format_loss_table(loss: dict[str, Any], device: str) -> list[str]:
    """The global-vs-local loss rows as Markdown lines."""
    cols = ["local_batch", "matrix_mb", "saved_for_backward_mb", "peak_rss_rise_mb", "cuda_peak_mb"]
    cols = [c for c in cols if all(c in row for row in loss["rows"].values())]
    lines = [
        f"## WIKD + PM loss per rank: global batch {loss['global_batch']}, {loss['world_size']} ranks, {device}",
        "",
        "CLIP + FD + CRD + ICL + PM (default weights), student dim 32, teacher dim 64, forward + backward, one "
        "rank simulated in one process (its live rows among constant rows from the other ranks). matrix_mb: "
        "one similarity matrix (B_local x B_global local, B_global x B_global global), fp32. peak_rss_rise_mb "
        "(CPU): peak rise of the resident memory during forward + backward (sampled every ms), temporaries included.",
        "",
        "| loss form | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for label, row in loss["rows"].items():
        lines.append(
            f"| {label} | "
            + " | ".join(f"{row[c]:.0f}" if c == "local_batch" else f"{row[c]:.1f}" for c in cols)
            + " |"
        )
    lines += ["", f"global / local ({loss['ratio_key']}): x{loss['ratio_global_over_local']:.2f}"]
    return lines
