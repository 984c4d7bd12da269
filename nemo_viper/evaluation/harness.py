"""``nemo-viper eval``: the seven benchmarks through lmms-eval on one checkpoint (adapter; scoring in results.py).

A Hugging Face Qwen2.5-VL dir is evaluated as it is; a policy checkpoint or an RL run dir (Megatron
distributed checkpoint) is exported to ``OUT/hf_model`` first. lmms-eval runs in this process on the
task YAMLs of :func:`~nemo_viper.evaluation.benchmarks.write_task_overrides` (local datasets, offline
scorers, greedy decoding). Each task's lmms-eval result is kept as ``OUT/tasks/<task>.json`` (its
per-sample log as ``OUT/samples/<task>.jsonl``, :mod:`~nemo_viper.evaluation.samples`) with the
:func:`~nemo_viper.evaluation.provenance.run_key` that produced it: a rerun reuses a task only when the key
is the same (model content, backend, decoding settings, limit, task data, lmms-eval version) and recomputes
it otherwise; shard jobs of one evaluation write into the same ``OUT``. ``OUT/results.json`` +
``OUT/results.md`` are rewritten from the task files of this run's model and settings.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from nemo_viper.errors import ConfigError
from nemo_viper.evaluation.benchmarks import BENCHMARKS, dataset_dirs, write_task_overrides
from nemo_viper.evaluation.provenance import DigestCache, dataset_digest, key_differences, run_key
from nemo_viper.evaluation.results import summarise, write_summary
from nemo_viper.evaluation.samples import write_samples
from nemo_viper.evaluation.schema import check_schemas

log = logging.getLogger(__name__)

MODEL_BACKENDS = ("qwen2_5_vl", "vllm")
# The image budget of both backends: lmms-eval's qwen2_5_vl defaults (its processor's min/max pixels). vLLM's
# Qwen2.5-VL processor would otherwise take the checkpoint's own bounds (3136 .. 12845056 for Qwen's releases),
# i.e. other image resolutions than the qwen2_5_vl backend for the same checkpoint.
IMAGE_PIXELS = {"min_pixels": 256 * 28 * 28, "max_pixels": 1605632}
# The lmms-eval model class of ``--backend vllm`` (in its run key: results of another vllm adapter, e.g. lmms-eval's
# own vllm model that saw other images and stop rules, are recomputed, not reused).
VLLM_MODEL = "nemo_viper.evaluation.vllm_model.Qwen25VLVLLM"


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation. ``model_args``: extra lmms-eval model arguments (e.g. ``max_pixels``).

    ``max_new_tokens``: a cap applied to every task (None = each task's own budget; recorded in the results).
    ``limit``: first N documents per task (smoke runs; recorded). ``device``: ``auto`` = cuda if available.
    """

    model: str
    out: str
    dataset_root: str
    tasks: tuple[str, ...] = tuple(BENCHMARKS)
    backend: str = "qwen2_5_vl"
    model_args: dict = field(default_factory=dict)
    batch_size: int = 1
    max_new_tokens: int | None = None
    limit: int | None = None
    device: str = "auto"

    def __post_init__(self):
        if self.backend not in MODEL_BACKENDS:
            raise ConfigError(f"eval backend={self.backend!r} is not one of {MODEL_BACKENDS}")
        if self.batch_size < 1:
            raise ConfigError(f"eval batch_size={self.batch_size} must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval limit={self.limit} must be >= 1 (None: every document)")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"eval max_new_tokens={self.max_new_tokens} must be >= 1")


def model_source(model: str | Path) -> Path:
    """The files that are the model: a Hugging Face dir itself, or the (latest) policy checkpoint."""
    from nemo_viper.models.checkpoint_dir import METADATA_FILE, resolve_checkpoint

    model = Path(model)
    if (model / "config.json").is_file():
        return model
    checkpoint = resolve_checkpoint(model)
    if not (checkpoint / METADATA_FILE).is_file():
        raise ConfigError(f"--model {model}: neither a Hugging Face dir (config.json) nor a policy checkpoint")
    return checkpoint


def hf_model_dir(source: Path, model_sha256: str, out: Path) -> Path:
    """The HF dir to evaluate: ``source`` itself, or ``out/hf_model`` exported from a Megatron checkpoint
    (re-exported unless it was exported from a checkpoint with the same content digest)."""
    from nemo_viper.models.checkpoint import export_checkpoint

    if (source / "config.json").is_file():
        return source
    exported = out / "hf_model"
    stamp = exported / ".exported_from"
    if not (stamp.is_file() and stamp.read_text() == model_sha256):
        from nemo_viper.runtime import cpu_mode

        with cpu_mode.unless_cuda():  # Megatron runs for the export only; lmms-eval runs outside CPU mode
            export_checkpoint(source, exported)
        stamp.write_text(model_sha256)
    return exported


