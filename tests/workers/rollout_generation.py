"""Worker: generation checks on the Megatron policy at one or more TP layouts, one after another in one group.

Reads the test's requests (``--inputs``). Each ``--layout TP`` (``TP:full`` adds the checks that need only one
layout: EOS, stop strings, context limits) builds the policy afresh (Megatron's parallel state re-initialised),
runs every check with its own counters, and writes ``{check: result}`` to ``--out`` with ``.tp<TP>.rank<r>``
appended: every TP rank of data-parallel rank 0 writes (so the test can see that TP ranks agree). Ranks left
over by TP are data-parallel replicas: they build the policy (the parallel state is collective) and skip the
checks. So on two ranks, ``--layout 2 --layout 1:full`` runs TP2 on both ranks, then TP1 on rank 0 alone (TP
group of one, data-parallel rank 0: the seeds of a one-rank job).
"""

import argparse
import gc
from dataclasses import replace
from types import SimpleNamespace

import torch

from nemo_viper.errors import ConfigError
from nemo_viper.models.batch import PolicyBatch
from nemo_viper.models.logprobs import compute_logprobs
from nemo_viper.models.policy import PolicyConfig, build_policy
from nemo_viper.rollout import GenerationRequest, PromptTooLongError, SamplingParams


def with_sampling(request: GenerationRequest, n: int = 1, **sampling) -> GenerationRequest:
    return replace(request, n=n, sampling=SamplingParams(**sampling))


def tokens_of(responses):
    return [[sample.token_ids for sample in samples] for samples in responses]


