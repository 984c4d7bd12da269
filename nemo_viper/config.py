"""The closed-loop configuration: one typed object, composed from YAML parts in ``conf/``.

A recipe YAML (``conf/recipes/NAME.yaml``) lists the parts it is made of under ``defaults`` (e.g.
``model: qwen25vl_7b``, ``parallel: h100_tp2``) and may override any key below them; each part is
``conf/<group>/<part>.yaml``. Composition order, later wins: the dataclass defaults, the parts in the
listed order, the recipe's own keys, then command-line ``key=value`` overrides (OmegaConf dot-list:
``rl.steps=20 parallel.tensor=2``). OmegaConf's structured mode rejects unknown keys and values of the
wrong type; :func:`validate` then checks the cross-field rules (parallel layout against the GPUs and the
model's heads, paths that must exist) — all before any work starts, each error naming the key and value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_viper.errors import ConfigError, NemoViperError
from nemo_viper.evaluation.benchmarks import TASKS as BENCHMARK_TASKS
from nemo_viper.evaluation.heldout import HeldoutConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class ModelSection:
    """The starting policy (round 0) and how it is run."""

    hf_path: str = ""  # HF Qwen2.5-VL-Instruct dir; "tiny" = build the offline tiny model in the run dir
    tiny_warm_start_steps: int = 0  # with hf_path "tiny": see nemo_viper.models.tiny_warmstart
    precision: str = "bf16"  # fp32 | bf16 | fp8
    fp8_recipe: str = "blockwise"  # blockwise (Hopper) | mxfp8 (Blackwell) | tensorwise | delayed
    layer_spec: str = "auto"  # auto (Transformer Engine on a GPU that has it) | transformer_engine | local
    freeze_vision_tower: bool = False
    freeze_projector: bool = False
    recompute: str = "none"  # RL training, language model: none | selective (core attention) | full (layer inputs)
    recompute_vision: bool = False  # RL training: checkpoint every vision-tower block


@dataclass
class ParallelSection:
    """Megatron layout of the RL jobs. ``gpus_per_node=0`` means CPU (gloo ranks = ``cpu_ranks``)."""

    tensor: int = 1
    pipeline: int = 1
    nodes: int = 1
    gpus_per_node: int = 8
    cpu_ranks: int = 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node if self.gpus_per_node else self.cpu_ranks

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor * self.pipeline)


@dataclass
class RLSection:
    """GRPO-variant settings shared by both stages (SPEC §7 defaults)."""

    steps: int = 200  # rollout steps per stage
    prompts_per_step: int = 512  # global; split over data-parallel ranks
    n: int = 5
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 1e-6
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    num_minibatches: int = 4
    micro_batch_size: int = 4
    eps_low: float = 0.2
    eps_high: float = 0.28
    aggregation: str = "token-mean"
    dynamic_sampling: bool = False
    save_every: int = 50
    seed: int = 0
    image_backend: str = "auto"  # auto (DALI if importable) | dali | pil
    prefetch_prompts: int = 16  # per data-parallel rank
    # Pixel budget of every RL image (prompts and rollouts), whatever the checkpoint's processor says:
    # Qwen's resize keeps each image's pixel count in [min_pixels, max_pixels] (default: synthesis's cap).
    min_pixels: int = 56 * 56
    max_pixels: int = 1280 * 28 * 28


@dataclass
class RolloutSection:
    """The generation engine of the RL jobs (docs/architecture.md, "Choosing a rollout backend").

    ``backend``: ``megatron`` (generates on the policy's own weights; no extra memory, slower) or ``vllm``
    (a colocated vLLM engine per data-parallel rank, refitted after every update; needs ``vllm``).
    ``megatron_batch_size``: samples the Megatron backend decodes together. The ``vllm_*`` keys are
    :class:`~nemo_viper.rollout.vllm_backend.VLLMGenerationConfig`'s. ``importance_sampling_cap``: truncated
    importance-sampling correction of the sampler-vs-trainer mismatch (``null`` = off).
    """

    backend: str = "megatron"
    megatron_batch_size: int = 64
    vllm_gpu_memory_utilization: float = 0.5
    vllm_cpu_kv_cache_gib: int = 1
    vllm_sleep_mode: bool = True
    importance_sampling_cap: float | None = None


@dataclass
class RewardSection:
    """ViPER reward (SPEC §6). ``embedding_model`` empty = the packaged MiniLM (embedded default)."""

    embedding_model: str = ""
    threshold: float = 0.85
    mode: str = "precision"
    one_to_one: bool = False
    format_weight: float = 0.05
    correctness_weight: float = 0.95


@dataclass
class PhaseTimes:
    """Slurm time limit (``--time``) of each kind of phase job."""

    prepare: str = "00:30:00"
    synth: str = "04:00:00"  # one array task (one shard of a synthesis phase)
    rl: str = "24:00:00"
    export: str = "01:00:00"
    eval: str = "08:00:00"  # one benchmark shard job (nemo-viper eval on some of the 7 tasks)
    eval_data: str = "00:30:00"  # tiny benchmark copies (embedded default only)


@dataclass
class ClusterSection:
    """Where jobs run: ``local`` or ``slurm`` (NeMo-Run ``SlurmExecutor``, the project image through pyxis).

    ``code``: ``image`` runs the project installed in ``container_image`` (built from the repository's
    ``Dockerfile``); ``package`` ships the repository's committed ``HEAD`` with every job (NeMo-Run's
    ``GitArchivePackager``) and runs it on top of the image's environment. The jobs' container mounts are
    derived from the config's paths (run dir, models, data); ``container_mounts`` adds more (``SRC:DST``).
    """

    executor: str = "local"
    account: str = ""
    partition: str = ""
    time: PhaseTimes = field(default_factory=PhaseTimes)
    container_image: str = ""  # the project image: a squashfs file (enroot import) or a registry image
    code: str = "image"  # image | package
    container_mounts: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=lambda: {"HF_HUB_OFFLINE": "1"})
    job_dir: str = ""  # where NeMo-Run keeps job files; default <run_dir>/nemo_run
    synthesis_gpus_per_task: int = 1
    synthesis_max_parallel: int = 0  # at most this many array tasks at once (sbatch --array=...%N); 0 = no limit
    export_gpus: int = 1
    max_retries: int = 0  # requeue a job that failed this many times (NeMo-Run's TORCHX_MAX_RETRIES)
    exclusive_rl: bool = True  # RL jobs take whole nodes (sbatch --exclusive)
    min_free_disk_gb: float = 50.0  # preflight: free space the run dir needs


@dataclass
class EvalSection:
    """Evaluation inside the loop (SPEC §10, docs/evaluation.md).

    ``heldout``: the self-evaluation split of each stage's data, scored before/after every RL stage.
    ``enabled``: the benchmark phases, ``nemo-viper eval`` of the base model once and of each round's
    policy, on ``tasks`` from the local copies under ``dataset_root`` (``tiny``: tiny copies written into
    the run dir), split into ``num_shards`` jobs; ``guard_max_drop`` (points of the average, None = off)
    stops further rounds when a round's average falls by more than that against the previous one.
    """

    enabled: bool = False
    dataset_root: str = ""
    tasks: list[str] = field(default_factory=lambda: list(BENCHMARK_TASKS))
    backend: str = "qwen2_5_vl"
    model_args: dict[str, str] = field(default_factory=dict)
    batch_size: int = 1
    max_new_tokens: Optional[int] = None
    limit: Optional[int] = None
    num_shards: int = 1
    guard_max_drop: Optional[float] = None
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)


@dataclass
class ViperConfig:
    """Everything the closed loop needs (SPEC §2): K rounds of synth 1 → RL 1 → synth 2 → RL 2."""

    name: str = "viper"
    run_dir: str = "runs/viper"
    rounds: int = 1
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    rl: RLSection = field(default_factory=RLSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    reward: RewardSection = field(default_factory=RewardSection)
    synthesis: dict[str, Any] = field(default_factory=dict)  # nemo_viper.synthesis.config.SynthConfig keys
    cluster: ClusterSection = field(default_factory=ClusterSection)
    eval: EvalSection = field(default_factory=EvalSection)


def _load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}


def compose(recipe_yaml: str | Path, overrides: list[str] = (), conf_dir: Path = CONF_DIR) -> ViperConfig:
    """Compose ``recipe_yaml`` (its ``defaults`` parts, then its own keys) and ``overrides`` into a ViperConfig."""
    recipe = _load_yaml(Path(recipe_yaml))
    parts = recipe.pop("defaults", [])
    merged = OmegaConf.structured(ViperConfig)
    try:
        for part in parts:
            ((group, name),) = part.items()
            merged = OmegaConf.merge(merged, {group: _load_yaml(conf_dir / group / f"{name}.yaml")})
        merged = OmegaConf.merge(merged, recipe, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{recipe_yaml}: {_one_line(exc)}") from exc
    return OmegaConf.to_object(merged)


def _one_line(exc: OmegaConfBaseException) -> str:
    """OmegaConf's messages span lines (key, type, value); keep the key and the problem on one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines[:3])