def check_auto_processor(hf_dir: Path) -> None:
    """Both backends build the processor with ``AutoProcessor``. For a dir declaring a processor class it
    cannot resolve, it returns the bare tokenizer, and lmms-eval's ``qwen2_5_vl`` model would then drop every
    image without a word: a one-line error instead."""
    from transformers import AutoProcessor, ProcessorMixin

    try:
        processor = AutoProcessor.from_pretrained(str(hf_dir))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"{hf_dir}: AutoProcessor cannot load a processor ({type(exc).__name__}: {first_line}); "
                          "a Qwen2.5-VL dir needs its preprocessor_config.json and tokenizer files") from exc
    if not isinstance(processor, ProcessorMixin):
        raise ConfigError(f"{hf_dir}: AutoProcessor gives a {type(processor).__name__}, not a Qwen2.5-VL processor "
                          "(its processor_config.json / tokenizer_config.json must declare processor_class "
                          "'Qwen2_5_VLProcessor'); the evaluation would drop every image")


def _device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def decoding_arguments(config: EvalConfig) -> dict:
    """lmms-eval ``model_args`` for the backend except the model path (device, dtype, image budget; user
    args win).

    Both backends decode with the same settings: bf16 weights (lmms-eval's ``qwen2_5_vl`` always loads bf16),
    the :data:`IMAGE_PIXELS` budget (``min_pixels``/``max_pixels`` in ``model_args`` override it for either),
    and each task's own ``max_new_tokens`` (every task YAML states one, see ``benchmarks.py``): lmms-eval's
    ``vllm`` model generates ``max(task budget, its max_new_tokens)`` tokens, so its ``max_new_tokens`` is 1.
    """
    device = _device(config.device)
    user = dict(config.model_args)
    pixels = {key: int(user.pop(key, value)) for key, value in IMAGE_PIXELS.items()}
    if config.backend == "vllm":
        args = {"tensor_parallel_size": 1, "dtype": "bfloat16", "max_new_tokens": 1, "mm_processor_kwargs": pixels,
                **({} if device.startswith("cuda") else {"enforce_eager": True})}
    else:
        args = {"device": device, "device_map": device, **pixels}
    return {**args, **user}


def model_arguments(config: EvalConfig, hf_dir: Path) -> dict:
    """lmms-eval ``model_args``: the model path and :func:`decoding_arguments`."""
    return {("model" if config.backend == "vllm" else "pretrained"): str(hf_dir), **decoding_arguments(config)}


def generation_settings(config: EvalConfig) -> dict:
    """The decoding settings a result depends on (part of its run key); ``vllm``: with :data:`VLLM_MODEL`."""
    return {"model_args": decoding_arguments(config), "batch_size": config.batch_size,
            "max_new_tokens_cap": config.max_new_tokens,
            **({"vllm_model": VLLM_MODEL} if config.backend == "vllm" else {})}


def _arg_string(model_args: dict) -> str:
    """lmms-eval's ``key=value,key=value`` (dict values as JSON, which its vllm model parses back)."""
    return ",".join(f"{key}={json.dumps(value) if isinstance(value, dict) else value}"
                    for key, value in model_args.items())


def run_lmms_eval(tasks: tuple[str, ...], model, model_args: dict | None, include_path: Path, config: EvalConfig) -> dict:
    """lmms-eval's ``simple_evaluate`` on ``tasks`` (lmms-eval model name + args, or a model object), with its
    per-sample logging (``results["samples"]``). ``vllm`` is :class:`~nemo_viper.evaluation.vllm_model.
    Qwen25VLVLLM` (lmms-eval's vllm chat model with qwen2_5_vl's images, stop token and repetition penalty)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    gen_kwargs = f"max_new_tokens={config.max_new_tokens}" if config.max_new_tokens else None
    if model == "vllm":  # lmms-eval's vllm model, given what its qwen2_5_vl model gives transformers
        from nemo_viper.evaluation.vllm_model import Qwen25VLVLLM

        model = Qwen25VLVLLM.create_from_arg_string(_arg_string(model_args), {"batch_size": config.batch_size})
        model_args = None
    if model_args is not None:
        model_args = _arg_string(model_args)
    return simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), task_manager=manager,
                           batch_size=config.batch_size, limit=config.limit, gen_kwargs=gen_kwargs,
                           log_samples=True, bootstrap_iters=0, random_seed=0)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def task_keys(config: EvalConfig, model_sha256: str, cache: DigestCache) -> dict[str, dict]:
    """Each task's :func:`~nemo_viper.evaluation.provenance.run_key` for ``config``."""
    shared = {"model_sha256": model_sha256, "backend": config.backend, "generation": generation_settings(config),
              "limit": config.limit, "lmms_eval_version": _lmms_version()}
    return {task: run_key(**shared, dataset_sha256=dataset_digest(cache, dataset_dirs(BENCHMARKS[task],
                                                                                      config.dataset_root)))
            for task in config.tasks}


