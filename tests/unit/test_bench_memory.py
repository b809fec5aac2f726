"""``siclip bench memory``'s loss rows: one simulated rank of the local loss holds a fraction of the global one."""

from __future__ import annotations

import torch

import siclip.losses.pm as pm_mod
import siclip.losses.total as total_mod
from siclip.bench.memory import format_loss_table, measure_loss_memory


def test_local_loss_saves_far_less_for_backward_than_the_global_form_on_one_rank() -> None:
    real = total_mod.gather_features, pm_mod.broadcast_from_rank0
    cpu = torch.device("cpu")
    glob = measure_loss_memory(global_batch=256, world_size=4, local=False, device=cpu)
    loc = measure_loss_memory(global_batch=256, world_size=4, local=True, device=cpu)
    assert glob["local_batch"] == loc["local_batch"] == 64
    assert glob["matrix_mb"] == 4 * loc["matrix_mb"]
    # B x B matrices dominate the global form; the local one holds B/4 x B of them plus O(B x dim) features
    assert loc["saved_for_backward_mb"] < glob["saved_for_backward_mb"] / 2
    # the simulation put the real collectives back
    assert (total_mod.gather_features, pm_mod.broadcast_from_rank0) == real
    table = format_loss_table(
        {
            "global_batch": 256,
            "world_size": 4,
            "rows": {"global": glob, "local": loc},
            "ratio_global_over_local": 2.0,
            "ratio_key": "saved_for_backward_mb",
        },
        "cpu",
    )
    assert table[-1] == "global / local (saved_for_backward_mb): x2.00"
    assert sum(line.startswith("| global") or line.startswith("| local") for line in table) == 2
