"""``benchmarks/kernel_check.py`` (a step of ``scripts/gpu_check.sh``) on the CPU at small shapes, through the same
functions as on the GPU, so that the check cannot rot: the packed vision tower equals transformers' and decode
attention runs with PyTorch's math kernel disabled."""

import sys

from launch import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import kernel_check  # noqa: E402


def test_kernel_check_dry_run():
    rows = kernel_check.main(["--dry-run", "--repeats", "1"])
    results = {row["check"]: row["result"] for row in rows}
    assert results["vision tower 3B, packed vs transformers' output"] == "PASS", rows
    assert results["decode attention without the math kernel"] == "PASS", rows
    assert sum(check.startswith("vision tower 3B fwd+bwd") for check in results) == 2
