"""The GRPO update on the Megatron policy: gradients independent of micro-batching and data parallelism, equal to
plain autograd of the documented loss; resume from a checkpoint saved before the optimizer's first step.

One two-rank worker launch serves every test (module fixtures): both ranks run every case once and the
never-stepped resume (DP=2), then rank 0 alone, in a process group of one (DP=1), runs every case at several
micro-batch sizes and the plain-autograd references."""

import json

import pytest
import torch
from launch import run_worker

pytestmark = pytest.mark.slow

CASES = ("token-mean", "seq-mean-token-mean", "options")


class Runs:
    def __init__(self, out):
        self.out = out

    def __call__(self, case, mbs):
        return torch.load(self.out / f"{case}_mbs{mbs}.pt")

    def reference(self, case):
        return torch.load(self.out / f"{case}_reference.pt")


@pytest.fixture(scope="module")
def launch(tiny_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo")
    run_worker("grpo_step.py", "--hf", str(tiny_hf_dir), "--out", str(out), "--never-stepped-resume",
               "--case", "token-mean:2", "--case", "seq-mean-token-mean:2", "--case", "options:1",
               "--reference", "--alone-case", "token-mean:4,2,1", "--alone-case", "seq-mean-token-mean:4,2,1",
               "--alone-case", "options:4,1", nproc=2, timeout=900)
    return out


@pytest.fixture(scope="module")
def dp1(launch):
    return Runs(launch / "alone")


@pytest.fixture(scope="module")
def dp2(launch):
    return Runs(launch)


def assert_same_gradients(a, b, label, tolerance=1e-6):
    """Per parameter tensor, ||a - b|| / ||a|| <= tolerance (float32 summation order differs between splits)."""
    assert a.keys() == b.keys()
    for name in a:
        rel = ((a[name] - b[name]).norm() / a[name].norm().clamp(min=1e-12)).item()
        assert rel <= tolerance, f"{label}: {name} differs by {rel:.2e} (relative L2)"


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_gradients_invariant_to_micro_batches_and_data_parallel(dp1, dp2, aggregation):
    """Micro-batches and ranks hold unequal token and sequence counts (4 vs 3 responses of other lengths), so a
    normalisation by anything but the mini-batch's global counts changes the gradient; and the absolute
    gradient equals plain autograd of the documented loss on a policy without DDP or Megatron's schedule."""
    reference = dp1(aggregation, 4)
    assert any(g.abs().sum() > 0 for g in reference["grads"].values())
    vision = [g for name, g in reference["grads"].items() if ".visual." in f".{name}"]
    assert vision and any(g.abs().sum() > 0 for g in vision), "the vision tower must get gradients"
    assert_same_gradients(dp1.reference(aggregation)["grads"], reference["grads"], "plain autograd vs the trainer",
                          tolerance=1e-5)
    for other, label in [(dp1(aggregation, 2), "micro-batches of 2"), (dp1(aggregation, 1), "7 micro-batches"),
                         (dp2(aggregation, 2), "DP=2")]:
        assert_same_gradients(reference["grads"], other["grads"], label)
        for key in ("train/loss", "train/grad_norm", "train/entropy", "train/ratio_mean"):
            assert other["metrics"][key] == pytest.approx(reference["metrics"][key], rel=1e-6, abs=1e-7), (label, key)
    metrics = reference["metrics"]
    assert metrics["train/ratio_mean"] == pytest.approx(1.0) and metrics["train/clip_frac_high"] == 0.0
    assert 0 < metrics["train/entropy"] <= torch.log(torch.tensor(512.0)).item() + 1e-4
    json.dumps(metrics)  # plain floats, ready for JSONL/TensorBoard


def test_off_policy_update_with_every_option_is_invariant_too(dp1, dp2):
    """Two mini-batches (the second one off-policy: ratio != 1, clipping active) with Dr.GRPO, dual clip, k3 KL
    against the frozen reference (loaded because beta > 0) and overlong filtering: the second update's gradient
    equals plain autograd of the documented loss (clipping included), and is the same for any micro-batch split
    and for DP = 2."""
    reference = dp1("options", 4)
    metrics = reference["metrics"]
    assert reference["reference_loaded"] and metrics["train/updates"] == 2
    assert metrics["train/ratio_max"] > 1.0 and metrics["train/kl_mean"] > 0  # the 2nd update is off-policy
    assert metrics["overlong_filtering/masked_fraction"] == pytest.approx(1 / 7)
    autograd = dp1.reference("options")
    clipped = autograd["metrics"]["clip_frac_low"] + autograd["metrics"]["clip_frac_high"]
    assert clipped > 0, f"the off-policy update must clip some tokens: {autograd['metrics']}"
    for key in ("clip_frac_low", "clip_frac_high", "dual_clip_frac"):  # the 1st update (ratio 1) clips nothing
        assert metrics[f"train/{key}"] == pytest.approx(autograd["metrics"][key] / 2, abs=1e-7), key
    assert_same_gradients(autograd["grads"], reference["grads"], "plain autograd vs the off-policy update",
                          tolerance=1e-5)
    # The second update's gradient is taken at the weights after the first Adam step, which differ between
    # splits by float32 summation order; Adam's 1/sqrt(v) scaling amplifies that for small-gradient entries
    # (measured up to 1.8e-5 on the patch embedding). A split-dependent loss would be off by >1e-2.
    for other, label in [(dp1("options", 1), "micro-batches of 1"), (dp2("options", 1), "DP=2")]:
        assert_same_gradients(reference["grads"], other["grads"], label, tolerance=5e-5)
        for key in ("train/loss", "train/kl_mean", "train/clip_frac_low", "train/clip_frac_high"):
            assert other["metrics"][key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-7), (label, key)


def test_a_checkpoint_saved_before_the_first_optimizer_step_resumes_with_a_fresh_optimizer(dp1, dp2):
    """Dynamic sampling can mask every group of the steps before a save, so the optimizer has not stepped: the
    checkpoint has an empty optimizer/ and resuming keeps the fresh optimizer. The resumed run (weights zeroed,
    then restored on 2 ranks) takes the same update as a run that was never saved and restored."""
    checkpoint = dp2.out / "never_stepped" / "step_0000000"
    assert (checkpoint / "optimizer").is_dir() and not any((checkpoint / "optimizer").iterdir())
    assert any((checkpoint / "model").iterdir())
    resumed = dp2("seq-mean-token-mean", 2)
    assert resumed["restored_state"] == {"step": 0, "consumed_prompts": 0}
    assert resumed["stepped_after_restore"] is False
    assert_same_gradients(dp1("seq-mean-token-mean", 4)["grads"], resumed["grads"], "resumed vs fresh")