CHOICES = {
    "model.precision": ("fp32", "bf16", "fp8"),
    "model.fp8_recipe": ("blockwise", "mxfp8", "tensorwise", "delayed"),
    "model.recompute": ("none", "selective", "full"),
    "model.layer_spec": ("auto", "transformer_engine", "local"),
    "rl.aggregation": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
    "rl.image_backend": ("auto", "dali", "pil"),
    "rollout.backend": ("megatron", "vllm"),
    "reward.mode": ("precision", "recall", "f1"),
    "cluster.executor": ("local", "slurm"),
    "eval.backend": ("qwen2_5_vl", "vllm"),
}


def _validate_synthesis(synthesis: dict) -> None:
    """The ``synthesis`` section against the synthesis job's own schema (unknown keys, wrong types)."""
    from nemo_viper.synthesis.config import SynthConfig

    try:
        OmegaConf.merge(OmegaConf.structured(SynthConfig), synthesis)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"synthesis: {_one_line(exc)}") from exc


def _validate_eval(section: EvalSection, check_paths: bool) -> None:
    from nemo_viper.evaluation.benchmarks import parse_tasks

    try:
        HeldoutConfig(**vars(section.heldout))
        parse_tasks(section.tasks)
    except ConfigError as exc:
        key = "eval.tasks" if "tasks=" in str(exc) else "eval.heldout"
        raise ConfigError(f"{key}: {exc}") from None
    for key in ("batch_size", "num_shards", "max_new_tokens", "limit"):
        value = getattr(section, key)
        if value is not None and value < 1:
            raise ConfigError(f"eval.{key}={value} must be >= 1")
    if section.guard_max_drop is not None and section.guard_max_drop < 0:
        raise ConfigError(f"eval.guard_max_drop={section.guard_max_drop} must be >= 0 (or null: no guard)")
    if section.enabled:
        if not section.dataset_root:
            raise ConfigError("eval.dataset_root is required with eval.enabled=true (local benchmark copies, or 'tiny')")
        if section.dataset_root != "tiny" and check_paths:
            from nemo_viper.evaluation.benchmarks import check_datasets

            check_datasets(parse_tasks(section.tasks), section.dataset_root)


