"""A training run's logs, written by rank 0: TensorBoard events, the ``metrics.jsonl`` table, a progress line,
the final student export, and their upload to the run folder when it is a URI (storage sync).

Ray-free: the Ray Train worker (:mod:`siclip.train.worker`) creates one :class:`RunLog` on rank 0 and calls it
from the loop's hooks.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from torch import nn

from siclip import storage
from siclip.config import SiclipCfg, config_yaml
from siclip.train.checkpoint import save_student
from siclip.train.metrics_table import METRICS_TABLE, read_metrics

__all__ = ["SYNC_EVERY_S", "RunLog", "run_location"]

# the worker's logger: Ray Train V2 tees print() to stdout and its logger (each line twice); a logger prints once
LOG = logging.getLogger("siclip.train")


def run_location(cfg: SiclipCfg) -> str:
    """Where a run keeps everything: ``runs_dir/run_name``, a folder or a URI (Ray Train's run folder)."""
    return storage.join(cfg.train.runs_dir, cfg.train.run_name)


SYNC_EVERY_S = 60.0
"""With URI storage, logs are uploaded at every checkpoint, at the end, and at most this often in between."""


class RunLog:
    """TensorBoard events, a metrics.jsonl table and a progress line, written by rank 0 only.

    With a URI ``runs_dir`` (``s3://...``) they are written to a local staging folder and uploaded to the
    run folder by :meth:`sync`: TensorBoard's ``SummaryWriter`` writes local files only (remote paths need
    tensorflow's filesystems, which siclip does not install), and object stores cannot append to the
    table. On resume the table is downloaded first and cut back to the checkpoint's step, so a step
    logged before a node was lost is not logged twice; TensorBoard's ``purge_step`` does the same for
    events already uploaded.
    """

    def __init__(self, cfg: SiclipCfg, *, max_steps: int, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.location = run_location(cfg)
        self.remote = storage.is_remote(self.location)
        self.dir = Path(tempfile.mkdtemp(prefix="siclip-log-")) if self.remote else Path(self.location)
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.remote and storage.exists(storage.join(self.location, METRICS_TABLE)):
            storage.download(storage.join(self.location, METRICS_TABLE), self.dir / METRICS_TABLE)
        self.writer = SummaryWriter(str(self.dir / "tb"), purge_step=start_step or None)
        self._truncate_table(start_step)
        self.last_sync = time.monotonic()
        self.writer.add_text("config", "```\n" + config_yaml(cfg) + "\n```", start_step)
        self.max_steps = max_steps
        self.started = time.perf_counter()
        self.start_step = start_step

    def _truncate_table(self, start_step: int) -> None:
        """On resume, drop rows logged after the checkpoint (they are about to be logged again)."""
        table = self.dir / METRICS_TABLE
        if not table.is_file():
            return
        kept = [row for row in read_metrics(self.dir) if row["step"] <= start_step]
        storage.write_text(table, "".join(json.dumps(row) + "\n" for row in kept))

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()
        with open(self.dir / METRICS_TABLE, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.remote and time.monotonic() - self.last_sync >= SYNC_EVERY_S:
            self.sync()

    def sync(self) -> None:
        """Upload the table and the event files to the run folder (nothing to do for a local folder)."""
        if not self.remote:
            return
        self.writer.flush()
        if (self.dir / METRICS_TABLE).is_file():
            storage.upload(self.dir / METRICS_TABLE, storage.join(self.location, METRICS_TABLE))
        storage.upload(self.dir / "tb", storage.join(self.location, "tb"))
        self.last_sync = time.monotonic()

    def save_final(self, student: nn.Module) -> None:
        """The student export, ``final/`` in the run folder."""
        save_student(student, self.dir / "final")
        if self.remote:
            storage.upload(self.dir / "final", storage.join(self.location, "final"))

    def close(self) -> None:
        self.writer.close()
        self.sync()
        if self.remote:
            shutil.rmtree(self.dir, ignore_errors=True)

    def progress(self, step: int, metrics: dict[str, float]) -> None:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(done, 1) * (self.max_steps - step)
        bar = "#" * int(20 * step / self.max_steps)
        LOG.info(
            f"[{bar:<20}] step {step}/{self.max_steps} loss {metrics.get('loss/total', float('nan')):.4f} "
            f"{metrics.get('perf/samples_per_s', 0.0):.1f} samples/s eta {eta:.0f}s"
        )