def logprob_error(policy, requests, responses, temperature, pad_token_id):
    """Max |sampling-time log-prob - compute_logprobs| over all samples, recomputed in a right-padded batch."""
    rows = [(request, sample) for request, samples in zip(requests, responses) for sample in samples]
    length = max(len(r.prompt_ids) + len(s.token_ids) for r, s in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    expected = torch.zeros((len(rows), length))
    for i, (request, sample) in enumerate(rows):
        start, end = len(request.prompt_ids), len(request.prompt_ids) + len(sample.token_ids)
        input_ids[i, :start], input_ids[i, start:end] = request.prompt_ids, torch.tensor(sample.token_ids)
        mask[i, start:end] = True
        expected[i, start:end] = torch.tensor(sample.logprobs)
    batch = PolicyBatch(
        input_ids,
        mask,
        torch.cat([r.pixel_values for r, _ in rows]),
        torch.cat([r.image_grid_thw for r, _ in rows]),
        images_per_row=torch.tensor([len(r.image_grid_thw) for r, _ in rows]),
    )
    recomputed = compute_logprobs(policy, batch, temperature=temperature, pad_token_id=pad_token_id)
    return (recomputed - expected).abs().max().item()


def host_syncs_per_decode_step(backend, request):
    """CUDA only: synchronising operations (torch's sync debug mode) per extra decode step, from two greedy
    runs of the same prompt that differ only in their token budget (the prefill's syncs cancel out)."""
    import warnings

    counts, lengths = [], []
    for budget in (8, 24):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                response = backend.generate([with_sampling(request, greedy=True, max_new_tokens=budget)])[0][0]
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
        lengths.append(len(response.token_ids))
    return (counts[1] - counts[0]) / (lengths[1] - lengths[0]) if lengths[1] > lengths[0] else None


def slot_counts(policy, backend, tp):
    """Slots for 64-token samples when the free memory is set to hold 10.5 slots at the default fraction (0.5),
    capped by ``max_batch_size`` or by the call's samples, and the error when not one slot fits. A slot's bytes
    are counted here from the HF config: fp32 keys + values of every layer for this rank's KV heads, plus
    40 bytes per entry of this rank's vocabulary shard."""
    import psutil

    from nemo_viper.models.hf_checkpoint import text_config
    from nemo_viper.rollout.megatron_backend import MegatronGenerationBackend, MegatronGenerationConfig

    text = text_config(policy.hf_config)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    kv_bytes = 2 * text["num_hidden_layers"] * (text["num_key_value_heads"] // tp) * head_dim * 64 * 4
    per_slot = kv_bytes + 40 * backend._shard.size
    available = psutil.virtual_memory
    counts = {}
    try:
        psutil.virtual_memory = lambda: SimpleNamespace(available=int(10.5 * per_slot / 0.5))
        counts["slots_from_memory"] = backend.slot_count(1000, 64)
        capped = MegatronGenerationBackend(policy, MegatronGenerationConfig(max_batch_size=4))
        counts["slots_capped"] = capped.slot_count(1000, 64)
        counts["slots_few_samples"] = backend.slot_count(3, 64)
        psutil.virtual_memory = lambda: SimpleNamespace(available=per_slot)
        try:
            backend.slot_count(10, 64)
            counts["no_slot_error"] = None
        except ConfigError as error:
            counts["no_slot_error"] = str(error)
    finally:
        psutil.virtual_memory = available
    return counts


def run_checks(policy, requests, tp: int, full: bool) -> dict:
    """Every generation check on ``policy`` at tensor-parallel size ``tp``; the attention counters and the
    counting patch live for this call only."""
    from nemo_viper.rollout.kv_cache import SlotKVCache
    from nemo_viper.rollout.megatron_backend import MegatronGenerationBackend, MegatronGenerationConfig

    one_image, two_images, text_only = requests
    backend = MegatronGenerationBackend(policy)
    # The attention mask every call of megatron's own core attention receives, by phase, and the calls of
    # the KV cache's attention (which replaces it during cached generation).
    masks_seen = {"cached": [], "no_cache": [], "logprobs": []}
    phase = ["cached"]
    slot_calls = [0]

    def record_mask(module, args, kwargs):
        masks_seen[phase[0]].append(args[3] if len(args) > 3 else kwargs.get("attention_mask"))

    for layer in backend._model.language_model.decoder.layers:
        layer.self_attention.core_attention.register_forward_pre_hook(record_mask, with_kwargs=True)
    attend = SlotKVCache.attend

    def counted_attend(self, *args, **kwargs):
        slot_calls[0] += 1
        return attend(self, *args, **kwargs)

    SlotKVCache.attend = counted_attend
    try:
        result = generation_results(policy, backend, one_image, two_images, text_only, phase, full)
        result.update(slot_counts(policy, backend, tp))
    finally:
        SlotKVCache.attend = attend
    result["slot_attention_calls"] = slot_calls[0]
    result["megatron_attention_calls_cached"] = len(masks_seen["cached"])
    result["megatron_attention_calls_no_cache"] = len(masks_seen["no_cache"])
    result["attention_masks_passed"] = sum(m is not None for masks in masks_seen.values() for m in masks)
    return result


def generation_results(policy, backend, one_image, two_images, text_only, phase, full: bool) -> dict:
    """The generated tokens and log-prob errors of every check; ``phase[0]`` names the phase for the mask hook."""
    from nemo_viper.rollout.megatron_backend import MegatronGenerationBackend, MegatronGenerationConfig

    pad = backend.tokenizer.pad_token_id
    result = {}
    greedy = [with_sampling(r, greedy=True, max_new_tokens=24) for r in (one_image, two_images, text_only)]
    result["greedy"] = tokens_of(backend.generate(greedy))
    if torch.cuda.is_available():
        result["host_syncs_per_decode_step"] = host_syncs_per_decode_step(backend, text_only)
    no_cache = MegatronGenerationBackend(policy, MegatronGenerationConfig(use_kv_cache=False))
    phase[0] = "no_cache"
    result["greedy_no_cache"] = tokens_of(no_cache.generate(greedy))
    phase[0] = "cached"

    sampled = [
        with_sampling(one_image, n=3, seed=11, max_new_tokens=16),
        with_sampling(two_images, n=3, seed=12, max_new_tokens=16),
    ]
    truncated = [with_sampling(one_image, n=2, seed=13, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=16)]
    responses = backend.generate(sampled + truncated)
    result["sampled"] = tokens_of(responses)
    phase[0] = "logprobs"
    result["logprob_error_t1"] = logprob_error(policy, sampled, responses[:2], 1.0, pad)
    result["logprob_error_t07"] = logprob_error(policy, truncated, responses[2:], 0.7, pad)
    phase[0] = "cached"
    result["sampled_again"] = tokens_of(backend.generate(sampled + truncated))
    other_seed = replace(sampled[0], sampling=replace(sampled[0].sampling, seed=99))
    result["sampled_other_seeds"] = tokens_of(backend.generate([other_seed]))
    result["sampled_alone"] = tokens_of(backend.generate(sampled[:1]))
    result["sampled_small_batches"] = tokens_of(
        MegatronGenerationBackend(policy, MegatronGenerationConfig(max_batch_size=2)).generate(sampled + truncated)
    )

    budgets = [
        with_sampling(one_image, n=2, seed=21, max_new_tokens=5),
        with_sampling(two_images, n=2, seed=22, max_new_tokens=12),
    ]
    result["mixed_budgets"] = tokens_of(backend.generate(budgets))  # samples leave the batch at different steps
    phase[0] = "no_cache"
    result["mixed_budgets_no_cache"] = tokens_of(no_cache.generate(budgets))
    phase[0] = "cached"
    # 3 slots for 4 samples of unequal budgets: a slot is refilled while the others are mid-sequence.
    refilled = MegatronGenerationBackend(policy, MegatronGenerationConfig(max_batch_size=3))
    result["mixed_budgets_refilled"] = tokens_of(refilled.generate(budgets))
    result["mixed_budgets_separately"] = [tokens_of(backend.generate([request]))[0] for request in budgets]

    if full:
        reference = result["greedy"][0][0]
        text = backend.tokenizer.decode(reference, skip_special_tokens=True)
        result["greedy_text"] = text
        eos_token = reference[5]
        eos_backend = MegatronGenerationBackend(policy, MegatronGenerationConfig(eos_token_ids=(eos_token,)))
        result["eos"] = {"token": eos_token, "response": eos_backend.generate(greedy[:1])[0][0]}
        after_two_tokens = len(backend.tokenizer.decode(reference[:2], skip_special_tokens=True))
        # the first 3-character window without whitespace that first occurs after the first two tokens
        windows = (text[i : i + 3] for i in range(after_two_tokens, len(text) - 2))
        stop = next(w for w in windows if not any(c.isspace() for c in w) and text.index(w) >= after_two_tokens)
        result["stop_string"] = stop
        for include in (False, True):
            request = with_sampling(
                one_image, greedy=True, max_new_tokens=24, stop_strings=(stop,), include_stop_string=include
            )
            result[f"stop_include_{include}"] = backend.generate([request])[0][0]
        prompt_length = len(one_image.prompt_ids)
        short = MegatronGenerationBackend(policy, MegatronGenerationConfig(max_context_length=prompt_length + 4))
        result["context_limited"] = short.generate(greedy[:1])[0][0]
        too_short = MegatronGenerationBackend(policy, MegatronGenerationConfig(max_context_length=prompt_length))
        try:
            too_short.generate(greedy)
            result["too_long_error"] = None
        except PromptTooLongError as error:
            result["too_long_error"] = str(error)

    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layout", action="append", required=True, metavar="TP[:full]")
    args = parser.parse_args()

    requests = torch.load(args.inputs, weights_only=False)["requests"]
    for layout in args.layout:
        tp, _, full = layout.partition(":")
        policy = build_policy(PolicyConfig(hf_path=args.hf, tensor_parallel=int(tp), precision="fp32"))
        from megatron.core import parallel_state  # (after the build: it prepares megatron's import)

        if parallel_state.get_data_parallel_rank() == 0:
            result = run_checks(policy, requests, int(tp), full == "full")
            rank = parallel_state.get_tensor_model_parallel_rank()
            torch.save(result, f"{args.out}.tp{tp}.rank{rank}")
        del policy
        gc.collect()


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
