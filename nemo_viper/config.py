"""The closed-loop configuration: one typed tree that *contains* the library configs, composed from YAML.

As in Megatron-Bridge and NeMo-RL, each section is the dataclass of the code it configures, so every
default and every allowed value is written once, in that dataclass:

==============  ==============================================================================
``model``       :class:`ModelSection` = :class:`~nemo_viper.models.config.PolicyOptions` (precision, FP8
                recipe, layer spec, freezing) + the starting checkpoint ``hf_path``
``parallel``    :class:`ParallelSection`: Megatron layout and the ranks of the RL jobs
``rl``          :class:`~nemo_viper.training.config.RLConfig`: steps, batch, ``rl.sampling``
                (:class:`~nemo_viper.rollout.SamplingParams`), ``rl.grpo``
                (:class:`~nemo_viper.training.config.GRPOConfig`: ``advantage``, ``loss``, ``optimizer``)
``rollout``     :class:`~nemo_viper.rollout.config.GenerationBackendConfig`: the RL jobs' generation
                engine (``megatron`` or ``vllm``) and each engine's settings under its name
``reward``      :class:`~nemo_viper.rewards.RewardConfig`
``synthesis``   keys of :class:`~nemo_viper.synthesis.config.SynthConfig` (partial: its presets apply first)
``cluster``     :class:`ClusterSection`: where jobs run
``eval``        :class:`EvalSection`: benchmark phases and ``eval.heldout``
                (:class:`~nemo_viper.evaluation.heldout.HeldoutConfig`, read by the RL jobs)
``logger``      :class:`~nemo_viper.training.trackers.LoggerConfig`: W&B / MLflow trackers, sample
                generations and alert thresholds of the RL jobs
==============  ==============================================================================

A recipe YAML (``conf/recipes/NAME.yaml``) lists the parts it is made of under ``defaults`` (e.g.
``model: qwen25vl_7b``, ``parallel: h100_tp2``) and may override any key below them; each part is
``conf/<group>/<part>.yaml``. Composition order, later wins: the dataclass defaults, the parts in the
listed order, the recipe's own keys, then command-line ``key=value`` overrides (OmegaConf dot-list:
``rl.steps=20 rl.grpo.optimizer.lr=2e-6``); an override ``group=part`` (``parallel=h100_tp1``) swaps a part,
as Hydra's group overrides do. ``nemo-viper config --recipe NAME [overrides]`` prints the result. OmegaConf's structured mode rejects unknown keys and values of
the wrong type; :func:`build` then constructs every dataclass, whose own checks reject bad values
(``rl.grpo.loss.eps_low=1.5``) with the full key in the message; :func:`validate` adds the cross-section
rules (layout against GPUs and heads, paths that must exist, the synthesis jobs' configs) — all before any
work starts. Every job reads the run's resolved config file (``run_dir/config/viper.yaml``), never a
re-encoding of it as flags. To add a key, see ``docs/architecture.md`` ("Adding a config key").
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import nemo_viper.conf
from nemo_viper.errors import ConfigError, NemoViperError
from nemo_viper.evaluation.benchmarks import TASKS as BENCHMARK_TASKS
from nemo_viper.evaluation.benchmarks import parse_tasks
from nemo_viper.evaluation.harness import MODEL_BACKENDS, EvalConfig
from nemo_viper.evaluation.heldout import HeldoutConfig
from nemo_viper.models.config import PolicyOptions
from nemo_viper.rewards.config import RewardConfig
from nemo_viper.training.config import RLConfig
from nemo_viper.rollout.config import GenerationBackendConfig, check_rollout_layout
from nemo_viper.structured import structured_defaults
from nemo_viper.training.trackers import LoggerConfig
from nemo_viper.training.trackers import check_installed as check_trackers_installed

CONF_DIR = Path(nemo_viper.conf.__file__).resolve().parent  # package data (the repository's conf/)
EXECUTORS = ("local", "slurm")


@dataclass(frozen=True)
class ModelSection(PolicyOptions):
    """The starting policy (round 0) and how every phase builds the policy (:class:`PolicyOptions`).

    ``hf_path``: a HF Qwen2.5-VL-Instruct directory, or ``tiny`` = build the offline tiny model in the run
    directory (warm-started for ``tiny_warm_start_steps`` steps, see :mod:`nemo_viper.models.tiny_warmstart`).
    """

    hf_path: str = ""
    tiny_warm_start_steps: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.tiny_warm_start_steps < 0:
            raise ConfigError(f"tiny_warm_start_steps={self.tiny_warm_start_steps} must be >= 0")


@dataclass
class ParallelSection:
    """Megatron layout of the RL jobs. ``gpus_per_node=0`` means CPU (gloo ranks = ``cpu_ranks``)."""

    tensor: int = 1
    pipeline: int = 1
    nodes: int = 1
    gpus_per_node: int = 8
    cpu_ranks: int = 1

    def __post_init__(self):
        for key in ("tensor", "pipeline", "nodes", "cpu_ranks"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        if self.gpus_per_node < 0:
            raise ConfigError(f"gpus_per_node={self.gpus_per_node} must be >= 0 (0 = CPU ranks)")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node if self.gpus_per_node else self.cpu_ranks

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor * self.pipeline)


@dataclass
class PhaseTimes:
    """Slurm time limit (``--time``) of each kind of phase job."""

    prepare: str = "00:30:00"
    synth: str = "04:00:00"  # one array task (one shard of a synthesis phase)
    rl: str = "24:00:00"
    export: str = "01:00:00"
    eval: str = "08:00:00"  # one benchmark shard job (nemo-viper eval on some of the 7 tasks)
    eval_data: str = "00:30:00"  # tiny benchmark copies (embedded default only)
    report: str = "00:15:00"  # the run report (CPU only)


@dataclass
class JobOptions:
    """Site options of one kind of phase job, as NeMo-Run's ``SlurmExecutor`` takes them (``None``: not passed).

    ``gpus_per_node``: ``None`` = what the plan needs (``--gpus-per-node``), ``0`` = not requested that way (a
    site that wants ``gres`` instead). ``sbatch``: further ``#SBATCH --KEY=VALUE`` lines (``KEY: true`` for a
    bare flag); ``srun_args``: arguments added to the job's ``srun``.
    """

    qos: Optional[str] = None
    constraint: Optional[str] = None
    gres: Optional[str] = None
    gpus_per_node: Optional[int] = None
    mem: Optional[str] = None  # --mem: e.g. 200G; 0 = all of each node's memory
    cpus_per_task: Optional[int] = None
    sbatch: dict[str, Any] = field(default_factory=dict)
    srun_args: list[str] = field(default_factory=list)

    def __post_init__(self):
        for key, least in (("gpus_per_node", 0), ("cpus_per_task", 1)):
            value = getattr(self, key)
            if value is not None and value < least:
                raise ConfigError(f"{key}={value} must be >= {least}")


@dataclass
class PhaseJobOptions:
    """:class:`JobOptions` per kind of phase. RL jobs take whole nodes (``exclusive_rl``) and, by default,
    all of their memory (``--mem=0``: without it Slurm grants an exclusive job only its default per-CPU share)."""

    prepare: JobOptions = field(default_factory=JobOptions)
    synth: JobOptions = field(default_factory=JobOptions)
    rl: JobOptions = field(default_factory=lambda: JobOptions(mem="0"))
    export: JobOptions = field(default_factory=JobOptions)
    eval: JobOptions = field(default_factory=JobOptions)
    eval_data: JobOptions = field(default_factory=JobOptions)
    report: JobOptions = field(default_factory=JobOptions)


@dataclass
class SSHSection:
    """Submit from a workstation: NeMo-Run's ``SSHTunnel`` to a Slurm login node (``host`` empty: no tunnel, the
    launcher runs on the login node itself).

    ``user`` on ``host`` (port ``port``) with the private key ``identity`` (empty: paramiko's defaults, the SSH
    agent and ``~/.ssh/id_*``). ``run_dir`` and ``cluster.job_dir`` are then paths on the cluster: the job files
    are copied there and ``sbatch``/``sacct``/``squeue`` run there; the workstation keeps NeMo-Run's
    experiment record only (``$NEMORUN_HOME``).
    """

    host: str = ""
    user: str = ""
    port: int = 22
    identity: str = ""


@dataclass
class ClusterSection:
    """Where jobs run: ``local`` or ``slurm`` (NeMo-Run ``SlurmExecutor``, the project image through pyxis).

    ``code``: ``image`` runs the project installed in ``container_image`` (built from the repository's
    ``Dockerfile``); ``package`` ships the repository's committed ``HEAD`` with every job (NeMo-Run's
    ``GitArchivePackager``) and runs it on top of the image's environment. ``container_image: null`` runs
    the jobs without a container (no pyxis), on the nodes' own Python environment, which ``setup`` prepares
    (a module load, a venv on the shared filesystem). The jobs' container mounts are
    derived from the config's paths (run dir, models, data); ``container_mounts`` adds more (``SRC:DST``).
    ``ssh``: submit from a workstation through a login node (:class:`SSHSection`).
    """

    executor: str = "local"
    account: str = ""
    partition: str = ""
    time: PhaseTimes = field(default_factory=PhaseTimes)
    container_image: Optional[str] = ""  # the project image (a squashfs file or a registry image); null = none
    setup: str = ""  # shell lines every Slurm job runs first (e.g. `module load ...; source VENV/bin/activate`)
    options: PhaseJobOptions = field(default_factory=PhaseJobOptions)  # site options per kind of phase
    code: str = "image"  # image | package
    container_mounts: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=lambda: {"HF_HUB_OFFLINE": "1"})
    job_dir: str = ""  # where NeMo-Run keeps job files (on the cluster); default <run_dir>/nemo_run
    ssh: SSHSection = field(default_factory=SSHSection)  # submit from a workstation through a login node
    synthesis_gpus_per_task: int = 1
    synthesis_max_parallel: int = 0  # at most this many array tasks at once (sbatch --array=...%N); 0 = no limit
    export_gpus: int = 1
    max_retries: int = 0  # requeue a job that failed this many times (NeMo-Run's TORCHX_MAX_RETRIES)
    exclusive_rl: bool = True  # RL jobs take whole nodes (sbatch --exclusive)
    min_free_disk_gb: float = 50.0  # preflight: free space the run dir needs
    # RL jobs get `--signal=<exit_signal>@<exit_signal_lead_s>`: that long before the time limit, the stage saves a
    # checkpoint after the step in progress and requeues its job (nemo_viper.runtime.exit_signal: why URG). The lead
    # must cover one RL step and one checkpoint save; Slurm may send the signal up to 60 s earlier.
    exit_signal: str = "URG"
    exit_signal_lead_s: int = 600

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor={self.executor!r} is not one of {EXECUTORS}")
        if self.synthesis_gpus_per_task < 1:
            raise ConfigError(f"synthesis_gpus_per_task={self.synthesis_gpus_per_task} must be >= 1")


@dataclass
class EvalSection:
    """Evaluation inside the loop (docs/evaluation.md).

    ``heldout``: the self-evaluation split of each stage's data (:class:`HeldoutConfig`), scored before/after
    every RL stage by the RL job itself. ``enabled``: the benchmark phases, ``nemo-viper eval`` of the base
    model once and of each round's policy, on ``tasks`` from the local copies under ``dataset_root``
    (``tiny``: tiny copies written into the run dir), split into ``num_shards`` jobs; ``backend``,
    ``model_args``, ``batch_size``, ``max_new_tokens``, ``limit`` are the eval job's
    (:class:`~nemo_viper.evaluation.harness.EvalConfig`); ``guard_max_drop`` (points of the average, None =
    off) stops further rounds when a round's average falls by more than that against the previous one.
    """

    enabled: bool = False
    dataset_root: str = ""
    tasks: list[str] = field(default_factory=lambda: list(BENCHMARK_TASKS))
    backend: str = EvalConfig.backend
    model_args: dict[str, str] = field(default_factory=dict)
    batch_size: int = EvalConfig.batch_size
    max_new_tokens: Optional[int] = None
    limit: Optional[int] = None
    num_shards: int = 1
    guard_max_drop: Optional[float] = None
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)

    def __post_init__(self):
        parse_tasks(self.tasks)
        if self.backend not in MODEL_BACKENDS:
            raise ConfigError(f"backend={self.backend!r} is not one of {MODEL_BACKENDS}")
        for key in ("batch_size", "num_shards", "max_new_tokens", "limit"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key}={value} must be >= 1")
        if self.guard_max_drop is not None and self.guard_max_drop < 0:
            raise ConfigError(f"guard_max_drop={self.guard_max_drop} must be >= 0 (or null: no guard)")
        if self.enabled and not self.dataset_root:
            raise ConfigError("dataset_root is required with enabled=true (local benchmark copies, or 'tiny')")


@dataclass
class ViperConfig:
    """Everything the closed loop needs: K rounds of synth 1 → RL 1 → synth 2 → RL 2."""

    name: str = "viper"
    run_dir: str = "runs/viper"
    rounds: int = 1
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    rl: RLConfig = field(default_factory=RLConfig)
    rollout: GenerationBackendConfig = field(default_factory=GenerationBackendConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    synthesis: dict[str, Any] = field(default_factory=dict)  # nemo_viper.synthesis.config.SynthConfig keys
    cluster: ClusterSection = field(default_factory=ClusterSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self):
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds} must be >= 1")
        if not self.name or not self.run_dir:
            raise ConfigError(f"name={self.name!r} and run_dir={self.run_dir!r} must not be empty")


def build(cls: type, data: Mapping, path: str = ""):
    """Construct dataclass ``cls`` (and its dataclass fields, recursively) from plain ``data``.

    Every constructor's own checks run; their errors (``ValueError``, ``TypeError``, which libraries
    raise as ``"<field>=<value> must ..."``) become one-line :class:`ConfigError` s naming the full key,
    e.g. ``rl.grpo.loss.eps_low=1.5 must be < 1 ...``. Keys absent from ``data`` keep their defaults.
    """
    hints = get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if not f.init or f.name not in data:
            continue
        value, kind = data[f.name], hints[f.name]
        if is_dataclass(kind) and isinstance(value, Mapping):
            value = build(kind, value, f"{path}{f.name}.")
        elif get_origin(kind) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(_name_key(path, cls, str(exc))) from None


def _name_key(path: str, cls: type, message: str) -> str:
    """Prefix ``message`` with the section's key path: ``eps_low=1.5 ...`` -> ``rl.grpo.loss.eps_low=1.5 ...``."""
    message = " ".join(message.split())
    if not path:
        return message
    match = re.match(r"(\w+)[=. ]", message)
    if match and match.group(1) in {f.name for f in fields(cls)}:
        return f"{path}{message}"
    return f"{path[:-1]}: {message}"


