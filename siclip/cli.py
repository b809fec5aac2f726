"""The ``siclip`` command: demo, data, train, tune, eval, ablate, bench, info, export, report.

Every subcommand is a thin call into the same function the Python API exposes (``launch(cfg)``,
``run_pipeline(cfg)``, ...). Configuration errors are reported as one line naming the key, the bad value
and what is allowed, with exit status 2, before Ray starts. ``main(argv)`` is callable in-process.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

from siclip.config import BenchmarkName, ConfigError, SiclipCfg, check_paths, load_config, resolve_switches

__all__ = ["main"]

BENCHMARK_SUITES: dict[str, tuple[str, ...]] = {"paper": typing.get_args(BenchmarkName)}
"""``siclip eval --suite NAME``: the datasets of a suite (``eval.roots.<name>`` says where each lies)."""


def _config_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")


def _load(args: argparse.Namespace, sections: tuple[str, ...] | None = None) -> SiclipCfg:
    from siclip.preflight import check_job_paths
    from siclip.ray_compat import job_working_dir

    cfg = load_config(args.config, args.overrides, check_files=False)
    # inside `ray job submit`: paths the cluster cannot see fail first, with what to set instead
    check_job_paths(cfg, job_working_dir=job_working_dir(), sections=sections)
    check_paths(cfg, sections=sections)
    return cfg


def _print_switches(args: argparse.Namespace, *, searched: tuple[str, ...] = ()) -> str:
    """Print (and return) the resolved profile switches and where each came from, before a run starts."""
    report = resolve_switches(args.config, args.overrides, searched=searched)
    print("siclip: " + "\n".join(report.lines()), flush=True)
    return report.markdown()


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# ------------------------------------------------------------------------------------------ commands
def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args, ("data", "model", "teacher", "eval", "train"))
    _print_switches(args)
    from siclip.train.launch import launch

    result = launch(cfg)
    print(f"siclip: run {cfg.train.run_name!r} finished at step {result.max_steps}; folder {result.location}")
    if result.metrics:
        _print_json({k: v for k, v in result.metrics.items() if k.startswith("val/")})
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = _load(args, ("eval", "model"))
    suite = tuple(BENCHMARK_SUITES[args.suite]) if args.suite else ()
    if not (cfg.eval.zeroshot_dir or cfg.eval.retrieval_shards or cfg.eval.benchmarks or suite):
        raise ConfigError(
            "eval.zeroshot_dir: got ''; allowed: set it, eval.retrieval_shards or eval.benchmarks, or pass --suite"
        )
    import contextlib

    from siclip.eval.suite import evaluate_checkpoint

    # stdout is the result only (one JSON object): whatever the evaluation prints goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        result = evaluate_checkpoint(cfg, args.checkpoint, suite=suite)
    if suite:
        from siclip.eval.paper_table import json_path, write_paper_table

        table = write_paper_table(
            result["benchmarks"], name=args.name or cfg.train.run_name, out=args.table or _default_table(args)
        )
        print(f"siclip: paper table written to {table} (and {json_path(table)})", file=sys.stderr)
    print(json.dumps(result, sort_keys=True))
    return 0


def _default_table(args: argparse.Namespace) -> str:
    """``paper_table.md`` in the checkpoint's folder (the folder itself when a folder was given), on the
    checkpoint's own storage (a local folder or a URI such as ``s3://``)."""
    from siclip import storage

    ckpt = args.checkpoint
    return storage.join(ckpt if storage.is_dir(ckpt) else storage.parent(ckpt), "paper_table.md")


