"""One RL stage as a job: ``nemo-viper train --stage {1,2}`` (SPEC §2, §7).

Stage 1 trains on ``caption_refine`` shards, stage 2 on ``visual_op`` shards, with the same settings.
Everything cheap is validated first (dataset manifest and task, policy path, layout, image processor
settings); then the policy is built for training, the generator is set up (the Megatron backend shares the
policy's weights; the vLLM backend, ``rollout.backend: vllm``, is a colocated engine refitted from them), a
:class:`~nemo_viper.data.prompt_source.ShardPromptSource` prepares each data-parallel rank's prompts ahead
of the loop (images through DALI), the ViPER reward scores the rollouts, and
:func:`~nemo_viper.training.loop.run_rl` runs or resumes the stage under ``out/``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from nemo_viper.data.images import ImageProcessingConfig, QwenImagePreprocessor, resolve_backend
from nemo_viper.errors import ConfigError
from nemo_viper.evaluation.heldout import HeldoutConfig
from nemo_viper.models.checkpoint_dir import policy_paths
from nemo_viper.models.hf_checkpoint import check_parallel_layout, read_qwen25_vl_config
from nemo_viper.runtime.distributed import ParallelLayout
from nemo_viper.models.policy import PolicyOptions
from nemo_viper.rewards import RewardConfig
from nemo_viper.rollout.megatron_backend import MegatronGenerationConfig
from nemo_viper.rollout.vllm_backend import VLLMGenerationConfig, require_vllm
from nemo_viper.training.loop import RLConfig
from nemo_viper.training.trackers import LoggerConfig
from nemo_viper.training.trackers import check_installed as check_trackers_installed

log = logging.getLogger(__name__)

STAGE_TASKS = {1: "caption_refine", 2: "visual_op"}
ROLLOUT_BACKENDS = ("megatron", "vllm")


@dataclass(frozen=True)
class RolloutConfig:
    """The RL stage's generation engine: the run config's ``rollout`` section (docs/architecture.md,
    "Choosing a rollout backend").

    ``backend``: ``megatron`` (generates on the policy's own weights; no extra memory, slower) or ``vllm`` (a
    colocated vLLM engine per data-parallel rank, refitted after every update; needs ``vllm``).
    ``megatron_batch_size`` is :class:`MegatronGenerationConfig`'s ``max_batch_size``; the ``vllm_*`` keys are
    :class:`VLLMGenerationConfig`'s fields of the same name (defaults from those classes). Both engines are
    seeded with the stage's ``rl.sampling.seed``.
    """

    backend: str = "megatron"
    megatron_batch_size: int | None = MegatronGenerationConfig.max_batch_size  # None: as many as fit
    vllm_gpu_memory_utilization: float = VLLMGenerationConfig.gpu_memory_utilization
    vllm_cpu_kv_cache_gib: int = VLLMGenerationConfig.cpu_kv_cache_gib
    vllm_sleep_mode: bool = VLLMGenerationConfig.sleep_mode

    def __post_init__(self):
        if self.backend not in ROLLOUT_BACKENDS:
            raise ConfigError(f"backend={self.backend!r} is not one of {ROLLOUT_BACKENDS}")
        if self.megatron_batch_size is not None and self.megatron_batch_size < 1:
            raise ConfigError(f"megatron_batch_size={self.megatron_batch_size} must be >= 1 (or null: as many as fit)")
        try:
            self.vllm(seed=0)
        except ConfigError as exc:
            raise ConfigError(f"vllm_{exc}") from None

    def megatron(self, seed: int) -> MegatronGenerationConfig:
        return MegatronGenerationConfig(max_batch_size=self.megatron_batch_size, seed=seed)

    def vllm(self, seed: int) -> VLLMGenerationConfig:
        return VLLMGenerationConfig(gpu_memory_utilization=self.vllm_gpu_memory_utilization,
                                    cpu_kv_cache_gib=self.vllm_cpu_kv_cache_gib, sleep_mode=self.vllm_sleep_mode,
                                    seed=seed)


@dataclass(frozen=True)
class StageConfig:
    """One ``train`` job: which stage, data, starting policy and output, and the run config's sections it
    reads (``model`` options, ``parallel.tensor``/``pipeline``, ``rl``, ``rollout``, ``reward``), unchanged."""

    stage: int
    data: str
    policy: str  # a policy checkpoint dir (nemo_viper) or a Hugging Face Qwen2.5-VL dir
    out: str
    rl: RLConfig = field(default_factory=RLConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    model: PolicyOptions = field(default_factory=PolicyOptions)
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)  # self-evaluation split, scored before/after
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # trackers, sample generations, alerts
    run_config: dict = field(default_factory=dict, repr=False, compare=False)  # logged once to the trackers

    def __post_init__(self):
        if self.stage not in STAGE_TASKS:
            raise ConfigError(f"stage={self.stage} must be 1 or 2")


def rl_image_config(hf_dir: str | Path, min_pixels: int, max_pixels: int) -> ImageProcessingConfig:
    """The checkpoint's image processor settings with the run's pixel budget instead of the processor's own
    (Qwen2.5-VL publishes ``max_pixels`` = 12,845,056: up to 16,384 tokens per image). The prompts' images
    are prepared once with it, and rollouts and training reuse them: every phase sees the same budget."""
    return replace(ImageProcessingConfig.from_pretrained(hf_dir), min_pixels=min_pixels, max_pixels=max_pixels)


def run_stage(config: StageConfig) -> list[dict]:
    """Validate, build and run (or resume) one RL stage. Returns the metrics of the steps run now."""
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
    check_parallel_layout(read_qwen25_vl_config(hf_dir), config.tensor_parallel, config.pipeline_parallel)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config.rl.prompts_per_rank(ParallelLayout(config.tensor_parallel, config.pipeline_parallel).data_parallel(world))
    image_config = rl_image_config(hf_dir, config.rl.min_pixels, config.rl.max_pixels)
    image_backend = resolve_backend(config.rl.image_backend)
    if config.rollout.backend == "vllm":
        require_vllm("rollout.backend")
    check_trackers_installed(config.logger)

    from megatron.core import parallel_state  # heavy imports only after the checks above
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from nemo_viper.data.prompt_source import ShardPromptSource
    from nemo_viper.evaluation.heldout import heldout_indices
    from nemo_viper.models.policy import PolicyConfig
    from nemo_viper.models.processor import load_processor
    from nemo_viper.rewards import ViperReward
    from nemo_viper.rollout.megatron_backend import MegatronGenerationBackend
    from nemo_viper.training.grpo import build_trainer
    from nemo_viper.training.loop import run_rl
    from nemo_viper.training.monitor import StageMonitor

    policy_config = PolicyConfig(hf_path=str(hf_dir), tensor_parallel=config.tensor_parallel,
                                 pipeline_parallel=config.pipeline_parallel, **config.model.options())
    rl = config.rl
    trainer = build_trainer(policy_config, rl.grpo, rl.sampling, init_checkpoint=checkpoint)
    policy = trainer.policy.model  # the generator plugs in on the trained policy's weights
    if config.rollout.backend == "vllm":
        from nemo_viper.rollout.vllm_backend import VLLMGenerationBackend

        generator = VLLMGenerationBackend(policy, config.rollout.vllm(rl.sampling.seed))
    else:
        generator = MegatronGenerationBackend(policy, config.rollout.megatron(rl.sampling.seed))
    preprocessor = QwenImagePreprocessor(image_config, image_backend)  # after build_trainer chose this rank's GPU
    heldout = heldout_indices([dataset.record(i).id for i in range(len(dataset))], config.heldout)
    prompts = ShardPromptSource(
        dataset,
        preprocessor,
        seed=rl.sampling.seed,
        dp_rank=trainer.policy.data_parallel.rank,
        dp_world=trainer.policy.data_parallel.size,
        prefetch=rl.prefetch_prompts,
        exclude=frozenset(heldout),
    )
    processor = load_processor(hf_dir)
    reward = ViperReward(config.reward)
    self_eval = _SelfEvaluation(config, dataset, heldout, preprocessor, generator, reward, processor)
    columns = (TextColumn(f"RL stage {config.stage}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("reward {task.fields[reward]:.3f}"), TimeRemainingColumn())
    show = parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0
    import torch.distributed as dist

    monitor = StageMonitor(config.logger, config.out, config.run_config, config.reward.alert_gap,
                           enabled=dist.get_rank() == 0)
    with prompts, Progress(*columns, disable=not show) as progress:
        self_eval.record("before")
        task = progress.add_task("steps", total=config.rl.steps, reward=0.0)

        def advance(step: int, metrics: dict) -> None:
            progress.update(task, completed=step, reward=metrics["reward/mean"])

        history = run_rl(trainer, generator, reward, prompts, processor, config.rl, config.out, progress=advance,
                         monitor=monitor)
        self_eval.record("after")
    monitor.close()
    skipped = {k: v for k, v in (history[-1] if history else {}).items() if k.startswith("data/skipped/") and v}
    if skipped and show:
        log.warning("RL stage %d skipped %d samples in total: %s", config.stage, sum(skipped.values()), skipped)
    return history


class _SelfEvaluation:
    """Scores the policy on the held-out split (:mod:`nemo_viper.evaluation.heldout`) into ``out/heldout.json``,
    with the greedy answers to the first ``logger.num_samples`` held-out prompts (``examples``).

    ``before`` is recorded once, before the first step (a resumed stage keeps it); ``after`` for the stage's
    final step. Each data-parallel rank scores its share of the held-out prompts; rank 0 pools and writes.
    """

    def __init__(self, config: StageConfig, dataset, heldout: list[int], preprocessor, generator, reward, processor):
        self.config, self.dataset, self.heldout = config, dataset, heldout
        self.preprocessor, self.generator, self.reward, self.processor = preprocessor, generator, reward, processor
        self.path = Path(config.out) / "heldout.json"

    def record(self, when: str) -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state

        from nemo_viper.evaluation.heldout import (answer_examples, read_record, score_prompts, summarise_scores,
                                                   write_record)
        from nemo_viper.data.task_prompt import task_prompt
        from nemo_viper.runtime.collectives import all_gather_object

        existing = read_record(self.path).get(when)
        if not self.heldout or (existing and (when == "before" or existing["step"] == self.config.rl.steps)):
            return
        if when == "before" and (Path(self.config.out) / "checkpoints" / "latest").exists():
            return  # the starting policy is gone; never score a trained one as "before"
        rank, world = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        mine = self.heldout[rank::world]
        images = self.preprocessor([self.dataset.image_bytes(i) for i in mine]) if mine else []
        prompts = [task_prompt(self.dataset.record(i), image) for i, image in zip(mine, images)]
        samples = self.config.heldout.samples or self.config.rl.n
        scores = score_prompts(self.generator, self.reward, self.processor, prompts, self.config.rl.sampling,
                               samples, seed=self.config.heldout.seed + rank)
        examples = answer_examples(prompts, scores, self.config.logger.num_samples)
        pooled = all_gather_object((scores, examples), group=parallel_state.get_data_parallel_group())
        if dist.get_rank() == 0:
            merged = {key: [r for part, _ in pooled for r in part[key]] for key in ("greedy", "sampled")}
            examples = [e for _, part in pooled for e in part][: self.config.logger.num_samples]
            step = 0 if when == "before" else self.config.rl.steps
            write_record(self.path, when, {"step": step, "samples_per_prompt": samples, **summarise_scores(merged),
                                           "examples": examples})
