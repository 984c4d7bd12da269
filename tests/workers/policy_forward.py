"""Worker: build (or load) the Megatron policy at a TP/PP layout and record its outputs on a batch.

Writes ``{"logits": [B, S, V] (vocab gathered, for the test's comparison only), "logprobs": [B, S]}``
from the rank that holds the last pipeline stage and TP rank 0.
"""

import argparse

import torch

from nemo_viper.models.logprobs import PolicyBatch, compute_logprobs, run_forward


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", required=True, help="torch file with input_ids, response_mask, pixel_values, image_grid_thw")
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf")
    parser.add_argument("--ckpt")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    args = parser.parse_args()

    layout = dict(tensor_parallel=args.tp, pipeline_parallel=args.pp, precision="fp32")
    if args.ckpt:
        from nemo_viper.models.checkpoint import load_policy

        policy = load_policy(args.ckpt, **layout)
    else:
        from nemo_viper.models.policy import PolicyConfig, build_policy

        policy = build_policy(PolicyConfig(hf_path=args.hf, **layout))

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch = PolicyBatch(**torch.load(args.inputs))
    logits = run_forward(policy, batch, lambda out, mb: gather_from_tensor_model_parallel_region(out),
                         micro_batch_size=args.micro_batch_size)
    logprobs = compute_logprobs(policy, batch, micro_batch_size=args.micro_batch_size)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save({"logits": logits, "logprobs": logprobs}, args.out)


if __name__ == "__main__":
    main()
