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

``held_out=True`` builds the world of docs/ablation-design.md instead (under its own folder,
``HELD_OUT_ROOT``): a third of the zero-shot classes never occur in the student's web shards; the teacher
learns every class from clean captions only (the clean split plus the world's ``teacher`` split); the
captioner, trained on the clean split, captions only the student's web shards; zero-shot is reported on all
classes and on the seen and unseen ones.
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
    expand_shards,
    from_dict,
    load_config,
    resolve_switches,
)
from siclip.train.grad_share import format_shares

__all__ = [
    "DEMO_SIZES",
    "HELD_OUT_ROOT",
    "HELD_OUT_WORLD",
    "DemoPrep",
    "demo_config",
    "drop_stale_captions",
    "prepare_demo",
    "rebase_demo_paths",
    "run_demo",
]

_PACKAGED = Path(__file__).resolve().parent / "configs"
CONFIGS = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[1] / "configs"
"""The shipped configs: ``siclip/configs/`` in an installed wheel (setup.py copies them in), else a
checkout's top-level ``configs/``."""
DEFAULT_ROOT = "runs/demo"
HELD_OUT_ROOT = "runs/demo-heldout"
"""Where ``--held-out`` keeps its world, captions and runs unless told otherwise (never the default world's)."""

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


HELD_OUT_WORLD: dict[str, dict[str, int]] = {
    # docs/ablation-design.md: the student's 2 web shards (seen classes only), a 6,000-image teacher split
    # with clean captions, 25 zero-shot images per class (600 seen, 300 unseen)
    "full": {"n_web": 2000, "n_teacher": 6000, "n_zeroshot_per_class": 25},
    "quick": {"n_web": 300, "n_teacher": 1200, "n_zeroshot_per_class": 4},
}
"""What the held-out world changes in ``DEMO_SIZES[mode]["world"]``; the student takes every web shard."""


STUDENT_ONLY = ("model.", "loss.", "teacher.", "profile=")
"""Override prefixes that describe the student's experiment; the teacher stage keeps its own settings."""


def teacher_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The demo's overrides that also apply to the teacher stage (train, data, optim, ray, eval, ...)."""
    return [o for o in overrides if not o.strip().startswith(STUDENT_ONLY)]


def rebase_demo_paths(value: Any, root: str) -> Any:
    """A config's data (as read from its YAML) with every string that starts with ``runs/demo`` moved under
    ``root`` instead: the demo configs pointed at another demo folder, nothing else changed."""
    if isinstance(value, str):
        return value.replace(DEFAULT_ROOT, root, 1) if value.startswith(DEFAULT_ROOT) else value
    if isinstance(value, list):
        return [rebase_demo_paths(v, root) for v in value]
    if isinstance(value, dict):
        return {k: rebase_demo_paths(v, root) for k, v in value.items()}
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
    return from_dict(apply_overrides(rebase_demo_paths(data, root), list(overrides)))


def _eval(cfg_file: Path, checkpoint: Path) -> dict[str, float]:
    """What ``siclip eval`` does and prints, in-process (the same function, not the command: no import cycle)."""
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
    """The student's data: the CC12M-SYN shards (in ``syn_dir``) of the first ``n_shards`` web shards.

    A world with a ``teacher`` split gives the teacher its own data, so the student may take every web shard;
    otherwise the teacher's data is the whole web set, and the student must take fewer shards."""
    most = len(world.web_shards) if getattr(world, "teacher_shards", None) else len(world.web_shards) - 1
    if not 1 <= n_shards <= most:
        raise ConfigError(
            f"student_web_shards: got {n_shards}; allowed: 1 to {most} "
            f"(of the world's {len(world.web_shards)} web shards; without a teacher split the teacher must see more)"
        )
    return [str(Path(syn_dir) / Path(p).name) for p in world.web_shards[:n_shards]]


def drop_stale_captions(cfg: SiclipCfg) -> None:
    """Delete the demo's CC12M-SYN folder when it was captioned from other web shards (the world was made
    again at another size, e.g. ``--quick`` before): it is derived data, and the data build refuses to add
    to a folder built from other inputs."""
    import os
    import shutil

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


def _check_regime(root: Path, held_out: bool) -> None:
    """One demo folder holds one world: a teacher or captions of the other world are never resumed."""
    mark = root / "demo_regime.txt"
    regime = "held-out" if held_out else "default"
    if mark.is_file() and mark.read_text().strip() != regime:
        raise ConfigError(
            f"--out: {str(root)!r} holds the {mark.read_text().strip()} demo world; got a {regime} run "
            "(use another folder)"
        )
    root.mkdir(parents=True, exist_ok=True)
    mark.write_text(regime + "\n")


def _listed(paths: list[str]) -> str:
    return f"[{','.join(paths)}]"


def held_out_mentions(syn_shards: list[str], held_out: tuple[str, ...]) -> dict[str, float]:
    """How many synthetic captions of ``syn_shards`` name a held-out class (a captioner's error: the
    student's images never show one), and their share of all synthetic captions."""
    from siclip.data.demo_world import names_a_class
    from siclip.data.shards import iter_samples

    total = naming = 0
    for shard in syn_shards:
        for sample in iter_samples(shard):
            for text in sample.get("syn.json", {}).get("syn_text", []):
                total += 1
                naming += any(names_a_class(str(text), c) for c in held_out)
    return {
        "captions": float(total),
        "naming_held_out": float(naming),
        "share": naming / total if total else 0.0,
    }


