"""Worker: GRPO updates on a fixed rollout batch, for several update settings ("cases") and micro-batch sizes in
ONE process (one Megatron start); saves each run's gradients and step metrics.

The batch: 2 prompts (scikit-image photos), 4 responses to the first and 3 others to the second, all of
different lengths, so that micro-batches and data-parallel ranks hold different numbers of tokens and
sequences (a per-micro-batch or per-rank normalisation would change the gradient). On 2 ranks each rank takes
one prompt's group. The cases (:data:`CASES`):

* ``token-mean`` / ``seq-mean-token-mean``: one mini-batch (on-policy: the ratio is exactly 1);
* ``options``: every GRPO option on (Dr.GRPO without the std, dual clip 1.5, k3 KL with beta 0.5 to the frozen
  reference, overlong filtering with one response flagged truncated) and 2 mini-batches: the second update is
  off-policy (the first one moved the weights), so its ratio is not 1 and the clip terms act. The single-rank
  batch is ordered so that its mini-batches are the union of the ranks' mini-batches.

Each case's policy is built afresh for each micro-batch size (the same starting weights). Writes
``OUT/<case>_mbs<N>.pt`` (gradients of the last update, metrics) and with ``--reference`` ``OUT/<case>_reference.pt``:
the gradient of the documented loss of the LAST mini-batch by plain autograd on a policy without DDP or Megatron's
schedule, with the weights the trainer had before its last update and ``pi_old`` / the KL reference from the
starting weights (an independent check of the absolute gradient, clipping included), plus that loss's metrics.

``--never-stepped-resume``: the first run saves a training checkpoint (``OUT/never_stepped``) before its first
optimizer step; the second run overwrites its weights with zeros, restores that checkpoint and then steps, so
its gradients (checked like any run's) prove the restore loaded every weight and kept a fresh optimizer.

``--alone-case`` (same syntax as ``--case``): after the ``--case`` runs on every rank of the launch, every rank
leaves the launch's process group and rank 0 runs these cases alone, in a process group of its own (world size
1: data-parallel size 1), writing to ``OUT/alone/`` (with ``--reference``, its references too). One launch
then serves both a DP=2 and a DP=1 run (one import of Megatron fewer than two launches).
"""

import argparse
import gc
import json
from pathlib import Path

import torch
from PIL import Image
from skimage import data

from nemo_viper.algorithms import (
    AdvantageConfig,
    ClippedPolicyLoss,
    LossNormalizer,
    PolicyLossConfig,
    group_advantages,
    mask_truncated,
)
from nemo_viper.models.batch import PolicyBatch
from nemo_viper.models.checkpoint import optimizer_has_stepped
from nemo_viper.models.logprobs import vocab_parallel_token_logprobs
from nemo_viper.models.policy import PolicyConfig, build_policy
from nemo_viper.models.processor import load_processor
from nemo_viper.training.checkpointing import CheckpointManager
from nemo_viper.models.config import OptimizerSettings
from nemo_viper.training.grpo import GRPOConfig
from nemo_viper.training.stage import build_trainer
from nemo_viper.training.rollout_batch import RolloutBatch

RESPONSES = [
    [
        "<think>look</think><answer>The red car is on the left.</answer>",
        "<answer>A cat.</answer>",
        "<think>I compare both images carefully.</think><answer>Remove the cup.\nAdd a blue sign.</answer>",
        "The dog is brown",
    ],
    [
        "<think>The mug is white and the table is wooden, with a spoon beside it.</think><answer>A white mug of "
        "coffee stands on a wooden table.\nA spoon lies to its right.</answer>",
        "<answer>Coffee.</answer>",
        "<think>hm</think><answer>The cup is blue.</answer>",
    ],
]
REWARDS = [[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.6]]
TRUNCATED = ((1, 0),)  # (prompt, response) flagged as cut at the length limit in the ``options`` case
CASES = {
    "token-mean": {"aggregation": "token-mean", "minibatches": 1, "options": False},
    "seq-mean-token-mean": {"aggregation": "seq-mean-token-mean", "minibatches": 1, "options": False},
    "options": {"aggregation": "token-mean", "minibatches": 2, "options": True},
}


