"""Checkpoints are code: a tampered or foreign checkpoint is refused before anything in it is unpickled.

A crafted ``model/.metadata`` (torch's distributed-checkpoint metadata, read with ``pickle``) whose payload
creates a file: ``convert export``, ``synth --policy`` and ``train --policy`` refuse the checkpoint with a
one-line error and the payload does not run; with ``--trust-checkpoint`` it is loaded and the payload runs
(which shows the payload is live, so its absence above means something).
"""

import json
import os
import pickle
import sys

import pytest
from launch import REPO
from PIL import Image

from nemo_viper.cli import main
from nemo_viper.data import CaptionRefineRecord, ShardWriter
from nemo_viper.models.checkpoint_dir import METADATA_FILE
from nemo_viper.runtime.lifetime import run_job

pytestmark = pytest.mark.slow


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def checkpoint(tiny_bf16_checkpoint):
    """A checkpoint written here by ``convert import`` (the session's; read, never written)."""
    return tiny_bf16_checkpoint[1]


def test_a_checkpoint_written_here_lists_the_hash_of_every_file(checkpoint):
    files = json.loads((checkpoint / METADATA_FILE).read_text())["files"]
    on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {METADATA_FILE}
    assert {"model/.metadata", "hf/config.json"} <= set(files)


def refused(argv, capsys, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_tampered_or_foreign_checkpoints_are_refused_and_the_payload_does_not_run(checkpoint, tmp_path, capsys):
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(checkpoint, tampered)
    marker = tmp_path / "PWNED"
    (tampered / "model" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))

    export = ["convert", "export", "--ckpt", str(tampered), "--out", str(tmp_path / "hf")]
    refused(export, capsys, f"{tampered} does not match its file manifest (1 files differ, e.g. model/.metadata)")
    refused(["synth", "--stage", "1", "--policy", str(tampered), "--out", str(tmp_path / "synth")], capsys,
            "does not match its file manifest")
    data = tmp_path / "data"
    writer = ShardWriter(data, "stage1", samples_per_shard=1, task="caption_refine")
    writer.write(CaptionRefineRecord(id="c0", images=["img"], initial_caption="A cat.", refinements=["A red cat."],
                                     refined_caption="A red cat.", source="test", synth_ckpt="tiny"),
                 [Image.new("RGB", (32, 32))])
    writer.finalize()
    refused(["train", "--stage", "1", "--data", str(data), "--policy", str(tampered), "--out", str(tmp_path / "rl"),
             "--steps", "1"], capsys, "does not match its file manifest")
    assert not marker.exists()

    foreign = tmp_path / "foreign"
    shutil.copytree(checkpoint, foreign)
    metadata = json.loads((foreign / METADATA_FILE).read_text())
    del metadata["files"]
    (foreign / METADATA_FILE).write_text(json.dumps(metadata))
    refused(["convert", "export", "--ckpt", str(foreign), "--out", str(tmp_path / "hf")], capsys,
            f"{foreign} has no file manifest")
    (foreign / "model" / "extra.pt").write_bytes(b"x")
    metadata["files"] = json.loads((checkpoint / METADATA_FILE).read_text())["files"]
    (foreign / METADATA_FILE).write_text(json.dumps(metadata))
    refused(["convert", "export", "--ckpt", str(foreign), "--out", str(tmp_path / "hf")], capsys,
            "e.g. model/extra.pt")

    trusted = run_job([sys.executable, "-m", "nemo_viper.cli", "convert", "export", "--ckpt", str(tampered),
                       "--out", str(tmp_path / "hf"), "--trust-checkpoint"], capture_output=True, text=True,
                      timeout=300, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert marker.exists(), f"the payload did not run when trusted: {trusted.stderr[-2000:]}"


def test_a_symbolic_link_cannot_take_files_out_of_the_manifest(tmp_path):
    """A crafted checkpoint whose ``model/`` links to a directory outside it (so the walk over its files would not
    enter it, and its manifest need not list ``model/.metadata``), a linked file, and a ``step_N`` that links to
    a foreign directory: each is refused before anything is read from it."""
    from nemo_viper.errors import CheckpointError
    from nemo_viper.models.checkpoint_dir import FORMAT, file_hashes, read_checkpoint_metadata

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".metadata").write_bytes(pickle.dumps(Payload(tmp_path / "PWNED")))
    crafted = tmp_path / "crafted"
    (crafted / "hf").mkdir(parents=True)
    (crafted / "hf" / "config.json").write_text("{}")
    (crafted / "model").symlink_to(elsewhere, target_is_directory=True)
    metadata = {"format": FORMAT, "files": {}}
    metadata["files"] = {"hf/config.json": file_hashes(crafted / "hf")["config.json"]}
    (crafted / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"crafted contains a symbolic link, model -> .*elsewhere"):
        read_checkpoint_metadata(crafted)

    (crafted / "model").unlink()
    (crafted / "model").mkdir()
    (crafted / "model" / ".metadata").symlink_to(elsewhere / ".metadata")
    with pytest.raises(CheckpointError, match=r"symbolic link, model/.metadata ->"):
        read_checkpoint_metadata(crafted)

    step = tmp_path / "checkpoints" / "step_1"
    step.parent.mkdir()
    step.symlink_to(crafted, target_is_directory=True)
    with pytest.raises(CheckpointError, match=r"step_1 is a symbolic link"):
        read_checkpoint_metadata(step)
    assert not (tmp_path / "PWNED").exists()
