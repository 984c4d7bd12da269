"""What a job takes from the configuration: shell-safe strings, the paths it reads and writes, its models.

- **Shell safety.** NeMo-Run runs some commands through a shell with paths pasted in unquoted (its local
  tunnel's ``mkdir -p {job_dir}``, ``tar ... -C {job_dir}/code``, ``sbatch ... {job_dir}/..._sbatch.sh``;
  the sbatch script's ``srun --container-image IMAGE``), and Slurm/pyxis split ``--container-mounts`` on
  ``,`` and ``:``. So the strings that become such paths (``run_dir``, ``cluster.job_dir``, ``name``, every
  mounted path, ``cluster.container_image``) must match :data:`SAFE_PATH` (:data:`SAFE_IMAGE`); every other
  string reaches a job only ``shlex``-quoted (arguments, ``#SBATCH`` values, ``export`` values) or inside
  the run's config files.
- **Paths** (:func:`job_paths`): every configured path a job reads or writes, by config key. The Slurm
  jobs' container mounts are derived from them (:func:`container_mounts`), so a job never depends on a
  path that is not mounted.
- **Model sources** (:func:`model_sources`): every model a job loads, by config key. With
  ``HF_HUB_OFFLINE=1`` (the jobs' default) a hub id cannot be downloaded: that is a config error before
  anything is launched (:func:`check_model_sources`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from nemo_viper.errors import ConfigError
from nemo_viper.runtime.exit_signal import parse_signal

if TYPE_CHECKING:
    from nemo_viper.config import SSHSection, ViperConfig

SAFE_PATH = re.compile(r"[A-Za-z0-9._/+@=-]+")  # no whitespace, quotes, ; & | $ ` ( ) < > * ? [ ] # ~ , :
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
SLURM_PARTITIONS = re.compile(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*")  # sbatch --partition takes a list
SAFE_IMAGE = re.compile(r"[A-Za-z0-9._/:@#+=-]+")  # a squashfs path or a registry reference (host#repo:tag@digest)
SSH_HOST = re.compile(r"[A-Za-z0-9.:-]+")  # a DNS name, an IPv4 or an IPv6 address
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d{2}){0,2}")
GLOB_CHARS = "*?["
MAX_SIGNAL_LEAD_S = 65535  # sbatch --signal's sig_time is 16 bits


def check_shell_safe_path(key: str, value: str) -> None:
    if not SAFE_PATH.fullmatch(value):
        bad = sorted({c for c in value if not SAFE_PATH.fullmatch(c)})
        raise ConfigError(f"{key}={value!r} contains characters that a shell or a container mount would "
                          f"interpret ({' '.join(map(repr, bad))}); use letters, digits and . _ / + @ = -")


def _mount_source(path: str) -> str:
    """The directory to mount for a configured path: the path itself, or for a glob the part before it."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if any(c in part for c in GLOB_CHARS):
            return str(Path(*parts[:i]))
    return path


def job_paths(config: ViperConfig) -> dict[str, str]:
    """Config key -> absolute path for every local path a job reads or writes (hub ids and ``tiny`` left out)."""
    paths = {"run_dir": config.run_dir}
    if config.cluster.job_dir:
        paths["cluster.job_dir"] = config.cluster.job_dir
    for key, value in model_sources(config).items():
        if value and value != "tiny" and (os.path.isabs(value) or os.path.exists(value)):
            paths[key] = value
    images = str(config.synthesis.get("images", "skimage"))
    if images != "skimage":
        paths["synthesis.images"] = images
    if config.eval.enabled and config.eval.dataset_root != "tiny":  # "tiny": copies written under run_dir
        paths["eval.dataset_root"] = config.eval.dataset_root
    return {key: os.path.abspath(value) for key, value in paths.items()}


def _diffusion_models(config: ViperConfig) -> dict[str, str]:
    """``synthesis.redraw.model`` / ``synthesis.edit.model`` after the diffusion preset the jobs will use."""
    from nemo_viper.synthesis.config import DIFFUSION_PRESETS, resolve_preset

    synthesis = config.synthesis
    preset = resolve_preset(synthesis.get("diffusion_preset", "auto"), cuda_available=config.parallel.gpus_per_node > 0)
    models = {}
    for step in ("redraw", "edit"):
        model = (synthesis.get(step) or {}).get("model") or DIFFUSION_PRESETS[preset].get(step, {}).get("model", "")
        models[f"synthesis.{step}.model"] = str(model)
    return models


