"""One RL stage as a job: ``nemo-viper train --stage {1,2}``.

Stage 1 trains on ``caption_refine`` shards, stage 2 on ``visual_op`` shards, with the same settings.
Everything cheap is validated first (dataset manifest and task, policy path, layout, image processor
settings); then the policy is built for training, the generator is set up
(:func:`~nemo_viper.rollout.backends.build_backend`: the Megatron backend shares the policy's weights; the vLLM
backend, ``rollout.backend: vllm``, is a colocated engine refitted from them, its context the stage's prompt
and response budgets), a
:class:`~nemo_viper.data.prompt_source.ShardPromptSource` prepares each data-parallel rank's prompts ahead
of the loop (images through DALI), the ViPER reward scores the rollouts, and
:func:`~nemo_viper.training.loop.run_rl` runs or resumes the stage under ``out/``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from nemo_viper.data.images import ImageProcessingConfig, QwenImagePreprocessor, resolve_backend
from nemo_viper.errors import ConfigError
from nemo_viper.evaluation.heldout import HeldoutConfig
from nemo_viper.models.checkpoint_dir import policy_paths
from nemo_viper.models.hf_checkpoint import check_parallel_layout, read_qwen25_vl_config
from nemo_viper.runtime.distributed import ParallelLayout
from nemo_viper.models.policy import PolicyOptions
from nemo_viper.rewards import RewardConfig
from nemo_viper.runtime import collectives
from nemo_viper.runtime.collectives import DataParallel
from nemo_viper.runtime.exit_signal import parse_signal
from nemo_viper.rollout.interface import SamplingParams
from nemo_viper.training.grpo import GRPOConfig, GRPOTrainer
from nemo_viper.rollout.backends import check_installed as check_backend_installed
from nemo_viper.rollout.config import GenerationBackendConfig, check_rollout_layout
from nemo_viper.synthesis.config import VLMConfig
from nemo_viper.training.loop import RLConfig
from nemo_viper.training.trackers import LoggerConfig
from nemo_viper.training.trackers import check_installed as check_trackers_installed

log = logging.getLogger(__name__)

STAGE_TASKS = {1: "caption_refine", 2: "visual_op"}


@dataclass(frozen=True)
class StageConfig:
    """One ``train`` job: which stage, data, starting policy and output, and the run config's sections it
    reads (``model`` options, ``parallel.tensor``/``pipeline``, ``rl``, ``rollout``, ``reward``), unchanged, and
    synthesis's ``vlm.caption_tokens`` (stage-1 prompts show a caption: part of the prompt budget) and
    ``cluster.exit_signal``."""

    stage: int
    data: str
    policy: str  # a policy checkpoint dir (nemo_viper) or a Hugging Face Qwen2.5-VL dir
    out: str
    rl: RLConfig = field(default_factory=RLConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    model: PolicyOptions = field(default_factory=PolicyOptions)
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    rollout: GenerationBackendConfig = field(default_factory=GenerationBackendConfig)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)  # self-evaluation split, scored before/after
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # trackers, sample generations, alerts
    run_config: dict = field(default_factory=dict, repr=False, compare=False)  # logged once to the trackers
    caption_tokens: int = VLMConfig.caption_tokens
    # the run's scores across rounds (:mod:`nemo_viper.evaluation.progress`): its directory, the label of the
    # starting policy scored before the first step (this job then chooses the fixed set from its held-out split)
    # and of the final policy scored after the last; empty: not scored
    progress_dir: str = ""
    progress_start: str = ""
    progress_final: str = ""
    exit_signal: Optional[str] = None  # cluster.exit_signal: stop with a checkpoint on it (ExitSignal); None = no

    def __post_init__(self):
        if self.exit_signal is not None:
            parse_signal("cluster.exit_signal", self.exit_signal)
        if self.stage not in STAGE_TASKS:
            raise ConfigError(f"stage={self.stage} must be 1 or 2")
        if (self.progress_start or self.progress_final) and not self.progress_dir:
            raise ConfigError("--progress-start/--progress-final need --progress-dir (where the run's scores across "
                              "rounds are kept)")
        if self.progress_start and not self.heldout.enabled:
            raise ConfigError(f"--progress-start={self.progress_start} chooses the fixed held-out set from this "
                              "stage's held-out split, but eval.heldout.count and eval.heldout.fraction are 0")
        check_rollout_layout(self.rollout.backend, self.pipeline_parallel)


def build_trainer(policy_config, config: GRPOConfig, sampling: SamplingParams = SamplingParams(),
                  init_checkpoint=None, hf_weights: bool = True) -> GRPOTrainer:
    """The Megatron policy built for training (:func:`~nemo_viper.models.training.build_policy_worker`) and
    its GRPO trainer. Weights from ``policy_config.hf_path`` or the policy checkpoint ``init_checkpoint``; a
    frozen KL reference only with ``config.loss.kl_beta > 0``. ``sampling``: how the rollouts are drawn
    (log-probs are taken at its temperature; its ``max_new_tokens`` is the ``L`` of
    ``seq-mean-token-sum-norm`` unless the loss sets one). ``hf_weights=False``: random weights
    (:func:`~nemo_viper.models.training.build_policy_worker`)."""
    from nemo_viper.models.training import build_policy_worker

    policy = build_policy_worker(policy_config, config.optimizer, with_reference=config.loss.kl_beta > 0,
                                 init_checkpoint=init_checkpoint, hf_weights=hf_weights)
    return GRPOTrainer(policy, config, sampling)


def rl_image_config(hf_dir: str | Path, min_pixels: int, max_pixels: int) -> ImageProcessingConfig:
    """The checkpoint's image processor settings with the run's pixel budget instead of the processor's own
    (Qwen2.5-VL publishes ``max_pixels`` = 12,845,056: up to 16,384 tokens per image). The prompts' images
    are prepared once with it, and rollouts and training reuse them: every phase sees the same budget."""
    return replace(ImageProcessingConfig.from_pretrained(hf_dir), min_pixels=min_pixels, max_pixels=max_pixels)


def run_stage(config: StageConfig, exit_signal=None) -> list[dict]:
    """Validate, build and run (or resume) one RL stage. Returns the metrics of the steps run now.

    ``exit_signal``: an installed :class:`~nemo_viper.runtime.exit_signal.ExitSignal`; when it arrives, the loop
    saves and raises :class:`~nemo_viper.runtime.exit_signal.ExitRequested` (the "after" self-evaluation is
    left to the run that finishes the stage)."""
    from nemo_viper.data.shards import DatasetError, ShardDataset
    from nemo_viper.models.checkpoint_dir import read_checkpoint_metadata
    from nemo_viper.models.policy import Accelerator, check_precision

    check_precision(config.model.precision, config.model.fp8_recipe, config.model.layer_spec, Accelerator.detect())
    dataset = ShardDataset(config.data)
    expected = STAGE_TASKS[config.stage]
    if dataset.task != expected:
        raise ConfigError(f"stage {config.stage} trains on {expected!r} data but {config.data} holds {dataset.task!r}")
    if len(dataset) == 0:
        raise DatasetError(f"dataset {config.data} holds no usable sample (skipped when indexing: "
                           f"{dict(dataset.skipped) or 'none'})")
    if dataset.skipped:
        log.warning("dataset %s: %d usable samples; %d skipped when indexing: %s", config.data, len(dataset),
                    sum(dataset.skipped.values()), dict(dataset.skipped))
    hf_dir, checkpoint = policy_paths(config.policy)
    if checkpoint is not None:
        read_checkpoint_metadata(checkpoint)
    hf_config = read_qwen25_vl_config(hf_dir)
    check_parallel_layout(hf_config, config.tensor_parallel, config.pipeline_parallel)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config.rl.prompts_per_rank(ParallelLayout(config.tensor_parallel, config.pipeline_parallel).data_parallel(world))
    image_config = rl_image_config(hf_dir, config.rl.min_pixels, config.rl.max_pixels)
    image_backend = resolve_backend(config.rl.image_backend)
    check_backend_installed(config.rollout, "rollout.backend")
    check_trackers_installed(config.logger)

    from megatron.core import parallel_state  # heavy imports only after the checks above
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from nemo_viper.models.policy import PolicyConfig
    from nemo_viper.models.processor import load_processor
    from nemo_viper.rewards import ViperReward
    from nemo_viper.planning.recipe import rl_context_length
    from nemo_viper.rollout.backends import build_backend
    from nemo_viper.training.loop import run_rl
    from nemo_viper.training.monitor import StageMonitor

    policy_config = PolicyConfig(hf_path=str(hf_dir), tensor_parallel=config.tensor_parallel,
                                 pipeline_parallel=config.pipeline_parallel, **config.model.options())
    rl = config.rl
    trainer = build_trainer(policy_config, rl.grpo, rl.sampling, init_checkpoint=checkpoint)
    policy = trainer.policy.model  # the generator plugs in on the trained policy's weights
    # the fixed held-out set across rounds holds stage-1 prompts, which a stage-2 job answers too
    stages = set(STAGE_TASKS) if config.progress_dir else {config.stage}
    context = max(rl_context_length(stage, config.caption_tokens, rl.max_pixels, rl.sampling.max_new_tokens,
                                    hf_config) for stage in stages)
    generator = build_backend(config.rollout, policy, rl.sampling.seed, context_length=context)
    preprocessor = QwenImagePreprocessor(image_config, image_backend)  # after build_trainer chose this rank's GPU
    prompts, heldout = stage_prompts(config, dataset, preprocessor, trainer.policy.data_parallel)
    processor = load_processor(hf_dir)
    reward = ViperReward(config.reward)
    self_eval = _SelfEvaluation(config, dataset, heldout, preprocessor, generator, reward, processor,
                                trainer.policy.data_parallel)
    across_rounds = _AcrossRounds(config, self_eval) if config.progress_dir else None
    columns = (TextColumn(f"RL stage {config.stage}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("reward {task.fields[reward]:.3f}"), TimeRemainingColumn())
    show = parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0
    import torch.distributed as dist

    monitor = StageMonitor(config.logger, config.out, config.run_config, config.reward.alert_gap,
                           enabled=dist.get_rank() == 0)
    try:
        with prompts, Progress(*columns, disable=not show) as progress:
            self_eval.record("before")
            if across_rounds:
                across_rounds.record("before")
            task = progress.add_task("steps", total=config.rl.steps, reward=0.0)

            def advance(step: int, metrics: dict) -> None:
                progress.update(task, completed=step, reward=metrics["reward/mean"])

            history = run_rl(trainer, generator, reward, prompts, processor, config.rl, config.out, progress=advance,
                             monitor=monitor, exit_signal=exit_signal)
            self_eval.record("after")
            if across_rounds:
                across_rounds.record("after")
    finally:
        monitor.close()
    skipped = {k: v for k, v in (history[-1] if history else {}).items() if k.startswith("data/skipped/") and v}
    if skipped and show:
        log.warning("RL stage %d skipped %d samples in total: %s", config.stage, sum(skipped.values()), skipped)
    return history


def stage_prompts(config: StageConfig, dataset, preprocessor, data_parallel: DataParallel):
    """This data-parallel rank's training prompts (a :class:`~nemo_viper.data.prompt_source.ShardPromptSource`)
    and the stage's held-out split (sorted dataset indices), which the prompts never include."""
    from nemo_viper.data.prompt_source import ShardPromptSource
    from nemo_viper.evaluation.heldout import heldout_indices

    heldout = heldout_indices([dataset.record(i).id for i in range(len(dataset))], config.heldout)
    prompts = ShardPromptSource(dataset, preprocessor, seed=config.rl.sampling.seed, dp_rank=data_parallel.rank,
                                dp_world=data_parallel.size, prefetch=config.rl.prefetch_prompts,
                                exclude=frozenset(heldout))
    return prompts, heldout


