"""nemo-viper: the command line of the ViPER recipe (the commands: README.md, "Commands").

User-facing errors (:class:`~nemo_viper.errors.NemoViperError`) are printed as one line,
``error: <message>``, with exit status 2. Multi-rank commands run under ``torchrun``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import contextmanager, nullcontext

from nemo_viper.errors import EvalGuardStop, NemoViperError


def _add_layout_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")


def cmd_tiny_model(args) -> None:
    from nemo_viper.models.tiny import TinyModelConfig, read_tiny_recipe, write_tiny_checkpoint
    from nemo_viper.models.tiny_warmstart import WarmStartConfig

    model = TinyModelConfig() if args.seed is None else TinyModelConfig(seed=args.seed)
    warm = WarmStartConfig(steps=args.warm_start_steps, seed=model.seed) if args.warm_start_steps else None
    with _single_writer(args.out):
        out = write_tiny_checkpoint(args.out, model, warm_start=warm)
    if warm:
        loss = read_tiny_recipe(out)["warm_start_final_loss"]
        print(f"warm-started on the prompt formats for {args.warm_start_steps} steps (final loss {loss:.3f})")
    print(f"tiny Qwen2.5-VL checkpoint written to {out}")


def cmd_convert_import(args) -> None:
    from nemo_viper.models.checkpoint import import_hf

    with _single_writer(args.out):
        out = import_hf(args.hf, args.out, tensor_parallel=args.tp, pipeline_parallel=args.pp)
    if _is_rank_zero():
        print(f"imported {args.hf} -> {out}")


def cmd_convert_export(args) -> None:
    from nemo_viper.models.checkpoint import export_checkpoint

    shard = {} if args.max_shard_mib is None else {"max_shard_bytes": int(args.max_shard_mib * 2**20)}
    with _single_writer(args.out):
        out = export_checkpoint(args.ckpt, args.out, tensor_parallel=args.tp, pipeline_parallel=args.pp, **shard)
    if _is_rank_zero():
        print(f"exported {args.ckpt} -> {out}")


# Flags of ``train`` for the commonly used settings: each sets one key of the run config (defaults and
# allowed values live in the config's dataclasses only; the value is parsed and checked there).
TRAIN_FLAGS = {
    "--steps": "rl.steps",
    "--prompts-per-step": "rl.prompts_per_step",
    "--responses-per-prompt": "rl.n",
    "--max-new-tokens": "rl.sampling.max_new_tokens",
    "--temperature": "rl.sampling.temperature",
    "--top-p": "rl.sampling.top_p",
    "--seed": "rl.sampling.seed",
    "--lr": "rl.grpo.optimizer.lr",
    "--num-minibatches": "rl.grpo.num_minibatches",
    "--micro-batch-size": "rl.grpo.micro_batch_size",
    "--aggregation": "rl.grpo.loss.aggregation",
    "--eps-low": "rl.grpo.loss.eps_low",
    "--eps-high": "rl.grpo.loss.eps_high",
    "--kl-beta": "rl.grpo.loss.kl_beta",
    "--save-every": "rl.save_every",
    "--image-backend": "rl.image_backend",
    "--prefetch-prompts": "rl.prefetch_prompts",
    "--min-pixels": "rl.min_pixels",
    "--max-pixels": "rl.max_pixels",
    "--importance-sampling-cap": "rl.grpo.importance_sampling_cap",
    "--rollout-backend": "rollout.backend",
    "--generation-batch-size": "rollout.megatron.max_batch_size",
    "--vllm-gpu-memory-utilization": "rollout.vllm.gpu_memory_utilization",
    "--vllm-cpu-kv-cache-gib": "rollout.vllm.cpu_kv_cache_gib",
    "--reward-model": "reward.embedding_model",
    "--reward-mode": "reward.mode",
    "--reward-threshold": "reward.threshold",
    "--heldout-count": "eval.heldout.count",
    "--heldout-fraction": "eval.heldout.fraction",
    "--heldout-samples": "eval.heldout.samples",
    "--precision": "model.precision",
    "--fp8-recipe": "model.fp8_recipe",
    "--layer-spec": "model.layer_spec",
    "--recompute": "model.recompute",
    "--tp": "parallel.tensor",
    "--pp": "parallel.pipeline",
}
TRAIN_SWITCHES = {"--dynamic-sampling": "rl.grpo.dynamic_sampling", "--overlong-filtering": "rl.grpo.overlong_filtering",
                  "--no-std": "rl.grpo.advantage.normalize_by_std=false", "--recompute-vision": "model.recompute_vision",
                  "--no-vllm-sleep-mode": "rollout.vllm.enable_sleep_mode=false"}
_TRAIN_KEYS = {**TRAIN_FLAGS, **TRAIN_SWITCHES}


def config_default(key: str):
    """The :class:`~nemo_viper.config.ViperConfig` dataclasses' default of the dotted ``key``."""
    from nemo_viper.config import ViperConfig

    value = ViperConfig()
    for part in key.split("."):
        value = getattr(value, part)
    return value


