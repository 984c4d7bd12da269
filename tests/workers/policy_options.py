"""Worker: the policy's freeze options and bf16 precision, checked inside one Megatron process.

Prints one JSON line: which parameter groups are trainable per freeze option, and the max abs
difference between bf16 and fp32 log-probs on the given batch.
"""

import argparse
import json

import torch

from nemo_viper.models.batch import PolicyBatch
from nemo_viper.models.logprobs import compute_logprobs
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--inputs", required=True)
    args = parser.parse_args()
    batch = PolicyBatch(**torch.load(args.inputs))
    report = {}
    for option in ("freeze_vision_tower", "freeze_projector", "freeze_language_model"):
        report[option] = trainable_groups(build_policy(PolicyConfig(hf_path=args.hf, precision="fp32", **{option: True})))
    fp32 = compute_logprobs(build_policy(PolicyConfig(hf_path=args.hf, precision="fp32")), batch)
    bf16_policy = build_policy(PolicyConfig(hf_path=args.hf, precision="bf16"))
    report["bf16_param_dtype"] = str(next(bf16_policy.chunks[0].parameters()).dtype)
    report["bf16_max_logprob_diff"] = (compute_logprobs(bf16_policy, batch) - fp32).abs().max().item()
    print(json.dumps(report))


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