class _SelfEvaluation:
    """Scores the policy on the held-out split (:mod:`nemo_viper.evaluation.heldout`) into ``out/heldout.json``,
    with the greedy answers to the first ``logger.num_samples`` held-out prompts (``examples``).

    ``before`` is recorded once, before the first step (a resumed stage keeps it); ``after`` for the stage's
    final step. Each data-parallel rank scores its share of the held-out prompts; rank 0 pools and writes.
    """

    def __init__(self, config: StageConfig, dataset, heldout: list[int], preprocessor, generator, reward, processor,
                 data_parallel: DataParallel):
        self.config, self.dataset, self.heldout, self.data_parallel = config, dataset, heldout, data_parallel
        self.preprocessor, self.generator, self.reward, self.processor = preprocessor, generator, reward, processor
        self.path = Path(config.out) / "heldout.json"
        self.scored: dict[str, dict | None] = {}  # when -> this process's held-out scores (rank 0's; None elsewhere)

    def starting_policy_gone(self) -> bool:
        """A resumed stage: its policy is a trained one, never to be scored as the starting policy."""
        return (Path(self.config.out) / "checkpoints" / "latest").exists()

    def record(self, when: str) -> None:
        from nemo_viper.evaluation.heldout import read_record, write_record

        existing = read_record(self.path).get(when)
        if not self.heldout or (existing and (when == "before" or existing["step"] == self.config.rl.steps)):
            return
        if when == "before" and self.starting_policy_gone():
            return
        self.scored[when] = self.score(self.dataset, self.heldout)
        if self.scored[when] is not None:
            step = 0 if when == "before" else self.config.rl.steps
            write_record(self.path, when, {"step": step, **self.scored[when]})

    def score(self, dataset, indices: list[int]) -> dict | None:
        """The policy's answers to ``dataset``'s samples ``indices``, scored: collective, each data-parallel
        rank answers its share. Rank 0 gets ``{"samples_per_prompt", "prompts", "greedy", "sampled",
        "examples"}`` (pooled), the other ranks None."""
        import torch.distributed as dist

        from nemo_viper.data.task_prompt import task_prompt
        from nemo_viper.evaluation.heldout import answer_examples, score_prompts, summarise_scores

        rank, world = self.data_parallel.rank, self.data_parallel.size
        mine = indices[rank::world]
        images = self.preprocessor([dataset.image_bytes(i) for i in mine]) if mine else []
        prompts = [task_prompt(dataset.record(i), image) for i, image in zip(mine, images)]
        samples = self.config.heldout.samples or self.config.rl.n
        scores = score_prompts(self.generator, self.reward, self.processor, prompts, self.config.rl.sampling,
                               samples, seed=self.config.heldout.seed + rank)
        examples = answer_examples(prompts, scores, self.config.logger.num_samples)
        pooled = self.data_parallel.all_gather_object((scores, examples))
        if dist.get_rank() != 0:
            return None
        merged = {key: [r for part, _ in pooled for r in part[key]] for key in ("greedy", "sampled")}
        examples = [e for _, part in pooled for e in part][: self.config.logger.num_samples]
        return {"samples_per_prompt": samples, **summarise_scores(merged), "examples": examples}


