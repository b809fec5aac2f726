"""Run as a script by test_multinode.py: a 3-node Ray on this machine, a 2-worker run, both nodes lost.

``python tests/integration/multinode_scenario.py CONFIG WORK`` starts ``ray.cluster_utils.Cluster`` (a head
with no CPUs, so nothing trains there, and two 1-CPU worker nodes: one Train worker per node), trains
``CONFIG`` with ``launch()``, and after the run's second checkpoint removes both worker nodes, adds two
fresh ones and lets the run go on. The pause is deterministic: a Ray Train callback on the controller
holds the run after that checkpoint (the workers then wait in their next report) until the script has
swapped the nodes. Prints one ``RESULT {json}`` line. Its own process (and so its own Ray), so it never
meets the test session's shared local Ray. The storage (``train.runs_dir``) must be a URI every node can
reach, e.g. the tests' moto S3 via the ``AWS_*`` variables this process passes on to the nodes.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster
from ray.train import UserCallback

from siclip.config import load_config
from siclip.train.launch import launch

NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20}


class PauseAfterCheckpoint(UserCallback):
    """On the controller: after the ``nth`` checkpointed report, say so and wait for ``go`` (once)."""

    def __init__(self, nth: int, reached: str, go: str) -> None:
        self.nth, self.reached, self.go = nth, reached, go
        self.seen = 0

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if checkpoint is None:
            return
        self.seen += 1
        if self.seen != self.nth:
            return
        Path(self.reached).write_text(str(int(metrics[0]["step"])))
        deadline = time.monotonic() + 300
        while not Path(self.go).exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def main(config: str, work: str) -> None:
    cfg = load_config(config)
    reached, go = Path(work) / "paused-at", Path(work) / "go"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": 80 * 2**20, "include_dashboard": False},
    )
    workers = [cluster.add_node(**NODE) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            result = launch(cfg, callbacks=[PauseAfterCheckpoint(2, str(reached), str(go))])
            outcome.update(location=result.location, checkpoint=result.checkpoint, step=result.max_steps)
        except BaseException as exc:
            outcome["error"] = repr(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while thread.is_alive() and not reached.exists():
        time.sleep(0.1)
    if reached.exists():
        for node in workers:
            cluster.remove_node(node)
        fresh = [cluster.add_node(**NODE) for _ in range(2)]
        cluster.wait_for_nodes()
        outcome["paused_at"] = int(reached.read_text())
        outcome["removed_nodes"] = [w.node_id for w in workers]
        outcome["fresh_nodes"] = [n.node_id for n in fresh]
        go.touch()
    thread.join()
    outcome["alive_nodes"] = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    print("RESULT " + json.dumps(outcome), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
