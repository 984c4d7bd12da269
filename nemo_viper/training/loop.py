"""The RL loop of one stage: prompts -> rollouts -> rewards -> GRPO update, with checkpoints and resume.

Every dependency is injected, so the same loop runs the ViPER stages (shard-backed prompts, the BGE-M3
reward) and the toy task of the learning test:

- ``prompts``: a :class:`PromptSource` (task prompts with images and ground truth; checkpointable position);
- ``generator``: a :class:`~nemo_viper.rollout.interface.GenerationBackend` on the current policy;
- ``reward_model``: anything with ViPER's reward interface, ``score(responses, ground_truths, sample_ids,
  truncated) -> list[RewardBreakdown]`` (:class:`~nemo_viper.rewards.ViperReward`).

Each data-parallel rank draws its share of ``prompts_per_step`` prompts per step (refilled under dynamic
sampling, see :func:`collect_groups`). A checkpoint is written every
``save_every`` steps and after the last; a rerun resumes from the latest one (policy, optimizer, step,
prompt position) and continues with the next step. With an ``exit_signal``
(:class:`~nemo_viper.runtime.exit_signal.ExitSignal`), a signal on any rank stops every rank after the step it
arrived in, with a checkpoint of that step (:class:`~nemo_viper.runtime.exit_signal.ExitRequested`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, Sequence

import torch

from nemo_viper.algorithms import dynamic_sampling_keep
from nemo_viper.data.task_prompt import TaskPrompt
from nemo_viper.models.batch import PolicyBatch
from nemo_viper.rewards import RewardBreakdown
from nemo_viper.runtime.collectives import DataParallel, ReduceOp
from nemo_viper.runtime.exit_signal import ExitRequested
from nemo_viper.runtime.metrics import Metric, reduce_metrics
from nemo_viper.rollout.interface import GenerationBackend, GenerationRequest, GenerationResponse
from nemo_viper.training.checkpointing import CheckpointManager
from nemo_viper.training.config import RLConfig
from nemo_viper.training.metrics_log import MetricsLogger
from nemo_viper.training.rollout_batch import RolloutBatch

logger = logging.getLogger(__name__)


class PromptSource(Protocol):
    """Prompts for the loop. A source that skips bad samples may also offer ``skipped_counts()`` (as
    :class:`~nemo_viper.data.prompt_source.ShardPromptSource` does; see :func:`skipped_metrics`)."""

    def next_prompts(self, count: int) -> list[TaskPrompt]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


READ_SKIP_REASONS = ("corrupt_image",)
"""Why a prompt source skips a sample while reading its share (the reasons it may count per rank)."""


def skipped_metrics(prompts: PromptSource, data_parallel: DataParallel) -> dict[str, float]:
    """Samples skipped so far over the whole job, by reason (``data/skipped/<reason>``) and in total
    (``data/skipped``): the dataset's index-time skips (the same on every rank) plus the sum over the
    data-parallel ranks of the read-time skips. Collective over ``data_parallel``; ``{}`` for a source that
    does not count skips."""
    if not hasattr(prompts, "skipped_counts"):
        return {}
    at_index, at_read = prompts.skipped_counts()
    read = torch.tensor([float(at_read.get(reason, 0)) for reason in READ_SKIP_REASONS], dtype=torch.float64)
    read = data_parallel.all_reduce(read)
    totals = dict(at_index)
    for reason, count in zip(READ_SKIP_REASONS, read.tolist()):
        totals[reason] = totals.get(reason, 0) + count
    return {"data/skipped": float(sum(totals.values())), **{f"data/skipped/{k}": float(v) for k, v in totals.items()}}


class RewardModel(Protocol):
    def score(
        self, responses: Sequence[str], ground_truths: Sequence[Sequence[str]], sample_ids: Sequence[str],
        truncated: Sequence[bool] | None = None,
    ) -> list[RewardBreakdown]: ...


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
    images_per_row = []
    for group, (request, samples) in enumerate(zip(requests, responses)):
        image_set, images = -1, 0
        if request.pixel_values is not None:
            images = len(request.image_grid_thw)
            image_set = len(pixel_values)
            pixel_values.append(request.pixel_values)
            grids.append(request.image_grid_thw)
        for sample in samples:
            rows.append(torch.cat([request.prompt_ids, torch.tensor(sample.token_ids, dtype=torch.long)]))
            prompt_lengths.append(len(request.prompt_ids))
            groups.append(group)
            row_ids.append(sample_ids[group])
            image_sets.append(image_set)
            images_per_row.append(images)
            truncated.append(sample.truncated)
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
        sequences = PolicyBatch(input_ids, response_mask, torch.cat(pixel_values), torch.cat(grids), torch.tensor(image_sets),
                                torch.tensor(images_per_row))
    reward_metrics = {
        "format": sum(r.format for r in rewards) / len(rewards),
        "correctness": sum(r.correctness for r in rewards) / len(rewards),
        "precision": sum(r.precision for r in rewards) / len(rewards),
        "recall": sum(r.recall for r in rewards) / len(rewards),
        "answer_sentences": sum(r.num_answer_sentences for r in rewards) / len(rewards),
    }
    reward_metrics["precision_recall_gap"] = reward_metrics["precision"] - reward_metrics["recall"]
    return RolloutBatch(
        sequences=sequences,
        group_index=torch.tensor(groups),
        rewards=torch.tensor([r.total for r in rewards], dtype=torch.float32),
        sample_ids=row_ids,
        truncated=torch.tensor(truncated),
        reward_metrics=reward_metrics,
        sampler_logprobs=sampler_logprobs,
    )


@dataclass
class _Group:
    """One prompt's rollouts: its request, ``n`` responses and their rewards."""

    prompt: TaskPrompt
    request: GenerationRequest
    responses: list[GenerationResponse]
    rewards: list[RewardBreakdown]

    @property
    def has_spread(self) -> bool:
        totals = torch.tensor([r.total for r in self.rewards], dtype=torch.float64)
        return bool(dynamic_sampling_keep(totals, torch.zeros(len(totals), dtype=torch.long)).any())