def prepare_demo(
    *,
    out_dir: str = DEFAULT_ROOT,
    quick: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
    held_out: bool = False,
) -> DemoPrep:
    """Stages 1-3 (world, CC12M-SYN captions, teacher); each skipped when already done.

    ``held_out``: the world of docs/ablation-design.md (see the module's docstring)."""
    from siclip.data.caption_quality import compare_captions
    from siclip.data.captioner import train_captioner
    from siclip.data.demo_world import generate_demo_world
    from siclip.data.pipeline import run_pipeline
    from siclip.train.launch import launch

    mode = "quick" if quick else "full"
    sizes = DEMO_SIZES[mode]
    root = str(Path(out_dir))
    _check_regime(Path(root), held_out)
    _stage("1/6 demo world" + (" (held-out classes: docs/ablation-design.md)" if held_out else ""))
    world_sizes = {**sizes["world"], **(HELD_OUT_WORLD[mode] if held_out else {})}
    world = generate_demo_world(Path(root) / "world", held_out=held_out, **world_sizes)
    print(
        f"web {len(world.web_shards)} shards, clean {len(world.clean_shards)}, zero-shot {world.zeroshot_dir}"
    )
    syn_dir = demo_config("demo", root=root, overrides=overrides).caption.output_dir
    n_student = len(world.web_shards) if held_out else sizes["student_web_shards"]
    shards = student_shards(world, syn_dir, n_student)
    student_extra: list[str] = []
    teacher_extra: list[str] = []
    if held_out:
        print(
            f"held out of the student's data ({len(world.held_out_classes)} classes): "
            + ", ".join(world.held_out_classes)
        )
        print(
            f"teacher data: clean {len(world.clean_shards)} shards + teacher {len(world.teacher_shards)} shards "
            f"(every class, clean captions); student data: web {len(shards)} shards (seen classes, with "
            "synthetic captions)"
        )
        student_extra = [f"caption.input_shards={_listed(world.web_shards[:n_student])}"]
        teacher_extra = [
            f"data.train_shards={_listed([*world.clean_shards, *world.teacher_shards])}",
            "data.synthetic=off",
        ]
    else:
        print(
            f"teacher data: clean {len(world.clean_shards)} shards + web {len(world.web_shards)} shards; "
            f"student data: web {len(shards)} shards (with synthetic captions)"
        )
    student_cfg = demo_config(
        "demo",
        root=root,
        overrides=[
            f"data.train_shards={_listed(shards)}",
            f"train.max_steps={sizes['student_steps']}",
            f"train.grad_share_every={sizes['student_grad_share_every']}",
            *student_extra,
            *overrides,
        ],
    )
    teacher_cfg = demo_config(
        "demo_teacher",
        root=root,
        overrides=[
            f"train.max_steps={sizes['teacher_steps']}",
            *teacher_extra,
            *teacher_overrides(overrides),
        ],
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
    drop_stale_captions(student_cfg)
    run_pipeline(student_cfg)
    syn_shards = sorted(str(p) for p in Path(cap.output_dir).glob("*.tar"))
    web_captioned = world.web_shards[: len(syn_shards)] if held_out else world.web_shards
    quality: dict[str, Any] = dict(compare_captions(web_captioned, syn_shards))
    print("caption attribute accuracy (web vs synthetic):", json.dumps(quality), flush=True)
    if held_out:
        quality["held_out_mentions"] = held_out_mentions(syn_shards, world.held_out_classes)
        print("synthetic captions naming a held-out class:", json.dumps(quality["held_out_mentions"]))

    _stage(
        "3/6 teacher: tiny CLIP from scratch on "
        + ("clean captions of every class" if held_out else "clean + all web data")
        + ", CLIP loss (Ray Train)"
    )
    teacher_run = launch(_checked(teacher_cfg))
    return DemoPrep(world, teacher_cfg, student_cfg, Path(teacher_run.run_dir), quality)


def run_demo(
    *,
    out_dir: str = DEFAULT_ROOT,
    quick: bool = False,
    overrides: list[str] | tuple[str, ...] = (),
    held_out: bool = False,
) -> dict[str, Any]:
    """Run every stage; returns (and prints) the results table as a dict (``held_out``: see the module)."""
    from siclip.models.info import param_counts
    from siclip.models.presets import build_preset
    from siclip.train.launch import launch
    from siclip.train.metrics_table import last_grad_shares

    started = time.perf_counter()
    print("siclip demo, student: " + "\n".join(resolve_switches(CONFIGS / "demo.yaml", overrides).lines()))
    prep = prepare_demo(out_dir=out_dir, quick=quick, overrides=overrides, held_out=held_out)

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
    if "zeroshot_top1_unseen" in results["teacher"]:
        keys[1:1] = ["zeroshot_top1_seen", "zeroshot_top1_unseen"]
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
