"""The main job: one round of the closed loop on the tiny recipe, killed after RL stage 1 and resumed.

The first run is killed (SIGKILL to its whole process group) as soon as ``state.json`` records
``round1.rl1`` done; the rerun must skip every finished phase, continue with stage-2 synthesis, and leave the
full set of outputs: both datasets, both RL runs with checkpoints, the HF export and the run report.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from launch import REPO

pytestmark = pytest.mark.slow
REDUCED = ["rl.steps=2", "rl.save_every=2"]


def start(run_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "nemo_viper.cli", "run", "--recipe", "tiny", f"run_dir={run_dir}", *REDUCED]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finished(run_dir):
    state = run_dir / "state.json"
    return list(json.loads(state.read_text())["phases"]) if state.is_file() else []


def test_tiny_loop_survives_a_kill_after_rl_stage1(tmp_path):
    run_dir = tmp_path / "tiny"
    first = start(run_dir)
    deadline = time.time() + 900
    while "round1.rl1" not in finished(run_dir):
        assert first.poll() is None, first.communicate()[0][-4000:]
        assert time.time() < deadline, "stage-1 RL did not finish within 15 minutes"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    stage1_manifest = (run_dir / "round1" / "synth1" / "manifest.json").read_text()
    rl1_latest = (run_dir / "round1" / "rl1" / "checkpoints" / "latest").stat().st_mtime

    second = start(run_dir)
    output, _ = second.communicate(timeout=900)
    assert second.returncode == 0, output[-4000:]
    for phase in ("prepare", "round1.synth1", "round1.rl1"):
        assert f"{phase}" in output and "already done" in output.split(phase, 1)[1].splitlines()[0], phase
    assert finished(run_dir) == ["prepare", "round1.synth1", "round1.rl1", "round1.synth2", "round1.rl2", "export"]
    assert (run_dir / "round1" / "synth1" / "manifest.json").read_text() == stage1_manifest
    assert (run_dir / "round1" / "rl1" / "checkpoints" / "latest").stat().st_mtime == rl1_latest

    for stage, task in (("synth1", "caption_refine"), ("synth2", "visual_op")):
        manifest = json.loads((run_dir / "round1" / stage / "manifest.json").read_text())
        assert manifest["task"] == task and manifest["total_samples"] > 0, manifest
    for stage in ("rl1", "rl2"):
        rl = run_dir / "round1" / stage
        assert [json.loads(line)["step"] for line in (rl / "metrics.jsonl").read_text().splitlines()] == [1, 2]
        assert (rl / "checkpoints" / "step_0000002" / "nemo_viper_checkpoint.json").is_file()
        assert list((rl / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "final_hf" / "model.safetensors").is_file()
    report = (run_dir / "report" / "report.md").read_text()
    assert "rl1" in report and "rl2" in report and "synth2" in report
    assert {p.name for p in (run_dir / "report").glob("*.png")} >= {
        "round1_reward.png", "round1_response_length.png", "round1_clip_fractions.png", "round1_synthesis.png"}