def _rollout_groups(prompts: PromptSource, generator, reward_model, processor, config: RLConfig, step: int,
                    first_index: int, count: int) -> tuple[list[_Group], float, float]:
    """Draw ``count`` prompts, generate ``n`` responses each and score them. Returns the groups and the
    rollout / reward times. ``first_index``: the global index of the first prompt (its request seed)."""
    started = time.perf_counter()
    batch_prompts = prompts.next_prompts(count)
    requests = [
        GenerationRequest.from_chat(
            processor, prompt.messages, prompt.images, config.n,
            replace(config.sampling, seed=request_seed(config.sampling.seed, step, first_index + i)),
        )
        for i, prompt in enumerate(batch_prompts)
    ]
    responses = generator.generate(requests)
    rollout_time = time.perf_counter() - started
    started = time.perf_counter()
    texts = [sample.text for samples in responses for sample in samples]
    ground_truths = [p.ground_truth for p in batch_prompts for _ in range(config.n)]
    ids = [p.sample_id for p in batch_prompts for _ in range(config.n)]
    truncated = [sample.truncated for samples in responses for sample in samples]
    rewards = reward_model.score(texts, ground_truths, ids, truncated)
    groups = [_Group(p, q, list(r), rewards[i * config.n : (i + 1) * config.n])
              for i, (p, q, r) in enumerate(zip(batch_prompts, requests, responses))]
    return groups, rollout_time, time.perf_counter() - started


def collect_groups(prompts: PromptSource, generator, reward_model, processor, config: RLConfig, step: int,
                   dp_rank: int, dp_world: int, min_over_ranks=None) -> tuple[list[_Group], dict[str, Metric]]:
    """This rank's ``prompts_per_step / dp_world`` groups for one step, refilled under dynamic sampling.

    Without ``grpo.dynamic_sampling``: one round of the rank's share. With it: rounds continue while the
    fewest groups with a reward spread held by any rank (``min_over_ranks(local_count)``, a collective, so
    every rank decides alike) is below the share, at most ``max_sampling_tries`` rounds; a rank already
    full draws nothing more. Then the spread groups come first, topped up with equal-reward ones.

    Metrics (declared reductions): ``dynamic_sampling/tries`` (the same on every rank), the spread and filler
    group counts (summed over the ranks), the rollout and reward times (averaged).
    """
    share = config.prompts_per_rank(dp_world)
    groups, rollout_time, reward_time = _rollout_groups(prompts, generator, reward_model, processor, config, step,
                                                         dp_rank * share, share)
    metrics = {}
    if config.grpo.dynamic_sampling:
        tries = 1
        while True:
            spread = sum(g.has_spread for g in groups)
            fewest = min_over_ranks(spread) if min_over_ranks else spread
            if fewest >= share or tries == config.max_sampling_tries:
                break
            if spread < share:
                first = tries * config.prompts_per_step + dp_rank * share  # distinct seeds per round
                more, t_rollout, t_reward = _rollout_groups(prompts, generator, reward_model, processor, config,
                                                            step, first, share)
                groups += more
                rollout_time, reward_time = rollout_time + t_rollout, reward_time + t_reward
            tries += 1
        kept = [g for g in groups if g.has_spread][:share]
        filler = [g for g in groups if not g.has_spread][: share - len(kept)]
        if len(kept) < share:
            logger.warning("step %d: dynamic sampling found %d of %d groups with a reward spread after %d "
                           "rounds; %d equal-reward groups fill the batch (masked out)",
                           step, len(kept), share, tries, len(filler))
        groups = kept + filler
        metrics = {"dynamic_sampling/tries": Metric.replicated(float(tries)),
                   "dynamic_sampling/spread_groups": Metric.sum(float(len(kept))),
                   "dynamic_sampling/filler_groups": Metric.sum(float(len(filler)))}
    metrics.update({"time/rollout": Metric.mean(rollout_time), "time/reward": Metric.mean(reward_time)})
    return groups, metrics