def cmd_info(args: argparse.Namespace) -> int:
    from siclip.models.info import param_counts
    from siclip.models.presets import build_preset, list_presets, preset_info

    if args.model not in list_presets():
        raise ConfigError(f"--model: got {args.model!r}; allowed: {', '.join(list_presets())}")
    counts: dict[str, Any] = {"model": args.model, **param_counts(build_preset(args.model))}
    choices: dict[str, dict[str, int]] = {}
    if preset_info(args.model).base is not None:  # a SAS-P preset: what each simplification choice costs
        from siclip.models.info import sasp_choice_counts

        choices = sasp_choice_counts(args.model)
    if args.json:
        _print_json({**counts, **({"sasp_choices": choices} if choices else {})})
    else:
        for k, v in counts.items():
            print(f"{k:>10}: {v / 1e6:.2f} M" if isinstance(v, int) else f"{k:>10}: {v}")
        if choices:
            print("SAS-P choices (model.sasp), parameters: image / text / total")
            for label, c in choices.items():
                print(
                    f"  {label:<36} {c['image'] / 1e6:.3f} / {c['text'] / 1e6:.3f} / {c['total'] / 1e6:.3f} M"
                )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from siclip.demo import run_demo

    run_demo(out_dir=_demo_out(args), quick=args.quick, overrides=args.overrides, held_out=args.held_out)
    return 0


def _demo_out(args: argparse.Namespace) -> str:
    """``--out``, else the default folder of the chosen world (the held-out world never shares the default's)."""
    from siclip.demo import DEFAULT_ROOT, HELD_OUT_ROOT

    return args.out or (HELD_OUT_ROOT if args.held_out else DEFAULT_ROOT)