class _TrainHelpFormatter(argparse.HelpFormatter):
    """``train --help``: each flag's help names the dataclass default of its key, looked up only when the
    help is printed (the flags themselves default to ``None``: unset keys keep the config's value)."""

    def _get_help_string(self, action):
        key = _TRAIN_KEYS.get(action.option_strings[0]) if action.option_strings else None
        if key is None:
            return action.help
        default = config_default(key.partition("=")[0])
        return f"{action.help} (default {default})".replace("%", "%%")


def train_config(args):
    """The :class:`~nemo_viper.training.stage.StageConfig` of a ``train`` command line: the run config
    (``--config`` file, else the defaults), then ``KEY=VALUE`` overrides, then the flags."""
    from dataclasses import asdict

    from nemo_viper.config import compose
    from nemo_viper.models.policy import PolicyOptions
    from nemo_viper.planning.recipe import caption_tokens
    from nemo_viper.training.stage import StageConfig

    overrides = list(args.overrides)
    for flag, key in TRAIN_FLAGS.items():
        value = getattr(args, _dest(flag))
        if value is not None:
            overrides.append(f"{key}={value}")
    for flag, key in TRAIN_SWITCHES.items():
        if getattr(args, _dest(flag)):
            overrides.append(key if "=" in key else f"{key}=true")
    config = compose(args.config, overrides)
    return StageConfig(stage=args.stage, data=args.data, policy=args.policy, out=args.out, rl=config.rl,
                       rollout=config.rollout, reward=config.reward, model=PolicyOptions(**config.model.options()),
                       tensor_parallel=config.parallel.tensor, pipeline_parallel=config.parallel.pipeline,
                       heldout=config.eval.heldout, logger=config.logger, run_config=asdict(config),
                       caption_tokens=caption_tokens(config.synthesis), progress_dir=args.progress_dir or "",
                       progress_start=args.progress_start or "", progress_final=args.progress_final or "",
                       exit_signal=config.cluster.exit_signal)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def cmd_train(args) -> int | None:
    """One RL stage; on ``cluster.exit_signal`` it stops after the step in progress with a checkpoint and
    returns :data:`~nemo_viper.runtime.exit_signal.EXIT_REQUEUE` (a rerun resumes)."""
    from nemo_viper.runtime.exit_signal import EXIT_REQUEUE, ExitRequested, ExitSignal, parse_signal
    from nemo_viper.training.stage import run_stage

    config = train_config(args)
    signum = parse_signal("cluster.exit_signal", config.exit_signal)
    with _single_writer(args.out), ExitSignal(signum) as exit_signal:
        try:
            run_stage(config, exit_signal)
        except ExitRequested as stop:
            if _is_rank_zero():
                print(f"RL stage {args.stage} {stop} ({args.out}/checkpoints/latest); run it again to resume",
                      file=sys.stderr)
            return EXIT_REQUEUE
    if _is_rank_zero():
        print(f"RL stage {args.stage} finished: {args.out}/checkpoints/latest")