def _validate_rollout(rollout: RolloutSection) -> None:
    """The rollout settings against the backends' own checks (one-line errors naming the key)."""
    if rollout.megatron_batch_size < 1:
        raise ConfigError(f"rollout.megatron_batch_size={rollout.megatron_batch_size} must be >= 1")
    if rollout.importance_sampling_cap is not None and not rollout.importance_sampling_cap > 0:
        raise ConfigError(f"rollout.importance_sampling_cap={rollout.importance_sampling_cap} must be > 0 (or null)")
    try:
        vllm_settings(rollout)
    except ConfigError as exc:
        raise ConfigError(f"rollout.vllm_{exc}") from exc


def vllm_settings(rollout: RolloutSection):
    """The section's :class:`~nemo_viper.rollout.vllm_backend.VLLMGenerationConfig` (vllm itself not imported)."""
    from nemo_viper.rollout.vllm_backend import VLLMGenerationConfig

    return VLLMGenerationConfig(
        gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
        cpu_kv_cache_gib=rollout.vllm_cpu_kv_cache_gib,
        sleep_mode=rollout.vllm_sleep_mode,
    )


def validate(config: ViperConfig, check_paths: bool = True) -> None:
    """Cross-field checks, before any work starts. Raises :class:`ConfigError` naming key and value."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {allowed}")
    parallel = config.parallel
    for key in ("tensor", "pipeline", "nodes"):
        if getattr(parallel, key) < 1:
            raise ConfigError(f"parallel.{key}={getattr(parallel, key)} must be >= 1")
    if parallel.world_size % (parallel.tensor * parallel.pipeline):
        raise ConfigError(
            f"parallel.tensor x parallel.pipeline = {parallel.tensor} x {parallel.pipeline} does not divide the "
            f"{parallel.world_size} ranks (parallel.nodes={parallel.nodes}, parallel.gpus_per_node={parallel.gpus_per_node})"
        )
    if config.rl.prompts_per_step % parallel.data_parallel:
        raise ConfigError(
            f"rl.prompts_per_step={config.rl.prompts_per_step} is not divisible by the data-parallel size "
            f"{parallel.data_parallel}"
        )
    if config.model.precision == "fp8" and parallel.gpus_per_node == 0:
        raise ConfigError("model.precision='fp8' needs GPUs (parallel.gpus_per_node > 0)")
    if not 28 * 28 <= config.rl.min_pixels <= config.rl.max_pixels:
        raise ConfigError(f"rl.min_pixels={config.rl.min_pixels} must be >= 784 and <= rl.max_pixels={config.rl.max_pixels}")
    _validate_rollout(config.rollout)
    if config.rl.prefetch_prompts < 1:
        raise ConfigError(f"rl.prefetch_prompts={config.rl.prefetch_prompts} must be >= 1")
    if config.rounds < 1:
        raise ConfigError(f"rounds={config.rounds} must be >= 1")
    _validate_synthesis(config.synthesis)
    _validate_eval(config.eval, check_paths)
    from nemo_viper.cluster import validate_cluster

    validate_cluster(config, check_paths)
    if not check_paths:
        return
    from nemo_viper.models.hf_checkpoint import check_parallel_layout, read_qwen25_vl_config

    if config.model.hf_path == "tiny":
        from nemo_viper.models.tiny import TinyModelConfig

        tiny = TinyModelConfig()
        hf_config = {"num_attention_heads": tiny.num_attention_heads, "num_key_value_heads": tiny.num_key_value_heads,
                     "num_hidden_layers": tiny.num_layers}
    else:
        try:
            hf_config = read_qwen25_vl_config(config.model.hf_path)
        except NemoViperError as exc:
            raise ConfigError(f"model.hf_path: {exc}") from exc
    try:
        check_parallel_layout(hf_config, parallel.tensor, parallel.pipeline)
    except ConfigError as exc:
        raise ConfigError(f"parallel.tensor/parallel.pipeline: {exc}") from exc
    images = config.synthesis.get("images", "skimage")
    if images != "skimage" and not Path(images).exists():
        raise ConfigError(f"synthesis.images={images!r} does not exist")