def cmd_data_build(args: argparse.Namespace) -> int:
    cfg = _load(args, ("caption", "teacher"))
    from siclip.data.pipeline import ShardBuildError, run_pipeline

    try:
        manifest = run_pipeline(cfg)
    except ShardBuildError as exc:  # the finished shards are kept; the message names the others
        print(f"siclip: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"siclip: wrote {manifest.samples_out} samples in {len(manifest.shards)} shards to "
        f"{cfg.caption.output_dir} (skipped {manifest.samples_skipped}: {manifest.skipped})"
    )
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    cfg = _load(args, ("data", "model", "teacher", "eval", "tune", "train"))
    from siclip.sweep import format_table, load_space, run_sweep

    header = _print_switches(args, searched=tuple(load_space(cfg)))
    result = run_sweep(cfg, resume=args.resume)
    print(header + "\n\n" + format_table(result))
    if result.errored:  # non-zero, so `ray job submit` (and any script) sees the failure
        ids = ", ".join(r.trial_id for r in result.errored)
        print(
            f"siclip tune: {len(result.errored)} of {len(result.rows)} trials errored: {ids}", file=sys.stderr
        )
        return 1
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from siclip.ablate import ROWS, run_ablation

    result, table = run_ablation(
        out_dir=_demo_out(args),
        held_out=args.held_out,
        seeds=args.seeds,
        steps=args.steps,
        quick=args.quick,
        overrides=args.overrides,
        config=args.config,
        rows=tuple(args.row or ROWS),
        tag=args.tag,
    )
    if args.json:
        _print_json(result)
    else:
        print(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from siclip.report import write_report

    try:
        page = write_report(args.runs, out=args.out or None)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from exc
    print(f"siclip: report written to {page}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from siclip.models.export import export_open_clip
    from siclip.models.presets import build_preset
    from siclip.train.checkpoint import load_student_weights

    sasp = load_config(args.config, check_files=False).model.sasp if args.config else None
    model = build_preset(args.model, sasp=sasp)
    if args.checkpoint:
        load_student_weights(model, args.checkpoint)
    export_open_clip(model, args.model, args.out)
    print(f"siclip: exported {args.model} to {args.out} (load with open_clip 'local-dir:{args.out}')")
    return 0


def _bench(args: argparse.Namespace) -> int:
    result: dict[str, Any]
    if args.what == "infer":
        from siclip.bench.infer import bench_infer, format_table, write_table

        result = bench_infer(pairs=args.pairs)
        table = format_table(result)
        write_table(table)
    elif args.what == "data":
        from siclip.bench.data import run_bench_data

        result, table = run_bench_data()
    elif args.what == "caption":
        from siclip.bench.caption import run_bench_caption

        result, table = run_bench_caption()
    elif args.what == "memory":
        from siclip.bench.memory import run_bench_memory

        result, table = run_bench_memory()
    else:
        from siclip.bench.train import run_bench_train

        result, table = run_bench_train()
    if args.json:
        _print_json(result)
    else:
        print(table)
    return 0


# ------------------------------------------------------------------------------------------ parser
HELD_OUT_HELP = (
    "the world of docs/ablation-design.md: a third of the classes absent from the student's web data, "
    "a teacher trained on every class with clean captions; zero-shot on seen and unseen classes"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="siclip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    _config_args(add("train", cmd_train, "train (or resume) a run with Ray Train"))
    p = add("tune", cmd_tune, "Ray Tune sweep over dotted config keys (tune.space / tune.space_file)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep of this tune.experiment_name (it unpickles Tune's saved state: "
        "resume only your own folder); without it an existing name gets a -2, -3, ... suffix",
    )
    _config_args(p)
    p = add(
        "eval",
        cmd_eval,
        "zero-shot classification and retrieval of a checkpoint; prints one JSON object (progress on stderr)",
    )
    p.add_argument("--checkpoint", required=True, help="weights file, checkpoint folder, or run folder")
    p.add_argument(
        "--suite",
        choices=sorted(BENCHMARK_SUITES),
        help="also the paper's datasets (ImageNet-1k/V2/R/Sketch, COCO, Flickr30k) from eval.roots.*, and the "
        "paper table (Markdown + JSON)",
    )
    p.add_argument("--table", default="", help="where the paper table goes (default: beside the checkpoint)")
    p.add_argument("--name", default="", help="this checkpoint's name in the table (default: train.run_name)")
    _config_args(p)
    p = add("info", cmd_info, "parameter counts of a model preset")
    p.add_argument("--model", required=True)
    p.add_argument("--json", action="store_true")
    p = add("demo", cmd_demo, "the embedded demo world end to end on CPU")
    p.add_argument(
        "--out", default="", help="folder for the demo's data and runs (default runs/demo, runs/demo-heldout)"
    )
    p.add_argument("--quick", action="store_true", help="a smaller, faster demo (for tests)")
    p.add_argument("--held-out", action="store_true", help=HELD_OUT_HELP)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="overrides for every training stage (model.*, loss.*, teacher.*: the student only)",
    )
    p = add(
        "ablate",
        cmd_ablate,
        "the paper's ablation rows on the demo world or a config's data (table to benchmarks/ablation*.md)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="the student config every row starts from, on its own data, teacher and held-out sets "
        "(table benchmarks/ablation-<file stem>.md); default: the demo world, generated first",
    )
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=0, help="student steps per row (0: the config's)")
    p.add_argument("--row", action="append", help="run only this row (repeatable), e.g. --row WIKD+PM")
    p.add_argument(
        "--tag",
        default="",
        help="name a variant: run folders ablate-<row>-<tag>-s<seed>, table benchmarks/ablation[-demo]-<tag>.md",
    )
    p.add_argument(
        "--out",
        default="",
        help="the demo world's folder (without --config; default runs/demo, runs/demo-heldout)",
    )
    p.add_argument("--quick", action="store_true", help="the small demo world (without --config)")
    p.add_argument("--held-out", action="store_true", help=HELD_OUT_HELP + " (without --config)")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="overrides for every row (model.*, loss.*, teacher.*: not the teacher stage)",
    )
    data = sub.add_parser("data", help="data stages (siclip data build ...)").add_subparsers(
        dest="action", required=True
    )
    p = data.add_parser("build", help="CC12M (img2dataset shards) -> CC12M-SYN with Ray Data and CoCa actors")
    p.set_defaults(fn=cmd_data_build)
    _config_args(p)
    p = add("report", cmd_report, "PNG plots and a Markdown page per run folder; several runs overlaid")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (runs_dir/run_name)")
    p.add_argument(
        "--out", default="", help="folder for the overlays and index (several runs; default: beside them)"
    )
    p = add("export", cmd_export, "reparameterise-ready export that open_clip loads")
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoint", default="")
    p.add_argument("--config", default=None, help="the run's config.yaml (its model.sasp shapes the model)")
    p.add_argument("--out", required=True)
    p = add("bench", _bench, "benchmarks: infer, data, caption, train, memory (tables go to benchmarks/)")
    p.add_argument("what", choices=["infer", "data", "caption", "train", "memory"])
    p.add_argument("--pairs", type=int, default=7, help="infer: timed pairs of passes per batch size")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        print(f"siclip: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