def _reusable(task_file: Path, key: dict) -> bool:
    """Whether ``task_file`` holds a result produced with ``key`` (logs what differs otherwise)."""
    if not task_file.is_file():
        return False
    differences = key_differences(json.loads(task_file.read_text()).get("key"), key)
    if differences:
        log.warning("eval task %s: recomputing, its stored result differs in %s", task_file.stem,
                    ", ".join(differences))
    return not differences


RUN_FIELDS = ("model_sha256", "backend", "generation", "limit", "lmms_eval_version")  # every task of one run shares


def _same_run(a: dict | None, b: dict) -> bool:
    return bool(a) and not key_differences({k: a.get(k) for k in RUN_FIELDS}, {k: b[k] for k in RUN_FIELDS})


def evaluate(config: EvalConfig, model=None) -> dict:
    """Run the tasks of ``config`` without a reusable result and rewrite the summary. ``model``: an lmms-eval
    model object to use instead of loading ``config.model`` (tests' scripted model; the run key still takes
    the content digest of ``config.model``). Returns the summary."""
    out = Path(config.out)
    task_dir = out / "tasks"
    check_schemas(config.tasks, config.dataset_root)
    if model is None and config.backend == "vllm":
        from nemo_viper.rollout.vllm_backend import require_vllm

        require_vllm("eval backend")
    source = model_source(config.model)
    task_dir.mkdir(parents=True, exist_ok=True)
    cache = DigestCache(out / ".content_sha256.json")
    model_sha256 = cache.tree_digest(source)
    keys = task_keys(config, model_sha256, cache)
    cache.save()
    pending = tuple(t for t in config.tasks if not _reusable(task_dir / f"{t}.json", keys[t]))
    if pending:
        include_path = write_task_overrides(pending, config.dataset_root, out / "lmms_tasks")
        if model is None:
            hf_dir = hf_model_dir(source, model_sha256, out)
            check_auto_processor(hf_dir)
            model, model_args = config.backend, model_arguments(config, hf_dir)
            if config.backend == "vllm":
                from nemo_viper.rollout.vllm_backend import VLLMGenerationConfig, configure_vllm_environment

                configure_vllm_environment(VLLMGenerationConfig())  # in-process engine; CPU: 1 GiB KV cache
        else:
            model_args = None
        results = run_lmms_eval(pending, model, model_args, include_path, config)
        for task in pending:
            write_samples(out, task, results["samples"])  # before the task file that marks the task done
            task_results = {name: value for name, value in results["results"].items()
                            if name == task or name.startswith(f"{task}_")}
            _write_json(task_dir / f"{task}.json", {"task": task, "results": task_results,
                                                    "n_samples": results.get("n-samples", {}),
                                                    "model": str(config.model), "model_args": model_args,
                                                    "key": keys[task]})
    files = _read_task_files(task_dir)
    current = next(iter(keys.values()))
    others = sorted(t for t, data in files.items() if not _same_run(data.get("key"), current))
    if others:
        log.warning("eval: %s/tasks/%s left out of the summary (another model or other settings)", out,
                    ",".join(others))
    return write_summary(out, summarise({t: d for t, d in files.items() if t not in others}, model=str(config.model)))


def _read_task_files(task_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(task_dir.glob("*.json"))}


def collect(out: str | Path) -> dict:
    """Rewrite ``out/results.{json,md}`` from the task files that shard jobs wrote (all of one run key)."""
    out = Path(out)
    files = _read_task_files(out / "tasks")
    if not files:
        raise ConfigError(f"{out}/tasks holds no task results")
    first, data = next(iter(files.items()))
    keyless = sorted(t for t, d in files.items() if not d.get("key"))
    others = keyless or sorted(t for t, d in files.items() if not _same_run(d["key"], data["key"]))
    if others:
        raise ConfigError(f"{out}/tasks: {','.join(others)} not produced with the model and settings of "
                          f"{first} (the run key in each task file); rerun them with nemo-viper eval")
    return write_summary(out, summarise(files, model=data.get("model", str(out))))


def _lmms_version() -> str:
    from importlib.metadata import version

    return version("lmms_eval")