def model_sources(config: ViperConfig) -> dict[str, str]:
    """Config key -> model source (a local directory, a hub id, or ``tiny``) for every model a job loads."""
    sources = {"model.hf_path": config.model.hf_path}
    if config.reward.embedding_model:
        sources["reward.embedding_model"] = config.reward.embedding_model
    sources.update(_diffusion_models(config))
    return sources


def hub_offline(config: ViperConfig) -> bool:
    """Whether the jobs run with ``HF_HUB_OFFLINE`` set (``cluster.env``; locally also this process's env)."""
    values = [config.cluster.env.get("HF_HUB_OFFLINE", "")]
    if config.cluster.executor == "local":
        values.append(os.environ.get("HF_HUB_OFFLINE", ""))
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in values)


def check_model_sources(config: ViperConfig, check_paths: bool) -> None:
    """A hub id where jobs run offline is an error; so is, with ``check_paths``, a missing local directory."""
    offline = hub_offline(config)
    for key, value in model_sources(config).items():
        if not value or value == "tiny":
            continue
        if os.path.isabs(value):
            if check_paths and key != "model.hf_path" and not os.path.isdir(value):  # hf_path: validate() checks more
                raise ConfigError(f"{key}={value!r}: directory not found")
        elif not os.path.isdir(value) and offline:
            raise ConfigError(f"{key}={value!r} is a hub id, but jobs run with HF_HUB_OFFLINE=1 (cluster.env): "
                              f"download it (huggingface-cli download {value} --local-dir DIR) and set {key}=DIR")


def container_mounts(config: ViperConfig) -> list[str]:
    """``SRC:SRC`` for every directory the jobs need (:func:`job_paths`), nested ones folded into their
    parents, then ``cluster.container_mounts``."""
    sources = sorted({_mount_source(path) for path in job_paths(config).values()})
    derived = [s for s in sources if not any(s != p and s.startswith(p.rstrip("/") + "/") for p in sources)]
    return [f"{s}:{s}" for s in derived] + [m for m in config.cluster.container_mounts
                                            if m.split(":")[0] not in derived]


def validate_cluster(config: ViperConfig, check_paths: bool) -> None:
    """The job-facing rules above plus the ``cluster`` section's own (names, times, counts, mounts, env)."""
    cluster = config.cluster
    if not SAFE_NAME.fullmatch(config.name):
        raise ConfigError(f"name={config.name!r} must be letters, digits and . _ - (it names jobs and directories)")
    for key, pattern, form in (("account", SAFE_NAME, "letters, digits and . _ -"),
                               ("partition", SLURM_PARTITIONS, "letters, digits and . _ -, several joined by ,")):
        value = getattr(cluster, key)
        if value and not pattern.fullmatch(value):  # an #SBATCH line ends at a newline; a space starts an option
            raise ConfigError(f"cluster.{key}={value!r} is not a Slurm {key} name ({form})")
    for key, path in job_paths(config).items():
        check_shell_safe_path(key, path)
    for mount in cluster.container_mounts:
        parts = mount.split(":")
        if not 1 <= len(parts) <= 3 or not all(parts[:2]):
            raise ConfigError(f"cluster.container_mounts entry {mount!r} must be SRC[:DST[:FLAGS]]")
        for part in parts:
            check_shell_safe_path("cluster.container_mounts", part)
    for name in cluster.env:
        if not ENV_NAME.fullmatch(name):
            raise ConfigError(f"cluster.env key {name!r} is not an environment variable name")
    for phase, limit in vars(cluster.time).items():
        if not SLURM_TIME.fullmatch(limit):
            raise ConfigError(f"cluster.time.{phase}={limit!r} is not a Slurm time limit (e.g. 04:00:00, 1-00:00:00)")
    parse_signal("cluster.exit_signal", cluster.exit_signal)
    if not 1 <= cluster.exit_signal_lead_s <= MAX_SIGNAL_LEAD_S:
        raise ConfigError(f"cluster.exit_signal_lead_s={cluster.exit_signal_lead_s} must be in [1, {MAX_SIGNAL_LEAD_S}] "
                          "(seconds; sbatch --signal)")
    if cluster.code not in ("image", "package"):
        raise ConfigError(f"cluster.code={cluster.code!r} is not one of ('image', 'package')")
    for key in ("synthesis_gpus_per_task", "export_gpus", "synthesis_max_parallel", "max_retries"):
        if getattr(cluster, key) < 0:
            raise ConfigError(f"cluster.{key}={getattr(cluster, key)} must be >= 0")
    if cluster.min_free_disk_gb < 0:
        raise ConfigError(f"cluster.min_free_disk_gb={cluster.min_free_disk_gb} must be >= 0")
    if cluster.executor == "slurm":
        if not cluster.account:
            raise ConfigError("cluster.account is required with cluster.executor='slurm'")
        if cluster.container_image == "":
            raise ConfigError("cluster.container_image is required with cluster.executor='slurm': the project image "
                              "(README, 'Running on Slurm'), or null for jobs without a container (cluster.setup)")
        if cluster.container_image is None and cluster.code == "package":
            raise ConfigError("cluster.code='package' runs the shipped code inside the container image; with "
                              "cluster.container_image=null the jobs run the project that cluster.setup's environment "
                              "has installed (cluster.code=image)")
        if cluster.container_image is not None and not SAFE_IMAGE.fullmatch(cluster.container_image):  # NeMo-Run pastes it into srun's command unquoted
            raise ConfigError(f"cluster.container_image={cluster.container_image!r} is not a squashfs path or an "
                              "image reference (letters, digits and . _ / : @ # + = -)")
    _check_job_options(cluster)
    _check_ssh(config, check_paths)
    check_model_sources(config, check_paths and not cluster.ssh.host)  # through a tunnel: paths on the cluster


