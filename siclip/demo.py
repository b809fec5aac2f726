"""``siclip demo``: the whole method end to end on the embedded demo world, on a 2-core CPU.

Stages, each the same function a real run uses: generate the demo world; train a tiny CoCa on the clean
captions and caption the noisy web set with Ray Data (CC12M -> CC12M-SYN); train the tiny teacher CLIP
with Ray Train; evaluate it with ``siclip eval``; train the SiCLIP student (SAS-P blocks, inherited and
frozen backbone, WIKD + PM, synthetic captions); evaluate it; print teacher vs student. Every stage is
resumable: a rerun skips finished data and finished runs.

The data regime mirrors the paper's: the teacher (MobileCLIP-S0's role, trained on DataCompDR-1B) sees more
and cleaner data for longer (the clean split's complete captions plus the whole web set with its
synthetic captions), the student sees only a small subset of the web set with its synthetic captions
(CC12M-SYN's role): ``DEMO_SIZES[...]["student_web_shards"]`` of the web shards.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from siclip.config import (
    TRAIN_SECTIONS,
    ConfigError,
    SiclipCfg,
    apply_overrides,
    check_paths,
    from_dict,
    resolve_switches,
)
from siclip.train.grad_share import format_shares

__all__ = ["DEMO_SIZES", "DemoPrep", "demo_config", "prepare_demo", "run_demo"]

_PACKAGED = Path(__file__).resolve().parent / "configs"
CONFIGS = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[1] / "configs"
"""The shipped configs: ``siclip/configs/`` in an installed wheel (setup.py copies them in), else a
checkout's top-level ``configs/``."""
DEFAULT_ROOT = "runs/demo"

DEMO_SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "world": {
            "n_web": 6000,
            "n_clean": 1000,
            "n_retrieval": 500,
            "n_zeroshot_per_class": 10,
            "samples_per_shard": 1000,
        },
        "captioner_steps": 800,
        # teacher: clean 1,000 + web 6,000 = 7,000 images, 500 x 128 samples (about 9 passes)
        "teacher_steps": 500,
        # student: the first 2 web shards = 2,000 images (the teacher's data is 3.5 times larger)
        "student_web_shards": 2,
        "student_steps": 200,
        "student_grad_share_every": 40,
    },
    "quick": {
        "world": {
            "n_web": 1200,
            "n_clean": 300,
            "n_retrieval": 150,
            "n_zeroshot_per_class": 4,
            "samples_per_shard": 300,
        },
        "captioner_steps": 60,
        "teacher_steps": 60,
        "student_web_shards": 1,
        "student_steps": 30,
        "student_grad_share_every": 10,
    },
}


STUDENT_ONLY = ("model.", "loss.", "teacher.", "profile=")
"""Override prefixes that describe the student's experiment; the teacher stage keeps its own settings."""


def teacher_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The demo's overrides that also apply to the teacher stage (train, data, optim, ray, eval, ...)."""
    return [o for o in overrides if not o.strip().startswith(STUDENT_ONLY)]


def _rebase(value: Any, root: str) -> Any:
    """Point the configs' ``runs/demo/...`` paths at another demo folder."""
    if isinstance(value, str):
        return value.replace(DEFAULT_ROOT, root, 1) if value.startswith(DEFAULT_ROOT) else value
    if isinstance(value, list):
        return [_rebase(v, root) for v in value]
    if isinstance(value, dict):
        return {k: _rebase(v, root) for k, v in value.items()}
    return value