def cmd_tiny_diffusion(args) -> None:
    from nemo_viper.synthesis.tiny_diffusion import write_tiny_pipelines

    for path in write_tiny_pipelines(args.out):
        print(f"tiny diffusers pipeline written to {path}")


def synth_config(args):
    """The :class:`~nemo_viper.synthesis.config.SynthConfig` of a ``synth`` command line."""
    from nemo_viper.synthesis.config import load_config

    return load_config(
        args.config, args.overrides, stage=args.stage, out=args.out, images=args.images, stage1=args.stage1,
        shard_index=args.shard_index, num_shards=args.num_shards, **{"vlm.policy": args.policy},
    )


def cmd_synth(args) -> None:
    from nemo_viper.synthesis.run import run_synthesis

    config = synth_config(args)
    with _single_writer(args.out, part=f"task{config.shard_index}"):
        manifest = run_synthesis(config)
    if _is_rank_zero():
        if manifest is None:
            print(f"synthesis stage {args.stage}: this task's chunks are done; {args.out}/manifest.json is written "
                  "when every shard task has finished")
        else:
            print(f"synthesis stage {args.stage}: {manifest['total_samples']} samples of {manifest['inputs']} inputs "
                  f"in {len(manifest['shards'])} shards -> {args.out}")


def cmd_eval(args) -> None:
    from nemo_viper.evaluation.benchmarks import parse_tasks
    from nemo_viper.evaluation.harness import EvalConfig, collect, evaluate
    from nemo_viper.evaluation.results import load_summary, write_comparison

    if args.compare:
        labels = args.labels or [os.path.basename(os.path.normpath(p)) for p in args.compare]
        if len(labels) != len(args.compare):
            raise NemoViperError(f"--labels has {len(labels)} names for {len(args.compare)} --compare results")
        out = write_comparison([(l, load_summary(p)) for l, p in zip(labels, args.compare)], args.out or "eval_compare",
                               dirs=args.compare if all(map(os.path.isdir, args.compare)) else None)
        print(out.read_text())
        return
    if args.collect:
        summary = collect(args.collect)
    else:
        if not args.model or not args.dataset_root:
            raise NemoViperError("eval needs --model and --dataset-root (or --compare / --collect)")
        tasks = parse_tasks(args.tasks)
        if args.num_shards:
            if not 0 <= (args.shard_index or 0) < args.num_shards:
                raise NemoViperError(f"--shard-index {args.shard_index} is not in [0, {args.num_shards})")
            tasks = tasks[args.shard_index or 0::args.num_shards]
        model_args = dict(item.split("=", 1) for item in args.model_args.split(",")) if args.model_args else {}
        config = EvalConfig(model=args.model, out=args.out or "eval_results", dataset_root=args.dataset_root,
                            tasks=tasks, backend=args.backend, model_args=model_args, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, limit=args.limit, device=args.device)
        summary = evaluate(config)
    print(open(os.path.join(args.collect or args.out or "eval_results", "results.md")).read())
    if args.guard_against:
        from nemo_viper.evaluation.results import check_drop

        check_drop(load_summary(args.guard_against), summary, args.max_drop)


def cmd_tiny_eval_data(args) -> None:
    from nemo_viper.evaluation.tiny_datasets import write_tiny_datasets

    print(f"tiny benchmark datasets written to {write_tiny_datasets(args.out)}")


def _recipe_config(args, check_paths: bool | None = None):
    from nemo_viper.config import validate
    from nemo_viper.recipes import recipe

    overrides = list(args.overrides)
    if getattr(args, "executor", None):
        overrides.append(f"cluster.executor={args.executor}")
    config = recipe(args.recipe, *overrides)
    validate(config, check_paths=not getattr(args, "dry_run", False) if check_paths is None else check_paths)
    config.run_dir = os.path.abspath(config.run_dir)  # jobs run elsewhere (containers, other nodes)
    return config


