"""The README's main job (scripts/tiny_demo.sh) runs end to end and leaves its outputs."""

import subprocess

import pytest
from launch import REPO

pytestmark = pytest.mark.slow


def test_tiny_demo(tmp_path):
    run = tmp_path / "demo"
    result = subprocess.run(["bash", "scripts/tiny_demo.sh", str(run)], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "total log-prob of the response" in result.stdout
    assert (run / "ckpt" / "nemo_viper_checkpoint.json").is_file()
    assert (run / "hf_export" / "model.safetensors").is_file()