class _AcrossRounds:
    """Scores the starting policy (``progress_start``, before the first step) and the final policy
    (``progress_final``, after the last) on the run's fixed held-out set, into ``progress_dir``
    (:mod:`nemo_viper.evaluation.progress`), with :meth:`_SelfEvaluation.score`. A policy already scored on
    the set (same checkpoint, same set) is not scored again. With ``progress_start`` this job's held-out split
    becomes the set unless the run has one from the same dataset; then the held-out scores double as the
    starting policy's when the set is that split."""

    def __init__(self, config: StageConfig, self_eval: _SelfEvaluation):
        import torch.distributed as dist

        from nemo_viper.evaluation.progress import SET_FILE, FixedSet, choose_set, read_set, write_set

        self.config, self.self_eval, self.dir = config, self_eval, Path(config.progress_dir)
        own = FixedSet.of_dataset(config.data, [self_eval.dataset.record(i).id for i in self_eval.heldout])
        existing = read_set(self.dir)
        if config.progress_start:
            self.fixed = choose_set(existing, own)
            collectives.barrier()  # every rank has read the file before rank 0 replaces it
            if dist.get_rank() == 0 and self.fixed != existing:
                write_set(self.dir, self.fixed)
        elif existing is None:
            raise ConfigError(f"{self.dir / SET_FILE} not found: the run's fixed held-out set is chosen by the job "
                              "that scores the starting policy (--progress-start; round 1's stage 1)")
        else:
            self.fixed = existing
        self.own = self.fixed == own

    def record(self, when: str) -> None:
        import torch.distributed as dist

        from nemo_viper.data.shards import ShardDataset
        from nemo_viper.evaluation.progress import is_scored, read_score, write_score
        from nemo_viper.models.checkpoint_dir import policy_identity, resolve_checkpoint

        label = self.config.progress_start if when == "before" else self.config.progress_final
        if not label:
            return
        policy = resolve_checkpoint(self.config.policy if when == "before" else self.config.out)
        key = policy_identity(policy)
        if is_scored(read_score(self.dir, label), key, self.fixed):
            return
        if when == "before" and self.self_eval.starting_policy_gone():
            log.warning("the starting policy of %s is gone (resumed from a checkpoint): %s is not scored on the "
                        "fixed held-out set", self.config.out, label)
            return
        if self.own and when in self.self_eval.scored:
            summary = self.self_eval.scored[when]
        else:
            dataset = self.self_eval.dataset if self.own else ShardDataset(self.fixed.data)
            indices = self.fixed.indices([dataset.record(i).id for i in range(len(dataset))])
            summary = self.self_eval.score(dataset, indices)
        if dist.get_rank() == 0:
            write_score(self.dir, label, policy, key, self.fixed, summary)
