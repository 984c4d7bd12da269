"""The policy's freeze options, bf16 precision, and the FP8 token-alignment padding, checked in a one-rank process
group: ``policy_forward.py --options-report`` runs them on rank 0 alone after its layouts, in the same launch.

The report:
- ``freeze_*``: which parameter groups are trainable per freeze option; ``bf16_*``: the parameter dtype and
  the max abs difference between bf16 and fp32 log-probs on the given batch;
- ``token_alignment``: padding micro-batches to the FP8 token alignment leaves log-probs and the loss
  gradient unchanged. The FP8 recipes' alignment is taken from PolicyConfig (precision fp8), while the model
  computes in fp32 on CPU: exactly the padding path a GPU run takes.
"""

from dataclasses import replace

import torch

from nemo_viper.models.batch import PolicyBatch
from nemo_viper.models.logprobs import compute_logprobs, vocab_parallel_token_logprobs
from nemo_viper.models.policy import PolicyConfig, build_policy


def trainable_groups(policy) -> dict:
    (model,) = policy.chunks
    model = getattr(model, "module", model)  # unwrap Float16Module
    groups = {
        "vision_tower": [model.visual.patch_embed, model.visual.blocks],
        "projector": [model.visual.merger],
        "language_model": [model.language_model],
    }
    return {name: any(p.requires_grad for m in mods for p in m.parameters()) for name, mods in groups.items()}


def options_report(hf: str, batch: PolicyBatch) -> dict:
    report = {}
    for option in ("freeze_vision_tower", "freeze_projector", "freeze_language_model"):
        report[option] = trainable_groups(build_policy(PolicyConfig(hf_path=hf, precision="fp32", **{option: True})))
    fp32 = compute_logprobs(build_policy(PolicyConfig(hf_path=hf, precision="fp32")), batch)
    bf16_policy = build_policy(PolicyConfig(hf_path=hf, precision="bf16"))
    report["bf16_param_dtype"] = str(next(bf16_policy.chunks[0].parameters()).dtype)
    report["vision_attention"] = getattr(bf16_policy.chunks[0], "module", bf16_policy.chunks[0]).visual.config._attn_implementation
    report["bf16_max_logprob_diff"] = (compute_logprobs(bf16_policy, batch) - fp32).abs().max().item()
    return report


def loss_gradients(policy, batch: PolicyBatch) -> dict:
    """Gradients of the summed masked response log-probs, one forward on ``batch`` as given."""
    (model,) = policy.chunks
    model.zero_grad()
    logits = model(**batch.model_inputs(torch.device("cpu")))
    (vocab_parallel_token_logprobs(logits, batch.input_ids) * batch.response_mask).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def token_alignment_report(hf: str, batch: PolicyBatch) -> dict:
    policy = build_policy(PolicyConfig(hf_path=hf, precision="fp32"))
    columns = batch.input_ids.shape[1]
    assert columns % 16, f"the test batch ({columns} columns) must not be aligned already"

    seen = []
    policy.chunks[0].register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    unpadded = compute_logprobs(policy, batch, micro_batch_size=1)
    report = {"columns": columns, "forward_columns": {}, "logprob_diff": {}, "grad_diff": {}}
    reference_grads = loss_gradients(policy, batch)
    for recipe in ("blockwise", "mxfp8", "tensorwise"):
        seen.clear()
        policy.config = replace(policy.config, precision="fp8", fp8_recipe=recipe)  # alignment only: model is fp32
        padded = compute_logprobs(policy, batch, micro_batch_size=1)
        report["forward_columns"][recipe] = sorted(set(seen))
        report["logprob_diff"][recipe] = (padded - unpadded).abs().max().item()
        assert padded.shape == unpadded.shape
        grads = loss_gradients(policy, batch.pad_columns(policy.config.token_alignment))
        report["grad_diff"][recipe] = max((grads[k] - g).abs().max().item() for k, g in reference_grads.items())
    return report