def rollout_batch(hf_dir: str, prompts: list[int], minibatches: int = 1, truncated: tuple = ()) -> RolloutBatch:
    """Rows of ``prompts``' groups; with several prompts, ordered mini-batch by mini-batch (each prompt's rows
    split as ``torch.tensor_split`` splits one rank's rows). ``truncated``: (prompt, response) pairs flagged."""
    processor = load_processor(hf_dir)
    processor.tokenizer.padding_side = "right"
    photos = [data.astronaut(), data.coffee()]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    prompt_text = processor.apply_chat_template(chat, add_generation_prompt=True)
    chunks = [torch.tensor_split(torch.arange(len(RESPONSES[p])), minibatches) for p in prompts]
    order = [(p, int(i)) for m in range(minibatches) for p, chunk in zip(prompts, chunks) for i in chunk[m]]
    texts, images, prompt_lengths, groups, rewards, cut = [], [], [], [], [], []
    for p, i in order:
        image = Image.fromarray(photos[p])
        length = processor(text=[prompt_text], images=[image], return_tensors="pt")["input_ids"].shape[1]
        texts.append(prompt_text + RESPONSES[p][i] + "<|im_end|>")
        images.append(image)
        prompt_lengths.append(length)
        groups.append(p)
        rewards.append(REWARDS[p][i])
        cut.append((p, i) in truncated)
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    positions = torch.arange(inputs["input_ids"].shape[1])
    mask = (positions[None] >= torch.tensor(prompt_lengths)[:, None]) & inputs["attention_mask"].bool()
    return RolloutBatch(
        sequences=PolicyBatch(inputs["input_ids"], mask, inputs["pixel_values"], inputs["image_grid_thw"],
                              images_per_row=torch.ones(len(texts), dtype=torch.long)),  # one image a row
        group_index=torch.tensor(groups),
        rewards=torch.tensor(rewards),
        sample_ids=[f"prompt{g}" for g in groups],
        truncated=torch.tensor(cut),
    )


def grpo_config(case: dict, micro_batch_size: int) -> GRPOConfig:
    options = {"advantage": AdvantageConfig(normalize_by_std=False), "overlong_filtering": True}
    return GRPOConfig(
        loss=PolicyLossConfig(aggregation=case["aggregation"], max_response_length=32,
                              **({"dual_clip_c": 1.5, "kl_beta": 0.5} if case["options"] else {})),
        optimizer=OptimizerSettings(lr=1e-3, clip_grad=0.0, distributed_optimizer=False),
        num_minibatches=case["minibatches"],
        micro_batch_size=micro_batch_size,
        **(options if case["options"] else {}),
    )


def reference_gradients(hf_dir: str, config: GRPOConfig, batch: RolloutBatch,
                        last_weights: dict[str, torch.Tensor]) -> dict:
    """Plain autograd of the aggregated loss of the batch's LAST mini-batch: ``pi_old`` (and the KL reference)
    from a policy built without DDP from ``hf_dir``; then that policy takes ``last_weights`` (the trainer's
    weights during its last update), one forward of the whole batch, :class:`ClippedPolicyLoss` on the last
    mini-batch's rows with their own counts, ``backward``. Returns the gradients and the loss's metrics."""
    policy = build_policy(PolicyConfig(hf_path=hf_dir, precision="fp32"))
    (model,) = policy.chunks
    inputs = batch.sequences.model_inputs(torch.device("cpu"))
    ids = batch.sequences.input_ids
    with torch.no_grad():
        start_logprobs = vocab_parallel_token_logprobs(model(**inputs), ids, 1.0)
        params = dict(model.named_parameters())
        assert params.keys() == last_weights.keys()
        for name, p in params.items():
            p.copy_(last_weights[name])
    logprobs = vocab_parallel_token_logprobs(model(**inputs), ids, 1.0)
    mask = batch.sequences.response_mask.bool()
    if config.overlong_filtering:
        mask = mask_truncated(mask, batch.truncated.bool())
    advantages = group_advantages(batch.rewards, batch.group_index, config.advantage)
    rows = torch.tensor_split(torch.arange(len(advantages)), config.num_minibatches)[-1]
    loss, metrics = ClippedPolicyLoss(config.loss)(
        logprobs[rows], start_logprobs[rows], advantages[rows], mask[rows], LossNormalizer.from_masks([mask[rows]]),
        start_logprobs[rows] if config.loss.kl_beta > 0 else None)
    loss.backward()
    return {"grads": {name: p.grad.detach().clone() for name, p in params.items() if p.requires_grad},
            "metrics": {k: m.value.item() for k, m in metrics.items()}}


