"""Worker: build (or load) the Megatron policy at several TP/PP layouts in turn and record its outputs on a batch.

Each ``--layout NAME:SOURCE:TP:PP:MICRO_BATCH_SIZE`` (SOURCE ``hf`` builds from ``--hf``, ``ckpt`` loads
``--ckpt``) runs in this one process group, one after the other (Megatron's parallel state is re-initialised
per layout; ranks left over by TP x PP are data-parallel replicas computing the same batch). For each it writes
``{"logits": [B, S, V] (vocab gathered, for the test's comparison only), "logprobs": [B, S]}`` to
``--out/NAME.pt`` from the rank that holds the last pipeline stage, TP rank 0 and DP rank 0.

``--options-report FILE``: then rank 0 alone, in a process group of one (``group_of_one.py``), runs the
freeze-option, bf16 and FP8 token-alignment checks of ``policy_options.py`` on the same batch and writes
their report to FILE as JSON.
"""

import argparse
import gc
import json
from pathlib import Path

import torch

from group_of_one import leave_for_a_group_of_one
from policy_options import options_report, token_alignment_report

from nemo_viper.models.batch import PolicyBatch
from nemo_viper.models.logprobs import compute_logprobs, run_forward


def build(source: str, args, **layout):
    if source == "ckpt":
        from nemo_viper.models.checkpoint import load_policy

        return load_policy(args.ckpt, **layout)
    from nemo_viper.models.policy import PolicyConfig, build_policy

    return build_policy(PolicyConfig(hf_path=args.hf, **layout))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", required=True, help="torch file with input_ids, response_mask, pixel_values, image_grid_thw")
    parser.add_argument("--out", required=True, help="directory for NAME.pt")
    parser.add_argument("--hf")
    parser.add_argument("--ckpt")
    parser.add_argument("--layout", action="append", required=True, help="NAME:SOURCE:TP:PP:MICRO_BATCH_SIZE")
    parser.add_argument("--options-report", help="then the policy_options.py checks on rank 0 alone; JSON file")
    args = parser.parse_args()

    batch = PolicyBatch(**torch.load(args.inputs))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for spec in args.layout:
        name, source, tp, pp, micro_batch_size = spec.split(":")
        micro_batch_size = int(micro_batch_size)
        policy = build(source, args, tensor_parallel=int(tp), pipeline_parallel=int(pp), precision="fp32")
        from megatron.core import parallel_state  # (after the build: it prepares megatron's import)
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        logits = run_forward(policy, batch, lambda out, mb: gather_from_tensor_model_parallel_region(out),
                             micro_batch_size=micro_batch_size)
        logprobs = compute_logprobs(policy, batch, micro_batch_size=micro_batch_size)
        if (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                and parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank() == 0):
            torch.save({"logits": logits, "logprobs": logprobs}, Path(args.out) / f"{name}.pt")
        del policy, logits, logprobs
        gc.collect()
    if args.options_report and leave_for_a_group_of_one():
        report = {**options_report(args.hf, batch), "token_alignment": token_alignment_report(args.hf, batch)}
        Path(args.options_report).write_text(json.dumps(report))


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