def schema() -> DictConfig:
    """The structured (typed, closed) OmegaConf tree of :class:`ViperConfig` defaults, writable (a copy)."""
    return structured_defaults(ViperConfig)


def to_yaml(config: ViperConfig) -> str:
    """The resolved YAML form of ``config`` (what the phases read back with :func:`compose`). Dumped from plain
    data: the values are already built and checked, and a structured tree of them would cost three times as much."""
    return OmegaConf.to_yaml(asdict(config))


def _load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}


def compose(recipe_yaml: str | Path | None, overrides: list[str] = (), conf_dir: Path = CONF_DIR) -> ViperConfig:
    """Compose ``recipe_yaml`` (its ``defaults`` parts, then its own keys; ``None``: the defaults only) and
    ``overrides`` into a :class:`ViperConfig`. A run's resolved ``config/viper.yaml`` composes as it is.

    As in Hydra, an override ``GROUP=PART`` (``parallel=h100_tp1``) swaps the part the recipe lists for that
    group (``conf/GROUP/PART.yaml``; a group the recipe does not list is added); every other override is a
    ``key=value`` of the tree."""
    recipe = _load_yaml(Path(recipe_yaml)) if recipe_yaml is not None else {}
    parts = {group: name for part in recipe.pop("defaults", []) for group, name in part.items()}
    keys = []
    for override in overrides:
        group, _, name = override.partition("=")
        if group in _SECTIONS and (conf_dir / group).is_dir():
            if not (conf_dir / group / f"{name}.yaml").is_file():
                choices = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
                raise ConfigError(f"{override}: {group} has no part {name!r} (parts: {', '.join(choices)})")
            parts[group] = name
        else:
            keys.append(override)
    merged = schema()
    layers = [(conf_dir / group / f"{name}.yaml", {group: _load_yaml(conf_dir / group / f"{name}.yaml")})
              for group, name in parts.items()]
    layers.append((recipe_yaml or "config", recipe))
    layers += [(key, OmegaConf.from_dotlist([key])) for key in keys]
    for source, layer in layers:  # one at a time, so an error names the file or override it comes from
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{source}: {_one_line(exc)}") from exc
    try:
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{recipe_yaml or 'config'}: {_one_line(exc)}") from exc
    return build(ViperConfig, data)