def demo_config(
    name: str, *, root: str = DEFAULT_ROOT, overrides: list[str] | tuple[str, ...] = ()
) -> SiclipCfg:
    """``configs/<name>.yaml`` (or the YAML file ``name``) with its ``runs/demo`` paths moved under ``root``
    and the overrides applied (paths not checked)."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"--config: got {str(path)!r}; no such file")
    data = yaml.safe_load(path.read_text())
    return from_dict(apply_overrides(_rebase(data, root), list(overrides)))


def _eval(cfg_file: Path, checkpoint: Path) -> dict[str, float]:
    """What ``siclip eval`` does and prints, in-process (the same function, not the command: no import cycle)."""
    from siclip.config import load_config
    from siclip.eval.suite import evaluate_checkpoint

    result = evaluate_checkpoint(load_config(cfg_file, check_files=("eval", "model")), checkpoint)
    print(
        f"$ siclip eval --config {cfg_file} --checkpoint {checkpoint}\n{json.dumps(result, sort_keys=True)}"
    )
    return {k: v for k, v in result.items() if isinstance(v, float)}


def _checked(cfg: SiclipCfg) -> SiclipCfg:
    check_paths(cfg, sections=TRAIN_SECTIONS)
    return cfg


def _stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


@dataclass(frozen=True)
class DemoPrep:
    """What the student stage needs: the world, both stage configs, the teacher's run folder, caption quality."""

    world: Any
    teacher_cfg: SiclipCfg
    student_cfg: SiclipCfg
    teacher_dir: Path
    caption_quality: dict[str, Any]


def student_shards(world: Any, syn_dir: str, n_shards: int) -> list[str]:
    """The student's data: the CC12M-SYN shards (in ``syn_dir``) of the first ``n_shards`` web shards."""
    if not 1 <= n_shards < len(world.web_shards):
        raise ConfigError(
            f"student_web_shards: got {n_shards}; allowed: 1 to {len(world.web_shards) - 1} "
            f"(fewer than the world's {len(world.web_shards)} web shards: the teacher must see more)"
        )
    return [str(Path(syn_dir) / Path(p).name) for p in world.web_shards[:n_shards]]


def _drop_stale_captions(cfg: SiclipCfg) -> None:
    """Delete the demo's CC12M-SYN folder when it was captioned from other web shards (the world was made
    again at another size, e.g. ``--quick`` before): it is derived data, and the data build refuses to add
    to a folder built from other inputs."""
    import os
    import shutil

    from siclip.config import expand_shards
    from siclip.data.shards import ManifestError, read_manifest

    out = cfg.caption.output_dir
    try:
        built = read_manifest(out).config.get("build", {}).get("inputs")
    except ManifestError:
        return
    now = [os.path.abspath(u) for u in expand_shards(cfg.caption.input_shards)]
    if isinstance(built, list) and sorted(built) != sorted(now):
        print(f"siclip demo: {out} was captioned from another demo world; captioning again", flush=True)
        shutil.rmtree(out)


def prepare_demo(
    *,
    out_dir: str = DEFAULT_ROOT,
    quick: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
) -> DemoPrep:
    """Stages 1-3 (world, CC12M-SYN captions, teacher); each skipped when already done."""
    from siclip.data.caption_quality import compare_captions
    from siclip.data.captioner import train_captioner
    from siclip.data.demo_world import generate_demo_world
    from siclip.data.pipeline import run_pipeline
    from siclip.train.launch import launch

    sizes = DEMO_SIZES["quick" if quick else "full"]
    root = str(Path(out_dir))
    _stage("1/6 demo world")
    world = generate_demo_world(Path(root) / "world", **sizes["world"])
    print(
        f"web {len(world.web_shards)} shards, clean {len(world.clean_shards)}, zero-shot {world.zeroshot_dir}"
    )
    syn_dir = demo_config("demo", root=root, overrides=overrides).caption.output_dir
    shards = student_shards(world, syn_dir, sizes["student_web_shards"])
    print(
        f"teacher data: clean {len(world.clean_shards)} shards + web {len(world.web_shards)} shards; "
        f"student data: web {len(shards)} shards (with synthetic captions)"
    )
    student_cfg = demo_config(
        "demo",
        root=root,
        overrides=[
            f"data.train_shards=[{','.join(shards)}]",
            f"train.max_steps={sizes['student_steps']}",
            f"train.grad_share_every={sizes['student_grad_share_every']}",
            *overrides,
        ],
    )
    teacher_cfg = demo_config(
        "demo_teacher",
        root=root,
        overrides=[f"train.max_steps={sizes['teacher_steps']}", *teacher_overrides(overrides)],
    )

    _stage("2/6 captioner: tiny CoCa on the clean captions, then CC12M-SYN of the web set (Ray Data)")
    cap = student_cfg.caption
    if not Path(cap.source).is_file():
        train_captioner(
            [*world.clean_shards],
            out_path=cap.source,
            steps=sizes["captioner_steps"],
            image_size=cap.image_size,
            seed=cap.seed,
        )
    _drop_stale_captions(student_cfg)
    run_pipeline(student_cfg)
    syn_shards = sorted(str(p) for p in Path(cap.output_dir).glob("*.tar"))
    quality = compare_captions(world.web_shards, syn_shards)
    print("caption attribute accuracy (web vs synthetic):", json.dumps(quality), flush=True)

    _stage("3/6 teacher: tiny CLIP from scratch on clean + all web data, CLIP loss (Ray Train)")
    teacher_run = launch(_checked(teacher_cfg))
    return DemoPrep(world, teacher_cfg, student_cfg, Path(teacher_run.run_dir), quality)


