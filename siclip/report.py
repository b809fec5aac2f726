"""``siclip report RUN [RUN ...]``: PNG plots and a Markdown page per run, read from the run folders.

Per run (``RUN/report/``): every loss term over steps (``loss/*``), the loss weights (``loss/weight/*``, on
a panel of their own: they span 0 to thousands), the gradient shares (``grad_share/*``),
the evaluations (``val/*``), and the learning rate and temperatures (``optim/lr``, ``temp/*``), from the
run's ``metrics.jsonl``. For several runs, the same plots overlaid, one line per run (web vs synthetic
captions, ablation rows...). Runs named like ``siclip ablate``'s (``ablate-<row>-s<seed>``) also get a bar
chart of their final evaluation per row, mean over seeds with the population std as error bar. Plots use
matplotlib's Agg backend: no display needed. Each image's caption on the page names what it draws and the
y scale.
"""

from __future__ import annotations

import re
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siclip.train.metrics_table import read_metrics

__all__ = ["GROUPS", "Plot", "ablation_groups", "plot_ablation", "write_report"]

GROUPS: dict[str, tuple[str, ...]] = {
    "losses": ("loss/",),
    "loss_weights": ("loss/weight/",),
    "grad_share": ("grad_share/",),
    "eval": ("val/",),
    "lr_temperature": ("optim/lr", "temp/"),
}
"""Plot name -> metric-name prefixes it draws (one panel per group, one line per metric)."""
EXCLUDED: dict[str, tuple[str, ...]] = {"losses": ("loss/weight/",)}
"""Plot name -> prefixes it leaves to another panel (the weights are not losses: 0 and 4000 on one axis)."""
STEPWISE = ("loss_weights",)
"""Panels of values logged only when they change: drawn as steps held until the run's last logged step."""
LOG_SCALE = ("losses", "loss_weights")
"""Panels drawn on a log y axis where the values allow it (symlog when some are 0, linear when negative)."""
TITLES = {
    "losses": "loss terms",
    "loss_weights": "loss weights (0: term off at that step)",
    "grad_share": "gradient share per loss term (of the student's gradient)",
    "eval": "evaluation",
    "lr_temperature": "learning rate and temperatures",
}
ABLATE_RUN = re.compile(r"^ablate-(?P<row>.+)-s(?P<seed>\d+)$")
ABLATION_METRICS = ("val/zeroshot_top1", "val/i2t_r@1", "val/t2i_r@1")


def _series(rows: list[dict[str, Any]], group: str) -> dict[str, tuple[list[int], list[float]]]:
    """Metric -> (steps, values) for the metrics of ``group``'s panel, in step order."""
    prefixes, excluded = GROUPS[group], EXCLUDED.get(group, ())
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if (
                key != "step"
                and key.startswith(prefixes)
                and not key.startswith(excluded)
                and isinstance(value, int | float)
            ):
                steps, values = out.setdefault(key, ([], []))
                steps.append(int(row["step"]))
                values.append(float(value))
    return dict(sorted(out.items()))


def _figure(title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class Plot:
    """A PNG written by the report and the caption its page gives it (what it draws, on which scale)."""

    path: Path
    caption: str


def _y_scale(values: list[float]) -> tuple[str, dict[str, float]]:
    """log for positive values; symlog (linear around 0, up to the smallest positive value) when some are 0;
    linear when any is negative or all are 0."""
    positive = [v for v in values if v > 0]
    if not positive or any(v < 0 for v in values):
        return "linear", {}
    if len(positive) == len(values):
        return "log", {}
    return "symlog", {"linthresh": min(positive)}


def _plot_group(runs: dict[str, list[dict[str, Any]]], group: str, path: Path) -> Plot | None:
    """One figure of ``group``'s metrics; several runs share it (line label ``run: metric``)."""
    fig, ax = _figure(TITLES[group])
    keys: list[str] = []
    values: list[float] = []
    for run, rows in runs.items():
        last_step = max((int(r["step"]) for r in rows if "step" in r), default=0)
        for key, (steps, vs) in _series(rows, group).items():
            label = key if len(runs) == 1 else f"{run}: {key}"
            style: dict[str, Any] = {"marker": "o" if len(steps) < 12 else None, "markersize": 3}
            if group in STEPWISE:
                style["drawstyle"] = "steps-post"
                if steps[-1] < last_step:  # still in force at the end
                    steps, vs = [*steps, last_step], [*vs, vs[-1]]
            ax.plot(steps, vs, label=label, **style)
            keys.append(label)
            values += vs
    if not keys:
        import matplotlib.pyplot as plt

        plt.close(fig)
        return None
    scale, kwargs = _y_scale(values) if group in LOG_SCALE else ("linear", {})
    if scale != "linear":
        ax.set_yscale(scale, **kwargs)
    ax.legend(fontsize=7, loc="best")
    return Plot(_save(fig, path), f"{TITLES[group]}: {', '.join(keys)} ({scale} scale)")


def _images(plots: list[Plot]) -> list[str]:
    """Markdown for the plots: each image, then its caption."""
    return [line for p in plots for line in (f"![{p.path.stem}]({p.path.name})", "", f"*{p.caption}*", "")]


def _final(rows: list[dict[str, Any]], key: str) -> float | None:
    for row in reversed(rows):
        if isinstance(row.get(key), int | float):
            return float(row[key])
    return None


def ablation_groups(runs: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, float]]]:
    """Row -> one dict per seed of the final ``ABLATION_METRICS``, for runs named ``ablate-<row>-s<seed>``."""
    groups: dict[str, list[dict[str, float]]] = {}
    for name, rows in sorted(runs.items()):
        m = ABLATE_RUN.match(name)
        if not m:
            continue
        finals = {k: v for k in ABLATION_METRICS if (v := _final(rows, k)) is not None}
        if finals:
            groups.setdefault(m["row"], []).append(finals)
    return groups


