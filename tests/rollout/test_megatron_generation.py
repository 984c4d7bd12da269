"""The Megatron generation backend against transformers' ``generate`` and the policy's log-prob API.

One two-rank launch (gloo, ``layouts``) runs every check at TP=2, then at TP=1 (rank 0 alone in a TP group of
one, with the single-layout checks) and saves the results; the transformers reference runs in this process
(``inputs``, tests/rollout/conftest.py). Tied embeddings (Megatron's output layer without a weight of its own)
generate like transformers in tests/test_full_size.py (the published 3B, at TP1 and TP2).
"""

import pytest
import torch
from launch import run_worker

pytestmark = pytest.mark.slow
LOGPROB_TOLERANCE = 1e-4


def run_layouts(hf_dir, inputs, out, layouts, nproc, gpu=False):
    """``{tp: [result of each TP rank]}`` for the layouts (``TP[:full]``) run one after the other in one launch."""
    run_worker("rollout_generation.py", "--hf", str(hf_dir), "--inputs", str(inputs["path"]), "--out", str(out),
               *[arg for layout in layouts for arg in ("--layout", layout)], nproc=nproc, gpu=gpu)
    sizes = [int(layout.split(":")[0]) for layout in layouts]
    return {tp: [torch.load(f"{out}.tp{tp}.rank{rank}", weights_only=False) for rank in range(tp)] for tp in sizes}


@pytest.fixture(scope="module")
def layouts(tiny_hf_dir, inputs, tmp_path_factory):
    return run_layouts(tiny_hf_dir, inputs, tmp_path_factory.mktemp("generation") / "result.pt", ["2", "1:full"], 2)


@pytest.fixture(scope="module")
def tp1(layouts):
    return layouts[1][0]


@pytest.fixture(scope="module")
def tp2_ranks(layouts):
    return layouts[2]


@pytest.fixture(scope="module")
def gpu_tp1(tiny_hf_dir, inputs, tmp_path_factory):
    """The same checks on the GPU: the policy on its default spec there (Transformer Engine), fp32."""
    return run_layouts(tiny_hf_dir, inputs, tmp_path_factory.mktemp("gpu") / "result.pt", ["1"], 1, gpu=True)[1][0]


@pytest.mark.gpu
def test_te_spec_generation_matches_transformers_without_masks(gpu_tp1, inputs):
    assert [samples[0] for samples in gpu_tp1["greedy"]] == inputs["hf_greedy"]
    assert gpu_tp1["greedy_no_cache"] == gpu_tp1["greedy"]
    assert gpu_tp1["attention_masks_passed"] == 0
    assert gpu_tp1["megatron_attention_calls_cached"] == 0
    # One host sync per decode step (the step's tokens and log-probs); None: the sample ended before 8 tokens.
    assert gpu_tp1["host_syncs_per_decode_step"] is not None and gpu_tp1["host_syncs_per_decode_step"] <= 1
    assert max(gpu_tp1["logprob_error_t1"], gpu_tp1["logprob_error_t07"]) < 1e-3


@pytest.fixture(params=["tp1", "tp2"])
def layout(request):
    return request.getfixturevalue(request.param) if request.param == "tp1" else request.getfixturevalue("tp2_ranks")[0]


def test_greedy_matches_transformers_generate(layout, inputs):
    assert [samples[0] for samples in layout["greedy"]] == inputs["hf_greedy"]


def test_cached_attention_is_the_slot_caches_and_megatron_never_receives_a_mask(layout):
    """Cached generation attends through the slot KV cache (SDPA with each slot's own length); megatron's core
    attention (TE flash/fused kernels and megatron's fused causal softmax ignore explicit masks) runs only in
    the recomputing reference, right-padded and causal, never with a mask; both give the same tokens."""
    assert layout["slot_attention_calls"] > 100
    assert layout["megatron_attention_calls_cached"] == 0
    assert layout["megatron_attention_calls_no_cache"] > 50
    assert layout["attention_masks_passed"] == 0
    assert layout["greedy_no_cache"] == layout["greedy"]


def test_sampling_logprobs_equal_compute_logprobs(layout):
    assert layout["logprob_error_t1"] <= LOGPROB_TOLERANCE
    assert layout["logprob_error_t07"] <= LOGPROB_TOLERANCE


def test_seeds_make_samples_reproducible(layout):
    sampled = layout["sampled"]
    assert [len(samples) for samples in sampled] == [3, 3, 2]
    assert all(len(set(map(tuple, samples))) == len(samples) for samples in sampled)  # n samples differ
    assert layout["sampled_again"] == sampled
    assert layout["sampled_alone"] == sampled[:1]  # batch composition does not matter
    assert layout["sampled_small_batches"] == sampled  # nor does splitting into batches
    assert all(a != b for a, b in zip(layout["sampled_other_seeds"][0], sampled[0]))


def test_samples_leaving_the_batch_early_do_not_disturb_the_others(layout):
    mixed = layout["mixed_budgets"]
    assert [[len(sample) for sample in samples] for samples in mixed] == [[5, 5], [12, 12]]
    assert mixed == layout["mixed_budgets_separately"] == layout["mixed_budgets_no_cache"]
    assert layout["mixed_budgets_refilled"] == mixed  # a freed slot refilled mid-way changes nothing


def test_slots_come_from_free_memory(layout):
    """The slot count is what kv_cache_memory_fraction of the free memory holds (per-rank KV heads and vocab
    shard), capped by max_batch_size and the call's samples; a one-line error when not one slot fits."""
    assert layout["slots_from_memory"] == 10
    assert layout["slots_capped"] == 4
    assert layout["slots_few_samples"] == 3
    assert "kv_cache_memory_fraction=0.5" in layout["no_slot_error"] and "no generation slot" in layout["no_slot_error"]


def test_tensor_parallel_ranks_agree_with_each_other_and_with_tp1(tp1, tp2_ranks):
    assert tp2_ranks[0] == tp2_ranks[1]
    assert tp2_ranks[0]["sampled"] == tp1["sampled"]


def test_eos_and_stop_strings_end_samples(tp1):
    reference = tp1["greedy"][0][0]
    eos = tp1["eos"]["response"]
    assert eos.finish_reason == "eos"
    assert eos.token_ids == reference[: reference.index(tp1["eos"]["token"]) + 1]
    assert len(eos.logprobs) == len(eos.token_ids)

    stop, text = tp1["stop_string"], tp1["greedy_text"]
    excluded, included = tp1["stop_include_False"], tp1["stop_include_True"]
    assert excluded.finish_reason == included.finish_reason == "stop"
    assert excluded.text == text[: text.index(stop)]
    assert included.text == text[: text.index(stop) + len(stop)]
    assert excluded.token_ids == included.token_ids == reference[: len(excluded.token_ids)]
    assert 2 < len(excluded.token_ids) < len(reference)


def test_context_limits(tp1):
    limited = tp1["context_limited"]
    assert limited.finish_reason == "length" and len(limited.token_ids) == 4
    assert limited.token_ids == tp1["greedy"][0][0][:4]
    assert "the context holds" in tp1["too_long_error"] and "request 0" in tp1["too_long_error"]
