"""The GRPO update on the Megatron policy: gradients independent of micro-batching and data parallelism."""

import json

import pytest
import torch
from launch import run_worker

pytestmark = pytest.mark.slow


def load(prefix, mbs):
    return torch.load(f"{prefix}_mbs{mbs}.pt")


def assert_same_gradients(a, b, label, tolerance=1e-6):
    """Per parameter tensor, ||a - b|| / ||a|| <= tolerance (float32 summation order differs between splits)."""
    assert a.keys() == b.keys()
    for name in a:
        rel = ((a[name] - b[name]).norm() / a[name].norm().clamp(min=1e-12)).item()
        assert rel <= tolerance, f"{label}: {name} differs by {rel:.2e} (relative L2)"


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_gradients_invariant_to_micro_batches_and_data_parallel(tiny_hf_dir, tmp_path, aggregation):
    """Micro-batches and ranks hold unequal token and sequence counts (4 vs 3 responses of other lengths), so a
    normalisation by anything but the mini-batch's global counts changes the gradient; and the absolute
    gradient equals plain autograd of the documented loss on a policy without DDP or Megatron's schedule."""
    run_worker("grpo_step.py", "--hf", str(tiny_hf_dir), "--out", str(tmp_path / "dp1"),
               "--micro-batch-sizes", "1,2,4", "--aggregation", aggregation, "--reference")
    run_worker("grpo_step.py", "--hf", str(tiny_hf_dir), "--out", str(tmp_path / "dp2"),
               "--micro-batch-sizes", "2", "--aggregation", aggregation, nproc=2)
    reference = load(tmp_path / "dp1", 4)
    assert any(g.abs().sum() > 0 for g in reference["grads"].values())
    vision = [g for name, g in reference["grads"].items() if ".visual." in f".{name}"]
    assert vision and any(g.abs().sum() > 0 for g in vision), "the vision tower must get gradients"
    assert_same_gradients(reference["reference_grads"], reference["grads"], "plain autograd vs the trainer",
                          tolerance=1e-5)
    for other, label in [(load(tmp_path / "dp1", 2), "micro-batches of 2"), (load(tmp_path / "dp1", 1), "7 micro-batches"),
                         (load(tmp_path / "dp2", 2), "DP=2")]:
        assert_same_gradients(reference["grads"], other["grads"], label)
        for key in ("train/loss", "train/grad_norm", "train/entropy", "train/ratio_mean"):
            assert other["metrics"][key] == pytest.approx(reference["metrics"][key], rel=1e-6, abs=1e-7), (label, key)
    metrics = reference["metrics"]
    assert metrics["train/ratio_mean"] == pytest.approx(1.0) and metrics["train/clip_frac_high"] == 0.0
    assert 0 < metrics["train/entropy"] <= torch.log(torch.tensor(512.0)).item() + 1e-4
    json.dumps(metrics)  # plain floats, ready for JSONL/TensorBoard


def test_off_policy_update_with_every_option_is_invariant_too(tiny_hf_dir, tmp_path):
    """Two mini-batches (the second one off-policy: ratio != 1, clipping active) with Dr.GRPO, dual clip, k3 KL
    against the frozen reference (loaded because beta > 0) and overlong filtering: the same gradient for any
    micro-batch split and for DP = 2."""
    common = ("--hf", str(tiny_hf_dir), "--aggregation", "token-mean", "--minibatches", "2", "--options")
    run_worker("grpo_step.py", *common, "--out", str(tmp_path / "dp1"), "--micro-batch-sizes", "1,4")
    run_worker("grpo_step.py", *common, "--out", str(tmp_path / "dp2"), "--micro-batch-sizes", "1", nproc=2)
    reference = load(tmp_path / "dp1", 4)
    metrics = reference["metrics"]
    assert reference["reference_loaded"] and metrics["train/updates"] == 2
    assert metrics["train/ratio_max"] > 1.0 and metrics["train/kl_mean"] > 0  # the 2nd update is off-policy
    assert metrics["train/clip_frac_low"] + metrics["train/clip_frac_high"] + metrics["train/dual_clip_frac"] > 0
    assert metrics["overlong_filtering/masked_fraction"] == pytest.approx(1 / 7)
    for other, label in [(load(tmp_path / "dp1", 1), "micro-batches of 1"), (load(tmp_path / "dp2", 1), "DP=2")]:
        assert_same_gradients(reference["grads"], other["grads"], label, tolerance=1e-5)
        for key in ("train/loss", "train/kl_mean", "train/clip_frac_low", "train/clip_frac_high"):
            assert other["metrics"][key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-7), (label, key)