def cmd_run(args) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from nemo_viper.local_run import run_local
    from nemo_viper.orchestration import RunPaths, plan

    config = _recipe_config(args)
    console = Console()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(f"{config.name}: starting", total=len(plan(config)))

        def show(phase, status):
            if status == "start":
                progress.update(bar, description=f"{config.name}: {phase.name} (log: {config.run_dir}/logs)")
                return
            progress.advance(bar)
            console.print(f"{phase.name:<16} {'already done' if status == 'skip' else 'done'}")

        run_local(config, on_phase=show, start=args.start)
    console.print(f"run report: {RunPaths(config.run_dir).report / 'report.md'}")


def cmd_report(args) -> None:
    from nemo_viper.orchestration import load_run_config
    from nemo_viper.report import write_report

    config = load_run_config(args.run_dir)
    print(f"run report: {write_report(args.run_dir, config.rounds, config.reward.alert_gap, config.logger.alerts)}")


def cmd_config(args) -> None:
    from nemo_viper.config import to_yaml

    print(to_yaml(_recipe_config(args, check_paths=False)), end="")


def _add_plan_arguments(parser) -> None:
    """The GPU ``plan`` (and ``launch``, before it submits) checks memory and synthesis time against."""
    from nemo_viper.planning.recipe import DEFAULT_GPU, DEFAULT_GPU_GIB
    from nemo_viper.planning.synthesis_time import GPU_BF16_TFLOPS

    parser.add_argument("--gpu-memory", type=float, default=DEFAULT_GPU_GIB,
                        help=f"GiB per GPU the memory plan checks against (default {DEFAULT_GPU_GIB})")
    parser.add_argument("--gpu", choices=tuple(GPU_BF16_TFLOPS), default=DEFAULT_GPU,
                        help=f"GPU model the synthesis time is estimated for (default {DEFAULT_GPU})")
    parser.add_argument("--synthesis-images", type=int, default=None, metavar="N",
                        help="input images of a synthesis round (default: synthesis.images counted, if readable here)")


def cmd_plan(args) -> None:
    from nemo_viper.planning.recipe import format_plan, plan_recipe

    config = _recipe_config(args, check_paths=False)
    print(format_plan(plan_recipe(config, args.gpu_memory, gpu=args.gpu, synthesis_images=args.synthesis_images),
                      args.recipe))


def cmd_launch(args) -> None:
    from nemo_viper.launcher.nemo_run_jobs import launch

    config = _recipe_config(args)
    if config.parallel.gpus_per_node and not args.ignore_memory_plan:
        from nemo_viper.planning.recipe import refuse_if_not_fitting

        refuse_if_not_fitting(config, args.gpu_memory)
    if config.cluster.executor == "slurm" and not args.ignore_time_plan:
        from nemo_viper.planning.recipe import count_synthesis_inputs, refuse_if_synthesis_exceeds_time

        images = args.synthesis_images if args.synthesis_images is not None else count_synthesis_inputs(config)
        refuse_if_synthesis_exceeds_time(config, args.gpu, images)
    from nemo_viper.runtime.locks import run_dir_owner

    # Through an SSH tunnel the run dir and its lock are on the cluster: one launcher at a time is the user's rule
    remote = bool(config.cluster.ssh.host)
    with nullcontext() if args.dry_run or remote else run_dir_owner(config.run_dir):
        print(launch(config, dry_run=args.dry_run, start=args.start))


def cmd_status(args) -> None:
    from nemo_viper.cluster import check_login
    from nemo_viper.config import compose
    from nemo_viper.errors import ConfigError
    from nemo_viper.launcher.nemo_run_jobs import status

    other = [o for o in args.overrides if not o.startswith("cluster.ssh.")]
    if other:
        raise ConfigError(f"status takes only cluster.ssh.KEY=VALUE (the login node to read the run through), "
                          f"not {other[0]!r}")
    ssh = compose(None, args.overrides).cluster.ssh if args.overrides else None
    if ssh is not None:
        check_login(ssh)
    print(status(args.run_dir, ssh))