def run_demo(
    *, out_dir: str = DEFAULT_ROOT, quick: bool = False, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run every stage; returns (and prints) the results table as a dict."""
    from siclip.models.info import param_counts
    from siclip.models.presets import build_preset
    from siclip.train.launch import launch
    from siclip.train.worker import last_grad_shares

    started = time.perf_counter()
    print("siclip demo, student: " + "\n".join(resolve_switches(CONFIGS / "demo.yaml", overrides).lines()))
    prep = prepare_demo(out_dir=out_dir, quick=quick, overrides=overrides)

    _stage("4/6 evaluate the teacher")
    teacher_metrics = _eval(
        prep.teacher_dir / "config.yaml", prep.teacher_dir / "final" / "model.safetensors"
    )

    _stage(
        "5/6 student: SiCLIP (SAS-P, inherited + frozen), WIKD + PM, a small web subset with synthetic "
        "captions (Ray Train)"
    )
    student_run = launch(_checked(prep.student_cfg))

    _stage("6/6 evaluate the student")
    student_metrics = _eval(student_run.run_dir / "config.yaml", student_run.run_dir / "final")

    teacher_params = param_counts(build_preset(prep.teacher_cfg.model.name))
    student_params = param_counts(build_preset(prep.student_cfg.model.name, sasp=prep.student_cfg.model.sasp))
    n_classes = sum(1 for p in Path(prep.world.zeroshot_dir).iterdir() if p.is_dir())
    share_step, shares = last_grad_shares(student_run.run_dir)
    results = {
        "chance_top1": 1.0 / n_classes,
        "captions": prep.caption_quality,
        "teacher": {**teacher_metrics, "image_params": teacher_params["image"]},
        "student": {**student_metrics, "image_params": student_params["image"]},
        "student_grad_share": {"step": share_step, "shares": shares},
        "seconds": round(time.perf_counter() - started, 1),
    }
    table = format_results(results)
    print("\n" + table, flush=True)
    (Path(out_dir) / "results.md").write_text(table + "\n")
    from siclip.report import write_report

    report = write_report([prep.teacher_dir, student_run.run_dir], out=Path(out_dir) / "report")
    print(f"\nreport (plots of both runs): {report}", flush=True)
    return results


def format_results(results: dict[str, Any]) -> str:
    keys = ["zeroshot_top1", "zeroshot_top5", "i2t_r@1", "t2i_r@1", "image_params"]
    lines = [
        "| model | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for name in ("teacher", "student"):
        row = results[name]
        cells = [
            f"{row[k] / 1e6:.3f} M" if k == "image_params" else f"{100 * row.get(k, float('nan')):.1f}"
            for k in keys
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nzero-shot chance: {100 * results['chance_top1']:.1f} %; demo took {results['seconds']} s"
    )
    grad = results.get("student_grad_share") or {}
    if grad.get("shares"):
        lines.append(
            f"student gradient share per loss term (step {grad['step']}): {format_shares(grad['shares'], unit=' %')}"
        )
    return "\n".join(lines)