def _check_ssh(config: ViperConfig, check_paths: bool) -> None:
    """``cluster.ssh``: the login node (:func:`check_login`); the paths the jobs use are the cluster's, so they
    must be absolute (this machine's working directory means nothing there)."""
    ssh = config.cluster.ssh
    if not ssh.host:
        if ssh.user or ssh.identity:
            raise ConfigError("cluster.ssh.user/identity are set but cluster.ssh.host is not (the login node)")
        return
    if config.cluster.executor != "slurm":
        raise ConfigError(f"cluster.ssh.host={ssh.host!r} needs cluster.executor='slurm' (the tunnel submits to "
                          f"Slurm), not {config.cluster.executor!r}")
    check_login(ssh, check_paths)
    for key, path in (("run_dir", config.run_dir), ("cluster.job_dir", config.cluster.job_dir)):
        if path and not os.path.isabs(path):
            raise ConfigError(f"{key}={path!r} must be an absolute path on {ssh.host} (cluster.ssh.host is set)")


def check_login(ssh: SSHSection, check_paths: bool = True) -> None:
    """``user@host:port`` of a login node, and (``check_paths``) the identity file on this machine."""
    if not SSH_HOST.fullmatch(ssh.host):
        raise ConfigError(f"cluster.ssh.host={ssh.host!r} is not a host name or address (letters, digits and . - : "
                          "only; the user goes in cluster.ssh.user)")
    if not SAFE_NAME.fullmatch(ssh.user):
        raise ConfigError(f"cluster.ssh.user={ssh.user!r} must be the login name on {ssh.host} (letters, digits and "
                          ". _ -)")
    if not 1 <= ssh.port <= 65535:
        raise ConfigError(f"cluster.ssh.port={ssh.port} is not a TCP port (1-65535)")
    if ssh.identity and check_paths and not os.path.isfile(os.path.expanduser(ssh.identity)):
        raise ConfigError(f"cluster.ssh.identity={ssh.identity!r}: no such file (the private key for "
                          f"{ssh.user}@{ssh.host})")


# Set by the launcher (from the plan and the cluster.* keys) or by cluster.options.<kind>.<key>: not `sbatch` entries.
LAUNCHER_SBATCH_KEYS = ("array", "dependency", "job-name", "output", "error", "requeue", "nodes", "ntasks-per-node",
                        "time", "account", "partition", "kill-on-invalid-dep", "qos", "constraint", "gres",
                        "gpus-per-node", "mem", "cpus-per-task")


def _check_job_options(cluster) -> None:
    """``cluster.options.<kind>.sbatch``: option names only, none that the launcher sets itself."""
    for kind, options in vars(cluster.options).items():
        for key in options.sbatch:
            flag = str(key).replace("_", "-")
            if not SAFE_NAME.fullmatch(flag) or flag.startswith("-"):
                raise ConfigError(f"cluster.options.{kind}.sbatch key {key!r} is not an sbatch option name "
                                  "(without the leading --)")
            if flag in LAUNCHER_SBATCH_KEYS:
                raise ConfigError(f"cluster.options.{kind}.sbatch.{key}: set by the launcher (the plan, cluster.*, "
                                  f"or cluster.options.{kind}.{flag.replace('-', '_')}), not an extra sbatch option")
