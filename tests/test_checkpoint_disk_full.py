"""A full disk during a checkpoint save: one line naming the directory and the size, and no partial checkpoint.

Torch's stream writer reports a short write as ``unexpected pos A vs B`` and megatron-core wraps it in a
``CheckpointException`` naming only a worker failure; the save edge (:func:`nemo_viper.models.checkpoint.save_policy`)
turns it into ``no space left on <dir> (needs ~N GB, M GB free)`` after removing the partial directory.
"""

import errno
import os
import subprocess
import traceback

import pytest
from launch import start_python
from torch.distributed.checkpoint.api import CheckpointException

from nemo_viper.models.checkpoint_dir import free_bytes, latest_checkpoint, no_space_error, out_of_space


def _writer_failure(cause: BaseException) -> CheckpointException:
    """What megatron-core's synchronous save raises when a write fails on rank 0."""
    return CheckpointException("write", {0: (cause, traceback.StackSummary())})


def test_enospc_anywhere_in_a_failed_write_is_a_full_disk(tmp_path):
    enospc = OSError(errno.ENOSPC, "No space left on device")
    assert out_of_space(_writer_failure(enospc), tmp_path, needed_bytes=0)
    try:
        try:
            raise enospc
        except OSError as inner:
            raise RuntimeError("file write failed") from inner
    except RuntimeError as outer:
        assert out_of_space(outer, tmp_path / "not" / "yet", needed_bytes=0)


def test_a_writer_error_is_a_full_disk_only_when_the_checkpoint_does_not_fit(tmp_path):
    torn = _writer_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"))
    free = free_bytes(tmp_path)
    assert out_of_space(torn, tmp_path, needed_bytes=free + 1)
    assert not out_of_space(torn, tmp_path, needed_bytes=1)
    assert not out_of_space(ValueError("a bug"), tmp_path, needed_bytes=1)
    message = str(no_space_error(tmp_path, 3_600_000_000))
    assert message.startswith(f"no space left on {tmp_path} (needs ~3.6 GB, ") and "\n" not in message


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 2 MiB tmpfs (the tiny model's checkpoint takes 2.2 MB), unmounted afterwards."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


@pytest.mark.slow
def test_a_save_onto_a_full_disk_is_one_line_and_leaves_no_checkpoint(tiny_hf_dir, tiny_filesystem):
    """The real fault: torch's writer runs out of space in the middle of the weights."""
    out = tiny_filesystem / "step_0000003"
    last = _fails_for_space(out, "convert", "import", "--hf", str(tiny_hf_dir), "--out", str(out))
    assert last.startswith(f"error: no space left on {tiny_filesystem} (needs ~0.0021 GB, "), last
    assert latest_checkpoint(tiny_filesystem) is None  # nothing to resume from that is not complete


@pytest.mark.slow
def test_an_export_onto_a_full_disk_is_one_line_and_leaves_no_partial_dir(tiny_bf16_checkpoint, tiny_filesystem):
    """``convert export`` streams safetensors shards: a short write in the middle is the same one line, with the
    HF weights' size counted from the config."""
    _, ckpt = tiny_bf16_checkpoint
    filler = tiny_filesystem / "filler"
    filler.write_bytes(b"\0" * (1536 * 1024))  # leaves 512 KiB: less than the tiny model's ~1.1 MB of bf16 weights
    out = tiny_filesystem / "hf"
    last = _fails_for_space(out, "convert", "export", "--ckpt", str(ckpt), "--out", str(out))
    assert last.startswith(f"error: no space left on {tiny_filesystem} (needs ~0.00"), last


def _fails_for_space(out, *command) -> str:
    """Run the ``nemo-viper`` ``command`` that writes ``out``; check it failed with one line and left neither
    ``out`` nor a partial directory; its last line."""
    job = start_python("-m", "nemo_viper.cli", *command)
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 2, stderr[-4000:]
    assert not [line for line in stderr.splitlines() if line.startswith(("Traceback", "[rank0]: Traceback"))]
    assert not out.exists() and not list(out.parent.glob(".*.partial"))  # removed, space given back
    return stderr.strip().splitlines()[-1]


def test_a_full_disk_at_the_latest_pointer_leaves_the_new_checkpoint_to_resume_from(tiny_filesystem):
    """The checkpoint fit but its ``latest`` pointer did not: one line, and a resume takes the new checkpoint,
    not the older one the old pointer names."""
    from nemo_viper.errors import CheckpointError
    from nemo_viper.models.checkpoint_dir import METADATA_FILE
    from nemo_viper.training.checkpointing import CheckpointManager

    class Saved:  # a policy whose checkpoint is its metadata file, then fills the disk
        def save_checkpoint(self, path, step, metadata):
            path.mkdir(parents=True)
            (path / METADATA_FILE).write_text("{}")
            fd = os.open(tiny_filesystem / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            with pytest.raises(OSError):
                while True:
                    os.write(fd, b"\0" * 4096)
            os.close(fd)
            return path

    manager = CheckpointManager(tiny_filesystem, keep_last=5)
    (tiny_filesystem / "step_0000001").mkdir()
    (tiny_filesystem / "step_0000001" / METADATA_FILE).write_text("{}")
    (tiny_filesystem / "latest").write_text("step_0000001\n")
    with pytest.raises(CheckpointError, match=rf"^no space left on {tiny_filesystem} for its latest pointer; "):
        manager.save(Saved(), 2, {})
    assert manager.latest() == tiny_filesystem / "step_0000002"
    assert not (tiny_filesystem / "latest.tmp").exists()