def cmd_restore(args) -> None:
    from nemo_viper.run_state import restore
    from nemo_viper.runtime.locks import run_dir_owner

    with run_dir_owner(args.run_dir):
        for line in restore(args.run_dir, args.phases):
            print(line)


def cmd_doctor(args) -> int:
    from nemo_viper import doctor
    from nemo_viper.orchestration import load_run_config

    if bool(args.run_dir) == bool(args.recipe):
        raise NemoViperError("doctor: give --run-dir DIR (a launched run) or --recipe NAME [key=value ...]")
    config = load_run_config(args.run_dir) if args.run_dir else _recipe_config(args, check_paths=False)
    print(doctor.summary())
    problems = doctor.check(config, args.phase, gpu=args.gpu)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 2
    print(f"preflight ok{f' for {args.phase}' if args.phase else ''}")
    return 0


def cmd_mark_done(args) -> None:
    from nemo_viper.orchestration import load_run_config, plan
    from nemo_viper.run_state import output_problem, verify_and_record

    if not _is_rank_zero():
        return
    phases = plan(load_run_config(args.run_dir))
    phase = next((p for p in phases if p.name == args.phase), None)
    if phase is None:
        raise NemoViperError(f"phase {args.phase!r} is not in the plan of {args.run_dir}")
    if args.partial_ok and output_problem(phase) is not None:
        print(f"{phase.name}: this task is done; the phase is recorded when its last task finishes")
        return
    verify_and_record(phase, phases, args.run_dir)
    print(f"{phase.name}: outputs verified, recorded done in {args.run_dir}/state.json")


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def _single_writer(out: str, part: str | None = None):
    """Hold ``out``'s writer lock (:mod:`nemo_viper.runtime.locks`) for the job: its first rank takes it,
    so a second job writing the same directory fails at once."""
    if not _is_rank_zero():
        yield
        return
    from nemo_viper.runtime.locks import exclusive_writer

    with exclusive_writer(out, part):
        yield


CHECKPOINT_WARNING = (
    "Checkpoints are code: loading a Megatron checkpoint unpickles parts of it, so a crafted one runs arbitrary "
    "code. Load only checkpoints you trust. Checkpoints written by nemo_viper carry a manifest of file hashes "
    "that is checked before loading; a checkpoint that fails the check or has no manifest is refused unless "
    "--trust-checkpoint is given."
)


