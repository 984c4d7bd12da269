"""The tiny diffusion pipelines are the same whichever process builds them: each synthesis output directory
builds its own copy, so a tokenizer that changed from build to build would give other edits, and other shards,
for the same seed (``tests/test_slurm_cluster.py`` compares a Slurm job's stage-2 dataset with a local rerun's)."""

import subprocess
import sys

BUILD = ("from nemo_viper.synthesis.tiny_diffusion import build_clip_tokenizer; "
         "print(build_clip_tokenizer().backend_tokenizer.to_str())")  # vocabulary, merges and all settings


def test_the_tiny_clip_tokenizer_is_the_same_in_every_process():
    """Two processes (each its own hash seeds, which ordered the trainer's word-final tokens) build one
    vocabulary and one merge list."""
    builds = {subprocess.run([sys.executable, "-c", BUILD], capture_output=True, text=True, check=True).stdout
              for _ in range(2)}
    assert len(builds) == 1
