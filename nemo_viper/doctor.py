"""``nemo-viper doctor``: the preflight that runs first in every job (and by hand), before any model loads.

:func:`check` returns one line per problem:

- **versions**: torch, transformers, megatron-core, Megatron-Bridge in their supported ranges
  (:mod:`nemo_viper.environment`);
- **GPU** (when the phase, or the config, uses GPUs): CUDA visible with enough devices for the ranks of
  this node, NCCL available, DALI installed unless ``rl.image_backend=pil`` (``auto`` would otherwise fall
  back to PIL silently), and ``model.precision`` x ``fp8_recipe`` x ``layer_spec`` possible on this GPU (the
  rule the policy applies when it is built, :func:`nemo_viper.models.policy.check_precision`);
- **paths**: every configured path a job reads exists and is readable; the run dir is writable;
- **models**: the policy's HF directory complete (config, weights, tokenizer, processor), the reward model
  a sentence-transformers directory, the diffusion models diffusers directories; a hub id where jobs run
  with ``HF_HUB_OFFLINE=1`` is a problem;
- **inputs** of the phase: the phases it depends on are done (:mod:`nemo_viper.run_state`);
- **harness** of a benchmark phase (``eval``): lmms-eval importable;
- **vLLM** where a phase generates on it (``rollout.backend``, ``synthesis.vlm.generation.backend`` or
  ``eval.backend`` = ``vllm``): installed, in the supported version range, with every call the backend
  makes (:func:`nemo_viper.rollout.vllm_backend.vllm_problems`);
- **disk**: at least ``cluster.min_free_disk_gb`` free where the run dir lives.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from nemo_viper.cluster import hub_offline, job_paths, model_sources
from nemo_viper.config import ViperConfig
from nemo_viper.environment import build_info, installed_versions, version_problems
from nemo_viper.errors import ConfigError, NemoViperError
from nemo_viper.run_state import hf_model_problem, phase_states

# Files that mark a model directory of each library (any one of them).
LIBRARY_FILES = {
    "reward.embedding_model": ("modules.json", "config_sentence_transformers.json", "config.json"),
    "synthesis.redraw.model": ("model_index.json",),
    "synthesis.edit.model": ("model_index.json",),
}


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _path_problems(config: ViperConfig) -> list[str]:
    problems = []
    for key, path in job_paths(config).items():
        if key in ("run_dir", "cluster.job_dir"):
            anchor = _existing_parent(Path(path))
            if not os.access(anchor, os.W_OK | os.X_OK):
                problems.append(f"{key}={path}: not writable ({anchor} is not writable)")
        elif not os.path.exists(path) and not any(c in path for c in "*?["):
            problems.append(f"{key}={path}: path not found")
        elif not os.access(path, os.R_OK):
            problems.append(f"{key}={path}: not readable")
    return problems


def _model_problems(config: ViperConfig) -> list[str]:
    problems = []
    offline = hub_offline(config)
    for key, source in model_sources(config).items():
        if not source or source == "tiny":
            continue
        if not os.path.isdir(source):
            if os.path.isabs(source):
                continue  # reported as a missing path
            if offline:
                problems.append(f"{key}={source!r} is a hub id but HF_HUB_OFFLINE=1: give a local directory")
            continue
        if key == "model.hf_path":
            problem = hf_model_problem(source)
            if problem:
                problems.append(f"{key}: {problem}")
        elif not any((Path(source) / name).is_file() for name in LIBRARY_FILES[key]):
            problems.append(f"{key}={source}: incomplete model directory, none of {', '.join(LIBRARY_FILES[key])}")
    return problems


def _gpu_problems(config: ViperConfig, ranks_per_node: int, kind: str | None) -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return ["no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, the job's --gpus-per-node, the container runtime)"]
    problems = []
    if torch.cuda.device_count() < ranks_per_node:
        problems.append(f"{torch.cuda.device_count()} GPUs visible, this job runs {ranks_per_node} ranks per node")
    if not torch.distributed.is_nccl_available():
        problems.append("torch was built without NCCL: multi-GPU jobs cannot communicate")
    from importlib.util import find_spec

    if kind in (None, "rl") and config.rl.image_backend in ("auto", "dali") and find_spec("nvidia.dali") is None:
        problems.append(f"rl.image_backend={config.rl.image_backend} but NVIDIA DALI is not installed (the project "
                        "image installs it from container/requirements.lock; rl.image_backend=pil to use PIL)")
    from nemo_viper.models.policy import Accelerator, check_precision, transformer_engine_available

    device = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)
    accelerator = Accelerator(cuda=True, transformer_engine=transformer_engine_available(),
                              compute_capability=tuple(torch.cuda.get_device_capability(device)),
                              name=f"GPU {device} ({torch.cuda.get_device_name(device)})")
    try:  # the rule the policy applies when it is built: precision x FP8 recipe x GPU x layer spec
        check_precision(config.model.precision, config.model.fp8_recipe, config.model.layer_spec, accelerator)
    except ConfigError as error:
        problems.append(f"model: {error}")
    return problems


def _input_problems(config: ViperConfig, phase_name: str) -> list[str]:
    from nemo_viper.orchestration import plan

    phases = plan(config)
    by_name = {p.name: p for p in phases}
    if phase_name not in by_name:
        return [f"phase {phase_name!r} is not in this run's plan ({', '.join(by_name)})"]
    states = phase_states(phases, config.run_dir)
    return [f"phase {phase_name} needs {dep}, which is not done: {states[dep].detail}"
            for dep in by_name[phase_name].depends_on if not states[dep].done]


def _harness_problems(config: ViperConfig) -> list[str]:
    from importlib.util import find_spec

    problems = []
    if find_spec("lmms_eval") is None:
        problems.append("eval phases need lmms-eval, which is not installed (scripts/setup.sh and the project image "
                        "install it; README: Installation)")
    return problems


def vllm_keys(config: ViperConfig, kind: str | None) -> list[str]:
    """The keys choosing vLLM for the phases of ``kind`` (``None``: every phase)."""
    chosen = {"rl": config.rollout.backend,
              "synth": config.synthesis.get("vlm", {}).get("generation", {}).get("backend", "megatron"),
              "eval": config.eval.backend}
    keys = {"rl": "rollout.backend", "synth": "synthesis.vlm.generation.backend", "eval": "eval.backend"}
    return [keys[k] for k, backend in chosen.items() if backend == "vllm" and kind in (None, k)]


def _vllm_problems(config: ViperConfig, kind: str | None) -> list[str]:
    keys = vllm_keys(config, kind)
    if not keys:
        return []
    from nemo_viper.rollout.vllm_backend import vllm_problems

    return [f"{' and '.join(keys)}=vllm: {problem}" for problem in vllm_problems()]


def check(config: ViperConfig, phase_name: str | None = None, gpu: bool | None = None) -> list[str]:
    """One line per problem (see the module docstring); empty when the job can start.

    ``gpu``: check the GPU (default: when the phase uses GPUs; without a phase, when the config does and a
    GPU is visible, so that a login node without GPUs can run the other checks).
    """
    problems = version_problems()
    problems += _path_problems(config) + _model_problems(config)
    phase = None
    if phase_name is not None:
        from nemo_viper.orchestration import plan

        phase = next((p for p in plan(config) if p.name == phase_name), None)
        problems += _input_problems(config, phase_name)
        if phase is not None and phase.kind == "eval":
            problems += _harness_problems(config)
    if phase_name is None or phase is not None:
        problems += _vllm_problems(config, phase.kind if phase is not None else None)
    if gpu is None:
        if phase is not None:
            gpu = phase.gpus_per_node > 0
        else:
            import torch

            gpu = config.parallel.gpus_per_node > 0 and torch.cuda.is_available()
    if gpu:
        ranks = phase.ranks_per_node if phase is not None and phase.distributed else 1
        problems += _gpu_problems(config, ranks, phase.kind if phase is not None else None)
    anchor = _existing_parent(Path(config.run_dir).absolute())
    free_gb = shutil.disk_usage(anchor).free / 2**30
    if free_gb < config.cluster.min_free_disk_gb:
        problems.append(f"run_dir={config.run_dir}: {free_gb:.1f} GiB free on its filesystem, "
                        f"cluster.min_free_disk_gb={config.cluster.min_free_disk_gb:g}")
    return problems


def summary() -> str:
    """One line: the project revision (from the image's build info) and the key versions."""
    versions = installed_versions()
    info = build_info() or {}
    names = ("torch", "transformers", "megatron-core", "megatron-bridge", "transformer-engine")
    parts = [f"{n} {versions[n]}" for n in names if n in versions]
    revision = info.get("revision", "unknown (not the project image)")
    return f"nemo_viper revision {revision}; " + ", ".join(parts)


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise NemoViperError("preflight failed: " + " | ".join(problems))
