"""The RL loop of one stage: prompts -> rollouts -> rewards -> GRPO update, with checkpoints and resume.

Every dependency is injected, so the same loop runs the ViPER stages (shard-backed prompts, the BGE-M3
reward) and the toy task of the learning test:

- ``prompts``: a :class:`PromptSource` (task prompts with images and ground truth; checkpointable position);
- ``generator``: a :class:`~nemo_viper.rollout.interface.GenerationBackend` on the current policy;
- ``reward_model``: anything with ViPER's reward interface, ``score(responses, ground_truths, sample_ids,
  truncated) -> list[RewardBreakdown]`` (:class:`~nemo_viper.rewards.ViperReward`).

Each data-parallel rank draws its own ``prompts_per_step`` prompts. A checkpoint is written every
``save_every`` steps and after the last; a rerun resumes from the latest one (policy, optimizer, step,
prompt position) and continues with the next step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from nemo_viper.models.hf_checkpoint import text_config
from nemo_viper.models.logprobs import PolicyBatch
from nemo_viper.rewards import RewardBreakdown
from nemo_viper.runtime import collectives
from nemo_viper.rollout.interface import GenerationBackend, GenerationRequest, GenerationResponse, SamplingParams
from nemo_viper.training.checkpointing import CheckpointManager
from nemo_viper.training.metrics_log import MetricsLogger
from nemo_viper.training.rollout_batch import RolloutBatch


@dataclass
class TaskPrompt:
    """One RL prompt: chat messages (images as ``{"type": "image"}`` parts), its images, its ground truth.

    ``images``: PIL images, or the prompt's preprocessed :class:`~nemo_viper.data.images.PromptImages`
    (what :class:`~nemo_viper.data.prompt_source.ShardPromptSource` provides), shared by all its rollouts.
    """

    sample_id: str
    messages: list[dict]
    images: Any = field(default_factory=list)
    ground_truth: list[str] = field(default_factory=list)


class PromptSource(Protocol):
    """Prompts for the loop. A source that skips bad samples may also offer ``skipped_counts()`` (as
    :class:`~nemo_viper.data.prompt_source.ShardPromptSource` does; see :func:`skipped_metrics`)."""

    def next_prompts(self, count: int) -> list[TaskPrompt]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


READ_SKIP_REASONS = ("corrupt_image",)
"""Why a prompt source skips a sample while reading its share (the reasons it may count per rank)."""


def skipped_metrics(prompts: PromptSource, dp_group) -> dict[str, float]:
    """Samples skipped so far over the whole job, by reason (``data/skipped/<reason>``) and in total
    (``data/skipped``): the dataset's index-time skips (the same on every rank) plus the sum over the
    data-parallel ranks of the read-time skips. Collective over ``dp_group``; ``{}`` for a source that does not
    count skips."""
    if not hasattr(prompts, "skipped_counts"):
        return {}
    at_index, at_read = prompts.skipped_counts()
    read = torch.tensor([float(at_read.get(reason, 0)) for reason in READ_SKIP_REASONS], dtype=torch.float64)
    read = collectives.all_reduce(read, group=dp_group)
    totals = dict(at_index)
    for reason, count in zip(READ_SKIP_REASONS, read.tolist()):
        totals[reason] = totals.get(reason, 0) + count
    return {"data/skipped": float(sum(totals.values())), **{f"data/skipped/{k}": float(v) for k, v in totals.items()}}


class RewardModel(Protocol):
    def score(
        self, responses: Sequence[str], ground_truths: Sequence[Sequence[str]], sample_ids: Sequence[str],
        truncated: Sequence[bool] | None = None,
    ) -> list[RewardBreakdown]: ...


@dataclass(frozen=True)
class RLConfig:
    """Loop settings (SPEC §7 defaults: n = 5, temperature 1.0, top-p 1.0, 1024 new tokens)."""

    steps: int
    prompts_per_step: int = 4
    n: int = 5
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0, max_new_tokens=1024))
    save_every: int = 50
    keep_last: int = 2
    seed: int = 0


def request_seed(base: int, step: int, prompt_index: int) -> int:
    """Sampling seed of one prompt at one step: reproducible and distinct across steps and prompts."""
    return (base * 1_000_003 + step * 100_003 + prompt_index) % (2**31 - 1)


def assemble_rollout(
    requests: Sequence[GenerationRequest],
    responses: Sequence[Sequence[GenerationResponse]],
    rewards: Sequence[RewardBreakdown],
    sample_ids: Sequence[str],
    pad_token_id: int,
) -> RolloutBatch:
    """Rows = prompt + response tokens (right-padded), grouped by request. A request's images are stored once
    and shown by all its rows (:class:`PolicyBatch`'s shared layout): no copy per response."""
    rows, prompt_lengths, groups, row_ids, image_sets, pixel_values, grids, truncated = [], [], [], [], [], [], [], []
    for group, (request, samples) in enumerate(zip(requests, responses)):
        image_set = -1
        if request.pixel_values is not None:
            image_set = len(pixel_values)
            pixel_values.append(request.pixel_values)
            grids.append(request.image_grid_thw)
        for sample in samples:
            rows.append(torch.cat([request.prompt_ids, torch.tensor(sample.token_ids, dtype=torch.long)]))
            prompt_lengths.append(len(request.prompt_ids))
            groups.append(group)
            row_ids.append(sample_ids[group])
            image_sets.append(image_set)
            truncated.append(sample.finish_reason == "length")
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    sampler_logprobs = torch.zeros((len(rows), length), dtype=torch.float32)
    samples = [sample for group in responses for sample in group]
    for i, (row, start, sample) in enumerate(zip(rows, prompt_lengths, samples)):
        input_ids[i, : len(row)] = row
        response_mask[i, start : len(row)] = True
        sampler_logprobs[i, start : len(row)] = torch.tensor(sample.logprobs, dtype=torch.float32)
    sequences = PolicyBatch(input_ids, response_mask)
    if pixel_values:
        sequences = PolicyBatch(input_ids, response_mask, torch.cat(pixel_values), torch.cat(grids), torch.tensor(image_sets))
    reward_metrics = {
        "format": sum(r.format for r in rewards) / len(rewards),
        "correctness": sum(r.correctness for r in rewards) / len(rewards),
        "recall": sum(r.recall for r in rewards) / len(rewards),
        "answer_sentences": sum(r.num_answer_sentences for r in rewards) / len(rewards),
    }
    return RolloutBatch(
        sequences=sequences,
        group_index=torch.tensor(groups),
        rewards=torch.tensor([r.total for r in rewards], dtype=torch.float32),
        sample_ids=row_ids,
        truncated=torch.tensor(truncated),
        reward_metrics=reward_metrics,
        sampler_logprobs=sampler_logprobs,
    )


def run_rl(
    trainer,
    generator: GenerationBackend,
    reward_model: RewardModel,
    prompts: PromptSource,
    processor,
    config: RLConfig,
    run_dir: str | Path,
    progress=None,
) -> list[dict]:
    """Run (or resume) a stage for ``config.steps`` steps. Returns the metrics of the steps run now.

    ``processor`` (the policy's image-only Qwen2.5-VL processor) turns task prompts into token ids (and
    prepares their images unless the prompt source already did).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    run_dir = Path(run_dir)
    checkpoints = CheckpointManager(run_dir / "checkpoints", keep_last=config.keep_last)
    state = checkpoints.restore(trainer)
    start = state["step"] if state else 0
    if state:
        prompts.load_state_dict(state["prompts"][parallel_state.get_data_parallel_rank()])
        generator.weights_updated()  # the restored weights, not the initial ones
    is_logging_rank = dist.get_rank() == 0
    logger = MetricsLogger(run_dir, resume_step=start, enabled=is_logging_rank)
    pad_token_id = text_config(trainer.policy.hf_config).get("pad_token_id") or 0
    dp_rank = parallel_state.get_data_parallel_rank()
    history = []
    for step in range(start + 1, config.steps + 1):
        started = time.perf_counter()
        batch_prompts = prompts.next_prompts(config.prompts_per_step)
        first_index = dp_rank * config.prompts_per_step
        requests = [
            GenerationRequest.from_chat(
                processor,
                prompt.messages,
                prompt.images,
                config.n,
                replace(config.sampling, seed=request_seed(config.seed, step, first_index + i)),
            )
            for i, prompt in enumerate(batch_prompts)
        ]
        responses = generator.generate(requests)
        rollout_time = time.perf_counter() - started

        started = time.perf_counter()
        texts = [sample.text for samples in responses for sample in samples]
        ground_truths = [p.ground_truth for p in batch_prompts for _ in range(config.n)]
        ids = [p.sample_id for p in batch_prompts for _ in range(config.n)]
        truncated = [sample.finish_reason == "length" for samples in responses for sample in samples]
        rewards = reward_model.score(texts, ground_truths, ids, truncated)
        reward_time = time.perf_counter() - started

        rollout = assemble_rollout(requests, responses, rewards, [p.sample_id for p in batch_prompts], pad_token_id)
        metrics = trainer.step(rollout)
        generator.weights_updated()
        metrics.update({"time/rollout": rollout_time, "time/reward": reward_time})
        metrics.update(skipped_metrics(prompts, parallel_state.get_data_parallel_group()))
        logger.log(step, metrics)
        history.append(metrics)
        if step % config.save_every == 0 or step == config.steps:
            prompt_states = collectives.all_gather_object(
                prompts.state_dict(), group=parallel_state.get_data_parallel_group()
            )
            checkpoints.save(trainer, step, {"prompts": prompt_states})
        if progress is not None:
            progress(step, metrics)
    logger.close()
    return history


