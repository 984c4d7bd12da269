"""Worker (GPU): the tiny policy on the GPU's default layer spec in bf16 and FP8 against fp32, the collectives
helper on an NCCL group, and a cross-spec checkpoint (saved with the local spec) loaded on the TE spec.
Prints one JSON line."""

import argparse
import json

import torch

from nemo_viper.models.checkpoint import load_model_weights, save_policy
from nemo_viper.models.batch import PolicyBatch
from nemo_viper.models.logprobs import compute_logprobs
from nemo_viper.models.policy import Accelerator, PolicyConfig, build_policy, check_precision


def main():
    import torch.distributed as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    batch = PolicyBatch(**torch.load(args.inputs))
    report = {}
    reference = build_policy(PolicyConfig(hf_path=args.hf, precision="fp32", layer_spec="local"))
    fp32 = compute_logprobs(reference, batch)
    local_ckpt = save_policy(reference, f"{args.out}/local")

    from nemo_viper.runtime import collectives

    group = dist.group.WORLD
    report["nccl_backend"] = dist.get_backend(group)
    report["cpu_tensor_travels_on"] = str(collectives.group_device(group, torch.ones(2)))
    counts = torch.tensor([3.0, 1.0], dtype=torch.float64)
    try:
        dist.all_reduce(counts)  # the defect the helper exists for: NCCL rejects CPU tensors
        report["raw_nccl_cpu_all_reduce"] = "accepted"
    except (RuntimeError, ValueError) as error:
        report["raw_nccl_cpu_all_reduce"] = type(error).__name__

    accelerator = Accelerator.detect()
    precisions = [("bf16", "blockwise")] + [("fp8", r) for r in ("blockwise", "mxfp8", "tensorwise")]
    for precision, recipe in precisions:
        try:
            spec = check_precision(precision, recipe, "auto", accelerator)
        except Exception as error:  # noqa: BLE001 - recorded: not every GPU runs every recipe
            report[f"{precision}_{recipe}"] = {"unsupported": str(error)}
            continue
        policy = build_policy(PolicyConfig(hf_path=args.hf, precision=precision, fp8_recipe=recipe), load_weights=False)
        load_model_weights(policy, local_ckpt)  # a local-spec checkpoint on the TE spec
        diff = (compute_logprobs(policy, batch) - fp32).abs().max().item()
        report[f"{precision}_{recipe}"] = {"layer_spec": spec, "built_spec": policy.layer_spec, "max_diff": diff}
    print(json.dumps(report))


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
