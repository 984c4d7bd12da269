"""A stage-1 run killed with SIGKILL in the middle and rerun gives exactly the uninterrupted run's samples."""

import os
import signal
import time

import pytest
from launch import WORKERS, start_python

from nemo_viper.data import ShardDataset
from nemo_viper.synthesis.config import load_config
from nemo_viper.synthesis.run import run_synthesis


def worker(hf, images, out, delay=0.0):
    return start_python(str(WORKERS / "synth_resumable.py"), "--hf", str(hf), "--images", str(images),
                        "--out", str(out), "--delay", str(delay))


def finish(process):
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-4000:]


def samples(directory):
    dataset = ShardDataset(directory)
    return [(dataset.record(i), dataset.image_bytes(i)) for i in range(len(dataset))]


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_every_sample_once(tiny_hf_dir, photo_dir, fake_components, tmp_path):
    killed = tmp_path / "killed"
    process = worker(tiny_hf_dir, photo_dir, killed, delay=0.4)
    first_chunk = killed / "chunks" / "c000000.json"
    deadline = time.monotonic() + 90
    while not first_chunk.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the worker ended before its first commit"
        time.sleep(0.05)
    committed_at = first_chunk.stat().st_mtime_ns
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "manifest.json").exists()
    assert not (killed / "chunks" / "c000002.json").exists()  # the kill came before the last of 3 chunks

    finish(worker(tiny_hf_dir, photo_dir, killed))
    config = load_config(None, ["chunk_size=2", "batch_size=1"], stage=1, out=str(tmp_path / "reference"),
                         images=str(photo_dir), **{"vlm.policy": str(tiny_hf_dir)})
    run_synthesis(config, fake_components(config))  # the same job, uninterrupted, in this process
    assert first_chunk.stat().st_mtime_ns == committed_at  # the committed chunk was not redone
    expected = samples(tmp_path / "reference")
    assert [record.id for record, _ in expected] == ["s1-0000002", "s1-0000003", "s1-0000004", "s1-0000005"]
    assert samples(killed) == expected
    assert not list(killed.glob("*.partial")) and not (killed / ".staging").exists()
