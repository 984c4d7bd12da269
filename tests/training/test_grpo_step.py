"""The GRPO update on the Megatron policy: gradients independent of micro-batching and data parallelism."""

import json

import pytest
import torch
from launch import run_worker

pytestmark = pytest.mark.slow


def load(prefix, mbs):
    return torch.load(f"{prefix}_mbs{mbs}.pt")


def assert_same_gradients(a, b, label):
    """Per parameter tensor, ||a - b|| / ||a|| <= 1e-6 (float32 summation order differs between splits)."""
    assert a.keys() == b.keys()
    for name in a:
        rel = ((a[name] - b[name]).norm() / a[name].norm().clamp(min=1e-12)).item()
        assert rel <= 1e-6, f"{label}: {name} differs by {rel:.2e} (relative L2)"


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_gradients_invariant_to_micro_batches_and_data_parallel(tiny_hf_dir, tmp_path, aggregation):
    run_worker("grpo_step.py", "--hf", str(tiny_hf_dir), "--out", str(tmp_path / "dp1"),
               "--micro-batch-sizes", "1,2,4", "--aggregation", aggregation)
    run_worker("grpo_step.py", "--hf", str(tiny_hf_dir), "--out", str(tmp_path / "dp2"),
               "--micro-batch-sizes", "2", "--aggregation", aggregation, nproc=2)
    reference = load(tmp_path / "dp1", 4)
    assert any(g.abs().sum() > 0 for g in reference["grads"].values())
    vision = [g for name, g in reference["grads"].items() if ".visual." in f".{name}"]
    assert vision and any(g.abs().sum() > 0 for g in vision), "the vision tower must get gradients"
    for other, label in [(load(tmp_path / "dp1", 2), "2 micro-batches"), (load(tmp_path / "dp1", 1), "8 micro-batches"),
                         (load(tmp_path / "dp2", 2), "DP=2")]:
        assert_same_gradients(reference["grads"], other["grads"], label)
        for key in ("train/loss", "train/grad_norm", "train/entropy", "train/ratio_mean"):
            assert other["metrics"][key] == pytest.approx(reference["metrics"][key], rel=1e-6, abs=1e-7), (label, key)
    metrics = reference["metrics"]
    assert metrics["train/ratio_mean"] == pytest.approx(1.0) and metrics["train/clip_frac_high"] == 0.0
    assert 0 < metrics["train/entropy"] <= torch.log(torch.tensor(512.0)).item() + 1e-4
    json.dumps(metrics)  # plain floats, ready for JSONL/TensorBoard
