"""``siclip bench train``'s memory-format table: every cell measured or its crash named, never a dead bench."""

from __future__ import annotations

from siclip.bench.train import format_formats_table, run_bench_formats


def test_each_kernel_and_format_is_timed_or_its_crash_is_named() -> None:
    result = run_bench_formats(batch=2, steps=1, rounds=1, threads=1)
    kernels = result["rows"]
    assert len(kernels) == 2 and any("AVX2" in k for k in kernels)  # this CPU's kernels and AVX2's
    for formats in kernels.values():
        assert set(formats) == {"NCHW", "channels-last"}
        # NCHW is what training falls back to: it must train with every kind of kernel
        assert formats["NCHW"]["student"] > 0 and formats["NCHW"]["teacher"] > 0
        cl = formats["channels-last"]
        assert (cl.get("student", 0) > 0 and cl.get("teacher", 0) > 0) or "SIG" in cl.get("error", ""), cl
    table = format_formats_table(result)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "s/step" not in line]
    assert len(rows) == 4  # 2 kinds of kernels x (student, teacher)