_SECTIONS = {f.name for f in fields(ViperConfig)}


def _one_line(exc: OmegaConfBaseException) -> str:
    """OmegaConf's messages span lines (key, type, value); keep the key and the problem on one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines[:3])


def synthesis_settings(config: ViperConfig) -> dict:
    """The synthesis keys every synth job reads from ``run_dir/config/synthesis.yaml``: the ``synthesis``
    section without the keys the plan passes as flags (``images``, ``num_shards``), with the policy built
    as the run's ``model`` says (precision, FP8 recipe, layer spec) unless ``synthesis.vlm`` says otherwise."""
    settings = {k: copy.deepcopy(v) for k, v in config.synthesis.items() if k not in ("num_shards", "images")}
    policy = {key: getattr(config.model, key) for key in ("precision", "fp8_recipe", "layer_spec")}
    settings["vlm"] = {**policy, **(settings.get("vlm") or {})}  # synthesis runs the policy like RL does
    return settings


def rl_job_settings(config: ViperConfig) -> dict:
    """What an RL (``train``) job reads from the run config file (see ``cli.train_config``), as plain data."""
    return {"model": asdict(PolicyOptions(**config.model.options())),
            "parallel": {"tensor": config.parallel.tensor, "pipeline": config.parallel.pipeline},
            "rl": asdict(config.rl), "rollout": asdict(config.rollout), "reward": asdict(config.reward),
            "eval": {"heldout": asdict(config.eval.heldout)}}


