"""Worker: padding micro-batches to the FP8 token alignment leaves log-probs and the loss gradient unchanged.

The FP8 recipes' alignment is taken from PolicyConfig (precision fp8), while the model computes in fp32
on CPU: exactly the padding path a GPU run takes. Prints one JSON line.
"""

import argparse
import json
from dataclasses import replace

import torch

from nemo_viper.models.batch import PolicyBatch
from nemo_viper.models.logprobs import compute_logprobs, vocab_parallel_token_logprobs
from nemo_viper.models.policy import PolicyConfig, build_policy


def loss_gradients(policy, batch: PolicyBatch) -> dict:
    """Gradients of the summed masked response log-probs, one forward on ``batch`` as given."""
    (model,) = policy.chunks
    model.zero_grad()
    logits = model(**batch.model_inputs(torch.device("cpu")))
    (vocab_parallel_token_logprobs(logits, batch.input_ids) * batch.response_mask).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--inputs", required=True)
    args = parser.parse_args()
    batch = PolicyBatch(**torch.load(args.inputs))
    policy = build_policy(PolicyConfig(hf_path=args.hf, precision="fp32"))
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
    print(json.dumps(report))


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