def _loads_checkpoints(parser: argparse.ArgumentParser) -> None:
    """The trust switch of a command that loads a Megatron checkpoint (see :data:`CHECKPOINT_WARNING`)."""
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a checkpoint without a matching file manifest (tampered, foreign or older): "
                        "only for checkpoints from a source you trust")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemo-viper", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = commands.add_parser("tiny-model", help="write an offline tiny Qwen2.5-VL HF checkpoint")
    tiny.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    tiny.add_argument("--seed", type=int, help="weight-initialisation seed (default: the tiny model config's)")
    tiny.add_argument("--warm-start-steps", type=int, default=0,
                      help="fine-tune on templated examples of the loop's prompts so outputs parse (CPU default)")
    tiny.set_defaults(func=cmd_tiny_model)

    convert = commands.add_parser("convert", help="convert between HF and Megatron checkpoints")
    directions = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    imp = directions.add_parser("import", help="HF checkpoint dir -> Megatron distributed checkpoint")
    imp.add_argument("--hf", required=True, help="HF Qwen2.5-VL checkpoint directory")
    imp.add_argument("--out", required=True, help="output checkpoint directory")
    _add_layout_args(imp)
    imp.set_defaults(func=cmd_convert_import, megatron=True)
    exp = directions.add_parser("export", help="Megatron distributed checkpoint -> HF checkpoint dir",
                                description=f"Megatron distributed checkpoint -> HF checkpoint dir. {CHECKPOINT_WARNING}")
    exp.add_argument("--ckpt", required=True, help="policy checkpoint directory")
    exp.add_argument("--out", required=True, help="output HF directory")
    exp.add_argument("--max-shard-mib", type=float,
                     help="MiB per safetensors shard (default: the exporter's); each is written as soon as it "
                          "is full")
    _add_layout_args(exp)
    _loads_checkpoints(exp)
    exp.set_defaults(func=cmd_convert_export, megatron=True)

    train = commands.add_parser("train", help="one RL stage on synthesised shards -> checkpoints",
                                formatter_class=_TrainHelpFormatter,
                                description=f"One RL stage on synthesised shards -> checkpoints. {CHECKPOINT_WARNING}")
    train.add_argument("--stage", type=int, choices=(1, 2), required=True, help="1: caption_refine, 2: visual_op")
    train.add_argument("--data", required=True, help="dataset directory (shards + manifest.json)")
    train.add_argument("--policy", required=True, help="policy checkpoint or HF Qwen2.5-VL directory to start from")
    train.add_argument("--out", required=True, help="run directory (checkpoints/, metrics.jsonl, tensorboard/)")
    train.add_argument("--config", help="run config YAML (a run's config/viper.yaml, or any part of the tree); "
                       "default: the config dataclasses' defaults (`nemo-viper config --recipe NAME` prints a tree)")
    train.add_argument("--progress-dir", help="the run's scores across rounds (run_dir/progress): the policies "
                       "scored on one fixed held-out set (docs/evaluation.md, \"Across rounds\")")
    train.add_argument("--progress-start", metavar="LABEL", help="score the starting policy there as LABEL before "
                       "the first step; the fixed set is this stage's held-out split unless the run has one")
    train.add_argument("--progress-final", metavar="LABEL", help="score the final policy there as LABEL after "
                       "the last step")
    for flag, key in TRAIN_FLAGS.items():
        train.add_argument(flag, metavar="VALUE", help=f"sets {key}")
    for flag, key in TRAIN_SWITCHES.items():
        train.add_argument(flag, action="store_true", help=f"sets {key if '=' in key else key + '=true'}")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="run config overrides, e.g. rl.grpo.loss.dual_clip_c=3 reward.mode=f1")
    _loads_checkpoints(train)
    train.set_defaults(func=cmd_train, megatron=True)

    synth = commands.add_parser("synth", help="one synthesis stage (or one shard task of it) -> shards + manifest",
                                description="One synthesis stage (or one shard task of it) -> shards + manifest. "
                                f"{CHECKPOINT_WARNING}")
    synth.add_argument("--stage", type=int, choices=(1, 2), required=True, help="1: caption_refine, 2: visual_op")
    synth.add_argument("--policy", required=True, help="policy checkpoint or HF Qwen2.5-VL directory that synthesises")
    synth.add_argument("--out", required=True, help="dataset directory (a rerun resumes it)")
    synth.add_argument("--images", help="stage 1: image dir, .txt/.jsonl list, .tar shards or glob, or 'skimage' "
                                        "(default)")
    synth.add_argument("--stage1", help="stage 2: the stage-1 dataset directory")
    synth.add_argument("--shard-index", type=int, help="this shard task's index (default: the config's)")
    synth.add_argument("--num-shards", type=int,
                       help="number of shard tasks the job is split into (default: the config's)")
    synth.add_argument("--config", help="YAML file with synthesis settings (see docs/synthesis.md)")
    synth.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides, e.g. vlm.precision=fp32 redraw.call_kwargs.num_inference_steps=28")
    _loads_checkpoints(synth)
    synth.set_defaults(func=cmd_synth, megatron=True)

    tiny_diffusion = commands.add_parser("tiny-diffusion", help="write the offline tiny random diffusers pipelines")
    tiny_diffusion.add_argument("--out", required=True, help="output directory (one sub-directory per pipeline)")
    tiny_diffusion.set_defaults(func=cmd_tiny_diffusion)

    from nemo_viper.evaluation.harness import MODEL_BACKENDS, EvalConfig

    ev = commands.add_parser("eval", help="the paper's 7 benchmarks through lmms-eval; --compare: side by side")
    ev.add_argument("--model", help="HF Qwen2.5-VL dir, policy checkpoint or RL run dir (exported to OUT/hf_model)")
    ev.add_argument("--tasks", help=f"comma-separated lmms-eval tasks (default: all {len(EvalConfig.tasks)}: "
                                    f"{','.join(EvalConfig.tasks)})")
    ev.add_argument("--out", help="output dir: results.json, results.md, tasks/ (default eval_results; "
                                  "with --compare: eval_compare)")
    ev.add_argument("--dataset-root", help="root of the local dataset copies (layout: docs/evaluation.md)")
    ev.add_argument("--backend", default=EvalConfig.backend, choices=MODEL_BACKENDS,
                    help="lmms-eval model: qwen2_5_vl (transformers) or vllm (CUDA vllm; vllm-cpu on CPU)")
    ev.add_argument("--model-args", help="extra lmms-eval model args, e.g. max_pixels=1003520,attn_implementation=sdpa")
    ev.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    ev.add_argument("--max-new-tokens", type=int, help="cap every task's generation budget (smoke runs; recorded)")
    ev.add_argument("--limit", type=int, help="first N documents per task (smoke runs; recorded)")
    ev.add_argument("--device", default=EvalConfig.device, help="auto (cuda if available) | cpu | cuda | cuda:N")
    ev.add_argument("--shard-index", type=int, help="evaluate tasks[shard_index::num_shards] (one job per shard)")
    ev.add_argument("--num-shards", type=int)
    ev.add_argument("--collect", metavar="OUT", help="rewrite OUT/results.{json,md} from the shard jobs' task files")
    ev.add_argument("--compare", nargs="+", metavar="RESULTS", help="eval output dirs side by side, deltas to the first, and the "
                    "samples whose verdict changed against the first")
    ev.add_argument("--labels", nargs="+", help="column names for --compare (default: the dir names)")
    ev.add_argument("--guard-against", metavar="RESULTS",
                    help="exit with status 3 if the average dropped by more than --max-drop points against RESULTS")
    ev.add_argument("--max-drop", type=float, default=1.0, help="points of average score (default 1.0)")
    ev.set_defaults(func=cmd_eval)

    tiny_eval = commands.add_parser("tiny-eval-data", help="write tiny offline copies of the 7 benchmarks")
    tiny_eval.add_argument("--out", required=True, help="dataset root to write")
    tiny_eval.set_defaults(func=cmd_tiny_eval_data)

    for name, help_text in (("run", "the closed loop, locally (resumes an interrupted run)"),
                            ("launch", "the closed loop as NeMo-Run jobs (local or Slurm)")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--recipe", required=True, help="tiny | qwen25vl_3b | qwen25vl_7b")
        sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. rl.steps=20")
        sub.add_argument("--from", dest="start", metavar="PHASE",
                         help="re-run PHASE and every phase after it (their outputs are moved aside), done or not")
        if name == "launch":
            sub.add_argument("--executor", choices=("local", "slurm"), help="overrides cluster.executor")
            sub.add_argument("--dry-run", action="store_true",
                             help="show which phases would be submitted or skipped, and their sbatch scripts")
            sub.add_argument("--ignore-memory-plan", action="store_true",
                             help="launch even if `nemo-viper plan` says a phase does not fit")
            _add_plan_arguments(sub)
            sub.add_argument("--ignore-time-plan", action="store_true",
                             help="launch even if `nemo-viper plan` says a synthesis task exceeds cluster.time.synth")
        sub.set_defaults(func=cmd_run if name == "run" else cmd_launch)

    config = commands.add_parser("config", help="print a recipe's resolved config (YAML) after overrides",
                                 description="Print a recipe's resolved config, every key, as the run would use it "
                                 "(values and cross-section rules checked; paths not). KEY=VALUE sets a key; "
                                 "GROUP=PART swaps a part of conf/ (e.g. parallel=h100_tp1, reward=minilm).")
    config.add_argument("--recipe", required=True, help="tiny | qwen25vl_3b | qwen25vl_7b")
    config.add_argument("overrides", nargs="*", metavar="KEY=VALUE|GROUP=PART", help="config overrides")
    config.set_defaults(func=cmd_config)

    plan = commands.add_parser("plan", help="per-GPU memory of every phase of a recipe; verdict; what to change")
    plan.add_argument("--recipe", required=True, help="tiny | qwen25vl_3b | qwen25vl_7b")
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. rl.grpo.micro_batch_size=4")
    _add_plan_arguments(plan)
    plan.set_defaults(func=cmd_plan)

    status = commands.add_parser("status", help="each phase of a run: done or pending (and why), its Slurm job")
    status.add_argument("run_dir", metavar="RUN_DIR")
    status.add_argument("overrides", nargs="*", metavar="cluster.ssh.KEY=VALUE",
                        help="read the run and Slurm through a login node, as the launch did (host, user, port, "
                        "identity)")
    status.set_defaults(func=cmd_status)

    report = commands.add_parser("report", help="write a run's report (RUN_DIR/report: tables, plots, alerts, "
                                 "samples) from what its phases have written so far; the run's last phase")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.set_defaults(func=cmd_report)

    restore = commands.add_parser("restore", help="put back the outputs a rerun with a changed value set aside "
                                  "(<out>.superseded-<hash>), with the record they were finished with")
    restore.add_argument("run_dir", metavar="RUN_DIR")
    restore.add_argument("phases", nargs="*", metavar="PHASE", help="default: every phase with set-aside outputs")
    restore.set_defaults(func=cmd_restore)

    doctor = commands.add_parser("doctor", help="preflight: versions, GPU/FP8/NCCL, paths, model dirs, disk "
                                 "(first command of every job; one line per problem, exit 2)")
    doctor.add_argument("--run-dir", help="a launched run (its config/viper.yaml)")
    doctor.add_argument("--recipe", help="or a recipe: tiny | qwen25vl_3b | qwen25vl_7b")
    doctor.add_argument("--phase", help="check for this phase (its GPUs, the phases it needs)")
    doctor.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                        help="check the GPU (default: when the phase uses GPUs, or a GPU is visible)")
    doctor.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (with --recipe)")
    doctor.set_defaults(func=cmd_doctor)

    mark = commands.add_parser("mark-done", help="verify a phase's outputs and record it done (last command of a job)")
    mark.add_argument("--run-dir", required=True)
    mark.add_argument("--phase", required=True)
    mark.add_argument("--partial-ok", action="store_true",
                      help="a shard task of an array: incomplete outputs are not an error")
    mark.set_defaults(func=cmd_mark_done)
    return parser


def _megatron_runtime(args):
    """The commands that run Megatron (``set_defaults(megatron=True)``) run in CPU mode on a machine
    without CUDA (:mod:`nemo_viper.runtime.cpu_mode`); the others, and every command on a GPU, run as they are."""
    if not getattr(args, "megatron", False):
        return nullcontext()
    from nemo_viper.runtime import cpu_mode

    return cpu_mode.unless_cuda()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "trust_checkpoint", False):
            from nemo_viper.models.checkpoint_dir import trust_unverified_checkpoints

            trust_unverified_checkpoints()
        with _megatron_runtime(args):
            return args.func(args) or 0
    except EvalGuardStop as exc:
        print(f"stop: {exc}", file=sys.stderr)
        return 3
    except NemoViperError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