def record_weights_before_each_step(policy) -> dict[str, torch.Tensor]:
    """``policy.optimizer.step`` (a :class:`PolicyWorker`'s) also copies the weights it is about to change into the
    returned dict."""
    (model,) = policy.model.chunks
    weights, step = {}, policy.optimizer.step

    def recording_step(*args, **kwargs):
        weights.update({name.removeprefix("module."): p.detach().clone() for name, p in model.named_parameters()})
        return step(*args, **kwargs)

    policy.optimizer.step = recording_step
    return weights


def parse_runs(specs: list[str]) -> list[tuple[str, int]]:
    """``NAME:MBS[,MBS...]`` specs as (case name, micro-batch size) runs, in order."""
    return [(name, int(mbs)) for spec in specs for name, sizes in [spec.split(":")] for mbs in sizes.split(",")]


def run_cases(args, runs: list[tuple[str, int]], out: Path, never_stepped_resume: bool) -> None:
    """Each run on a trainer built afresh from ``args.hf``; saves ``out/<case>_mbs<N>.pt`` from rank 0."""
    import torch.distributed as dist

    out.mkdir(parents=True, exist_ok=True)
    checkpoints = CheckpointManager(out / "never_stepped")
    for index, (name, mbs) in enumerate(runs):
        case = CASES[name]
        config = grpo_config(case, mbs)
        policy_config = PolicyConfig(hf_path=args.hf, precision=args.precision, fp8_recipe=args.fp8_recipe)
        trainer = build_trainer(policy_config, config)
        (model,) = trainer.policy.model.chunks
        world, rank = dist.get_world_size(), dist.get_rank()
        batch = rollout_batch(args.hf, [0, 1] if world == 1 else [rank], case["minibatches"],
                              TRUNCATED if case["options"] else ())
        result = {"reference_loaded": trainer.policy.has_reference}
        if never_stepped_resume and index == 0:
            checkpoints.save(trainer.policy, step=0, trainer_state={"consumed_prompts": 0})
        if never_stepped_resume and index == 1:
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            result["restored_state"] = checkpoints.restore(trainer.policy)
            result["stepped_after_restore"] = optimizer_has_stepped(trainer.policy.optimizer)
        last_weights = record_weights_before_each_step(trainer.policy)
        result["metrics"] = trainer.step(batch)
        result["grads"] = {} if args.metrics_only else {
            name.removeprefix("module."): p.main_grad.detach().clone() for name, p in model.named_parameters()
            if p.requires_grad}
        if rank == 0:
            torch.save(result, out / f"{name}_mbs{mbs}.pt")
            print(json.dumps({"case": name, "micro_batch_size": mbs, **result["metrics"]}), flush=True)
        if args.reference and world == 1 and (name, mbs) == next(run for run in runs if run[0] == name):
            torch.save(reference_gradients(args.hf, config, batch, last_weights), out / f"{name}_reference.pt")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--out", required=True, help="directory; writes <case>_mbs<N>.pt")
    parser.add_argument("--case", action="append", metavar="NAME:MBS[,MBS...]",
                        help=f"a case of {sorted(CASES)} and its micro-batch sizes (repeatable; default token-mean:4)")
    parser.add_argument("--alone-case", action="append", default=[], metavar="NAME:MBS[,MBS...]",
                        help="then run this case on rank 0 alone, in a process group of one (writes OUT/alone/)")
    parser.add_argument("--reference", action="store_true",
                        help="also save each case's plain-autograd gradient (runs in a world of one rank)")
    parser.add_argument("--never-stepped-resume", action="store_true",
                        help="the first run saves before its first step, the second resumes from that checkpoint")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--fp8-recipe", default="blockwise")
    parser.add_argument("--metrics-only", action="store_true", help="save no gradients (large models)")
    args = parser.parse_args()

    from group_of_one import leave_for_a_group_of_one  # a sibling (benchmarks import this file as a module)

    out = Path(args.out)
    run_cases(args, parse_runs(args.case or ["token-mean:4"]), out, args.never_stepped_resume)
    gc.collect()  # the last trainer (its DDP buffers hold the launch's groups) goes before the groups do
    if args.alone_case and leave_for_a_group_of_one():
        run_cases(args, parse_runs(args.alone_case), out / "alone", never_stepped_resume=False)


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