def run_rl(
    trainer,
    generator: GenerationBackend,
    reward_model: RewardModel,
    prompts: PromptSource,
    processor,
    config: RLConfig,
    run_dir: str | Path,
    progress=None,
    monitor=None,
    exit_signal=None,
) -> list[dict]:
    """Run (or resume) a stage for ``config.steps`` steps. Returns the metrics of the steps run now.

    ``trainer``: a :class:`~nemo_viper.training.grpo.GRPOTrainer`; its ``policy`` (the training interface,
    :class:`~nemo_viper.models.training.PolicyWorker`) gives the data-parallel context, the pad token and the
    checkpoints. ``generator`` generates from the same policy and is told after every update
    (``weights_updated``). ``processor`` (the policy's image-only Qwen2.5-VL processor) turns task prompts
    into token ids (and prepares their images unless the prompt source already did). ``monitor``: a
    :class:`~nemo_viper.training.monitor.StageMonitor` (trackers, sample generations, alerts), told after
    every step on every rank (it acts on rank 0 only). ``exit_signal``: an installed
    :class:`~nemo_viper.runtime.exit_signal.ExitSignal`, asked after every step (a collective); when a rank got
    it, the step's checkpoint is saved (unless it was just saved) and :class:`ExitRequested` is raised.
    """
    import torch.distributed as dist

    policy = trainer.policy
    data_parallel = policy.data_parallel
    run_dir = Path(run_dir)
    checkpoints = CheckpointManager(run_dir / "checkpoints", keep_last=config.keep_last)
    state = checkpoints.restore(policy)
    start = state["step"] if state else 0
    if state:
        prompts.load_state_dict(state["prompts"][data_parallel.rank])
        generator.weights_updated()  # the restored weights, not the initial ones
    is_logging_rank = dist.get_rank() == 0
    metrics_log = MetricsLogger(run_dir, resume_step=start, enabled=is_logging_rank)

    def min_over_ranks(count: int) -> int:  # model-parallel peers hold the same count: over the replicas
        return int(data_parallel.all_reduce(torch.tensor([count], dtype=torch.int64), ReduceOp.MIN)[0])

    history = []
    for step in range(start + 1, config.steps + 1):
        groups, sampling_metrics = collect_groups(prompts, generator, reward_model, processor, config, step,
                                                  data_parallel.rank, data_parallel.size, min_over_ranks)
        rollout = assemble_rollout([g.request for g in groups], [g.responses for g in groups],
                                   [r for g in groups for r in g.rewards], [g.prompt.sample_id for g in groups],
                                   policy.pad_token_id)
        metrics = trainer.step(rollout)
        generator.weights_updated()
        metrics.update(reduce_metrics(sampling_metrics, data_parallel))
        metrics.update(skipped_metrics(prompts, data_parallel))
        metrics_log.log(step, metrics)
        if monitor is not None:
            monitor.after_step(step, metrics, groups)
        history.append(metrics)
        stop = exit_signal is not None and exit_signal.agreed()
        if stop or step % config.save_every == 0 or step == config.steps:
            prompt_states = data_parallel.all_gather_object(prompts.state_dict())
            checkpoints.save(policy, step, {"prompts": prompt_states})
        if progress is not None:
            progress(step, metrics)
        if stop and step < config.steps:
            metrics_log.close()
            raise ExitRequested(step, exit_signal.signum)
    metrics_log.close()
    return history