# SynthConfig keys the plan sets for each synth job (from its phase), so the synthesis section may not.
SYNTHESIS_PLAN_KEYS = ("stage", "out", "stage1", "shard_index", "vlm.policy")


def _validate_synthesis(config: ViperConfig) -> None:
    """Build the :class:`SynthConfig` of each synthesis stage as its jobs will (schema, types and values)."""
    from nemo_viper.synthesis.config import load_config

    for key in SYNTHESIS_PLAN_KEYS:
        if OmegaConf.select(OmegaConf.create(config.synthesis), key) is not None:
            raise ConfigError(f"synthesis.{key} is set by the loop's plan for each synthesis job; remove it")
    num_shards = config.synthesis.get("num_shards", 1)
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ConfigError(f"synthesis.num_shards={num_shards!r} must be an integer >= 1")
    for stage in (1, 2):
        settings = synthesis_settings(config)
        settings["vlm"]["policy"] = "<policy>"
        try:
            load_config(None, [], **settings, stage=stage, out="<out>", stage1="<stage1>" if stage == 2 else None,
                        images=config.synthesis.get("images"), num_shards=num_shards, shard_index=num_shards - 1)
        except ConfigError as exc:
            message = " ".join(str(exc).split()).removeprefix("synthesis config: ")
            raise ConfigError(f"synthesis: {message}") from exc


