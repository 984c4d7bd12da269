"""The RL loop learns a verifiable toy task on the tiny Megatron policy, and survives a SIGKILL.

One run of tests/workers/rl_learning.py (the real loop, Megatron generator, GRPO trainer, checkpoints)
is killed right after its step-10 checkpoint; its ``metrics.jsonl`` then gets a torn last line (what a node
crash mid-append leaves) and ``checkpoints/latest`` is pointed at a missing directory. The rerun must warn
about both, resume from the newest complete checkpoint (step 10), log every step exactly once, and raise
the mean reward from <= 0.2 to >= 0.6.
"""

import json
import os
import signal
import time

import pytest
from launch import WORKERS, start_python

pytestmark = pytest.mark.slow
STEPS = 25


def start(tiny_hf_dir, run_dir):
    return start_python(str(WORKERS / "rl_learning.py"), "--hf", str(tiny_hf_dir), "--run-dir", str(run_dir),
                        "--steps", str(STEPS), "--lr", "1e-2")


def test_learns_toy_task_and_resumes_after_sigkill(tiny_hf_dir, tmp_path):
    run_dir = tmp_path / "run"
    first = start(tiny_hf_dir, run_dir)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "latest").exists():
        assert first.poll() is None, first.communicate()[1][-4000:]
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000010"
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 12, "time": 1.0, "reward/me')
    (run_dir / "checkpoints" / "latest").write_text("step_0000099\n")

    second = start(tiny_hf_dir, run_dir)
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr[-4000:]
    logged = stdout + stderr  # (a library of the worker sends log records to stdout)
    assert "metrics.jsonl ends with a torn line" in logged
    assert "names 'step_0000099', which is not a complete checkpoint; using the newest complete one" in logged
    resumed_steps = [json.loads(line)["step"] for line in stdout.splitlines() if line.startswith("{")]
    assert resumed_steps == list(range(11, STEPS + 1)), "must resume right after the step-10 checkpoint"

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), "every step logged exactly once"
    rewards = [r["reward/mean"] for r in records]
    early, late = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert early <= 0.2 and late >= 0.6, f"reward did not rise: {early:.3f} -> {late:.3f} ({rewards})"
    for key in ("train/clip_frac_low", "train/clip_frac_high", "train/entropy", "train/grad_norm", "time/rollout",
                "time/reward", "time/logprob", "time/update", "reward/format", "reward/recall"):
        assert key in records[-1], key
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:07d}"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