def plot_ablation(groups: dict[str, list[dict[str, float]]], path: Path) -> Plot:
    """Grouped bars: per row and metric, the mean over seeds (in %) with the population std as error bar."""
    fig, ax = _figure(
        f"ablation: final evaluation, mean ± std over seeds ({max(map(len, groups.values()))} max)"
    )
    ax.set_xlabel("")
    rows = list(groups)
    metrics = [m for m in ABLATION_METRICS if any(m in s for seeds in groups.values() for s in seeds)]
    width = 0.8 / max(len(metrics), 1)
    for j, metric in enumerate(metrics):
        means, stds = [], []
        for row in rows:
            vals = [100 * s[metric] for s in groups[row] if metric in s]
            means.append(statistics.fmean(vals) if vals else 0.0)
            stds.append(statistics.pstdev(vals) if len(vals) > 1 else 0.0)
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=metric.removeprefix("val/"))
    ax.set_xticks(range(len(rows)), rows, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.legend(fontsize=7)
    return Plot(_save(fig, path), f"ablation: {', '.join(metrics)} per row, mean and std over seeds")


def _run_page(
    name: str, run_dir: str, rows: list[dict[str, Any]], plots: list[Plot], *, beside_run: bool
) -> str:
    from siclip import storage

    last = rows[-1] if rows else {}
    lines = [
        f"# Run `{name}`",
        "",
        f"Folder: `{run_dir}`; {len(rows)} logged rows, last step {last.get('step', 0)}.",
    ]
    finals = {
        k: v
        for k in sorted({k for r in rows for k in r if k.startswith("val/")})
        if (v := _final(rows, k)) is not None
    }
    if finals:
        lines += ["", "| final evaluation | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in finals.items()]
    paper = storage.join(run_dir, "final", "paper_table.md")
    if storage.exists(paper):
        link = "../final/paper_table.md" if beside_run else paper
        lines += ["", f"Paper table: [paper_table.md]({link})"]
    lines += ["", *_images(plots)]
    if not plots:
        lines.append("Nothing to plot: the run has no metrics.jsonl rows yet.")
    return "\n".join(lines) + "\n"


@contextmanager
def _staged(location: str) -> Iterator[Path]:
    """A local folder to write ``location``'s files into: the folder itself, or (for a URI) a temporary one
    uploaded to it at the end."""
    from siclip import storage

    if not storage.is_remote(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="siclip-report-") as tmp:
        yield Path(tmp)
        storage.upload(tmp, location)


def write_report(run_dirs: Sequence[str | Path], *, out: str | Path | None = None) -> Path | str:
    """Plots and a page per run (``RUN/report/report.md``); with several runs also the overlays (and the
    ablation chart) with an index page in ``out`` (default: ``report/`` beside the first run). Returns the
    page to open: the run's page for one run, the index otherwise.

    Runs and ``out`` may be URIs (``s3://...``): metrics are read from there and pages uploaded there. A run
    at a URI with ``out`` given gets its page in ``out/<run name>/`` instead (e.g. a local folder), so a
    report of runs on an object store can be written without writing to the store.
    """
    from siclip import storage

    locations = [str(d) for d in run_dirs]
    missing = [d for d in locations if not storage.is_dir(d)]
    if missing:
        raise FileNotFoundError(f"siclip report: no such run folder {missing[0]!r}")
    runs = {storage.name(d): read_metrics(d) for d in locations}
    pages: list[str] = []
    for d in locations:
        name = storage.name(d)
        beside_run = out is None or not storage.is_remote(d)
        dest = storage.join(d, "report") if beside_run else storage.join(str(out), name)
        with _staged(dest) as folder:
            plots = [
                p
                for group in GROUPS
                if (p := _plot_group({name: runs[name]}, group, folder / f"{group}.png"))
            ]
            (folder / "report.md").write_text(_run_page(name, d, runs[name], plots, beside_run=beside_run))
        pages.append(storage.join(dest, "report.md"))
    if len(locations) == 1 and out is None:
        return _returned(pages[0])
    index_dir = str(out) if out is not None else storage.join(storage.parent(locations[0]), "report")
    with _staged(index_dir) as folder:
        plots = [p for group in GROUPS if (p := _plot_group(runs, group, folder / f"overlay_{group}.png"))]
        groups = ablation_groups(runs)
        if groups:
            plots.append(plot_ablation(groups, folder / "ablation.png"))
        lines = ["# siclip report", "", "| run | page |", "|---|---|"]
        lines += [
            f"| {storage.name(d)} | [{storage.name(d)}/report/report.md]({_link(p, index_dir)}) |"
            for d, p in zip(locations, pages, strict=True)
        ]
        lines += ["", *_images(plots)]
        (folder / "index.md").write_text("\n".join(lines) + "\n")
    return _returned(storage.join(index_dir, "index.md"))


def _returned(location: str) -> Path | str:
    from siclip import storage

    return location if storage.is_remote(location) else Path(location)


def _link(page: str, start: str) -> str:
    """``page`` as the index links it: relative between local folders, the full location otherwise."""
    from siclip import storage

    if storage.is_remote(page) or storage.is_remote(start):
        return page
    return _rel(Path(page), Path(start))


def _rel(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())