def _refuse_non_finite(tree, key: str = "") -> None:
    """No setting is infinite or NaN: every number configures a rate, a weight, a size or a limit, and a
    non-finite one would pass the range checks (``inf > 0``) and fail, or silently do nothing, mid-run. The
    ``synthesis`` section is kept as written (its library parses it), so there ``'inf'`` and ``'nan'`` strings
    count too."""
    if isinstance(tree, dict):
        for name, value in tree.items():
            _refuse_non_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            _refuse_non_finite(value, f"{key}[{i}]")
    elif isinstance(tree, str) and key.startswith("synthesis."):
        try:
            number = float(tree)
        except ValueError:
            return
        if not math.isfinite(number):
            raise ConfigError(f"{key}={tree!r} is not a finite number")
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise ConfigError(f"{key}={tree!r} is not a finite number")


def validate(config: ViperConfig, check_paths: bool = True) -> None:
    """Every value and cross-section rule, before any work starts. Raises :class:`ConfigError` naming key
    and value. Rebuilds the whole tree (every library config's own checks), so a config assembled in
    Python (``dataclasses.replace``) is checked like a composed one. ``check_paths``: check that the paths the
    jobs read exist (not through an SSH tunnel, where they are on the cluster; the identity file is checked)."""
    build(ViperConfig, asdict(config))
    _refuse_non_finite(asdict(config))
    if not config.model.hf_path:
        raise ConfigError("model.hf_path is required: a Hugging Face Qwen2.5-VL directory, or 'tiny'")
    parallel = config.parallel
    if parallel.world_size % (parallel.tensor * parallel.pipeline):
        raise ConfigError(
            f"parallel.tensor x parallel.pipeline = {parallel.tensor} x {parallel.pipeline} does not divide the "
            f"{parallel.world_size} ranks (parallel.nodes={parallel.nodes}, parallel.gpus_per_node="
            f"{parallel.gpus_per_node}, parallel.cpu_ranks={parallel.cpu_ranks})"
        )
    try:
        config.rl.prompts_per_rank(parallel.data_parallel)
    except ConfigError as exc:
        raise ConfigError(f"rl.{exc} (parallel: {parallel.world_size} ranks / (tensor {parallel.tensor} x "
                          f"pipeline {parallel.pipeline}))") from exc
    check_rollout_layout(config.rollout.backend, parallel.pipeline)
    if config.model.precision == "fp8" and parallel.gpus_per_node == 0:
        raise ConfigError("model.precision='fp8' needs GPUs (parallel.gpus_per_node > 0)")
    if config.eval.enabled and config.eval.dataset_root != "tiny" and check_paths and not config.cluster.ssh.host:
        from nemo_viper.evaluation.benchmarks import check_datasets

        check_datasets(parse_tasks(config.eval.tasks), config.eval.dataset_root)  # names the task and the path
    from nemo_viper.cluster import validate_cluster

    validate_cluster(config, check_paths)  # first: strings that must be shell-safe paths are refused as such
    check_trackers_installed(config.logger)
    _validate_synthesis(config)
    if not check_paths or config.cluster.ssh.host:  # through a tunnel, the paths are on the cluster
        return
    _check_paths(config)


def _check_paths(config: ViperConfig) -> None:
    from nemo_viper.models.hf_checkpoint import check_parallel_layout, read_qwen25_vl_config

    parallel = config.parallel
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
