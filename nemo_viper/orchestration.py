"""The closed loop as phases: the plan both runners execute.

:func:`plan` turns a :class:`~nemo_viper.config.ViperConfig` into phases, each a separate job that reads
and writes files under ``run_dir``::

    prepare (tiny only) [-> eval_data (tiny copies) -> eval (base model)]
        ->  round r:  synth1 (N shard tasks) -> rl1 -> synth2 (N shard tasks) -> rl2 [-> round r.eval]
        ->  export (last round): HF checkpoint of the final policy  ->  report: ``run_dir/report``

The bracketed benchmark phases run with ``eval.enabled`` (``nemo-viper eval``, ``eval.num_shards`` jobs,
then a collect job); the next round waits for them, so the guard (``eval.guard_max_drop``) can stop it.
Each RL stage scores its held-out split before and after training (``eval.heldout``); round 1's stage 1 also
scores the starting policy, and every round's stage 2 its final policy, on one fixed held-out set
(``run_dir/progress``, :mod:`nemo_viper.evaluation.progress`).

Round r synthesises stage-1 data with the checkpoint of round r-1 (the base model for r = 1), trains
stage 1 from it, synthesises stage-2 data with the stage-1 checkpoint, and trains stage 2 from that.
The same plan feeds the NeMo-Run launcher (``launcher/``) and the local runner
(:func:`nemo_viper.local_run.run_local`), which executes it phase by phase as subprocesses (``torchrun`` for the RL phases; each in its own process group, killed with ``run``:
:mod:`nemo_viper.runtime.lifetime`) and records each finished phase, once its outputs verify, with its
configuration's fingerprint in ``run_dir/state.json`` (:mod:`nemo_viper.run_state`); a rerun skips done
phases and continues with the first pending one, whose own resume logic (synthesis chunks, RL
checkpoints) picks up partial work.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from nemo_viper.config import ViperConfig, compose, rl_job_settings, synthesis_settings, to_yaml
from nemo_viper.errors import NemoViperError
from nemo_viper.evaluation.progress import START_LABEL, round_label

@dataclass(frozen=True)
class Phase:
    """One job: ``nemo-viper <args>`` on ``nodes`` x ``ranks_per_node`` processes (torchrun if ``distributed``).

    ``tasks`` independent copies run with ``--shard-index i --num-shards tasks`` appended (synthesis).
    ``kind`` (prepare, synth, rl, export, eval, eval_data, report), ``out`` and ``steps`` (RL) say what its finished outputs are
    (:func:`nemo_viper.run_state.output_problem`); ``settings`` is the configuration it reads from files
    (part of its fingerprint).
    """

    name: str
    args: tuple[str, ...]
    depends_on: tuple[str, ...] = ()
    distributed: bool = False
    nodes: int = 1
    ranks_per_node: int = 1
    gpus_per_node: int = 0
    tasks: int = 1
    kind: str = ""
    out: str = ""
    steps: int = 0
    settings: str = ""

    def task_args(self, index: int) -> tuple[str, ...]:
        if self.tasks == 1:
            return self.args
        return (*self.args, "--shard-index", str(index), "--num-shards", str(self.tasks))


@dataclass
class RunPaths:
    root: Path
    config: Path = field(init=False)
    synthesis_config: Path = field(init=False)

    def __post_init__(self):
        self.root = Path(self.root)
        self.config = self.root / "config" / "viper.yaml"
        self.synthesis_config = self.root / "config" / "synthesis.yaml"

    def round_dir(self, r: int) -> Path:
        return self.root / f"round{r}"

    def eval_dir(self, name: str) -> Path:
        """Benchmark results of ``base`` or ``round<r>`` (``nemo-viper eval --out``)."""
        return self.root / "eval" / name

    @property
    def eval_data(self) -> Path:
        return self.root / "eval_data"

    @property
    def progress(self) -> Path:
        """The scores of the starting policy and of each round on one fixed held-out set
        (:mod:`nemo_viper.evaluation.progress`)."""
        return self.root / "progress"

    @property
    def base_model(self) -> Path:
        return self.root / "base_model"

    @property
    def final_hf(self) -> Path:
        return self.root / "final_hf"

    @property
    def report(self) -> Path:
        """The run report (``nemo-viper report``): ``report.md`` and its plots."""
        return self.root / "report"


def _eval_phases(config: ViperConfig, name: str, model: str, previous: str | None, after: str | None) -> list[Phase]:
    """Benchmark phases of one checkpoint: ``eval.num_shards`` shard jobs (one GPU each on a cluster), then,
    with several shards, a collect job. The last one applies the guard against ``previous``'s results."""
    section = config.eval
    paths = RunPaths(config.run_dir)
    out = str(paths.eval_dir(name))
    root = str(paths.eval_data) if section.dataset_root == "tiny" else section.dataset_root
    guard = ()
    if previous is not None and section.guard_max_drop is not None:
        guard = ("--guard-against", str(paths.eval_dir(previous)), "--max-drop", str(section.guard_max_drop))
    args = ["eval", "--model", model, "--out", out, "--dataset-root", root, "--tasks", ",".join(section.tasks),
            "--backend", section.backend, "--batch-size", str(section.batch_size)]
    if section.model_args:
        args += ["--model-args", ",".join(f"{k}={v}" for k, v in section.model_args.items())]
    for key in ("max_new_tokens", "limit"):
        if getattr(section, key) is not None:
            args += [f"--{key.replace('_', '-')}", str(getattr(section, key))]
    gpus = 1 if config.parallel.gpus_per_node else 0
    depends_on = (after,) if after else ()
    prefix = f"{name}." if name != "base" else ""
    if section.num_shards == 1:
        return [Phase(f"{prefix}eval", (*args, *guard), depends_on=depends_on, gpus_per_node=gpus, kind="eval",
                      out=out)]
    shards = Phase(f"{prefix}eval", tuple(args), depends_on=depends_on, tasks=section.num_shards,
                   gpus_per_node=gpus, kind="eval", out=out)
    return [shards, Phase(f"{prefix}eval_collect", ("eval", "--collect", out, *guard), depends_on=(shards.name,),
                          kind="eval", out=out)]


def plan(config: ViperConfig) -> list[Phase]:
    """The phases of ``config.rounds`` rounds, in an order that respects their dependencies."""
    paths = RunPaths(config.run_dir)
    parallel = config.parallel
    synth_tasks = int(config.synthesis.get("num_shards", 1))
    gpus = parallel.gpus_per_node
    rl_ranks = gpus if gpus else parallel.cpu_ranks
    synth_common = ("--config", str(paths.synthesis_config))
    train_common = ("--config", str(paths.config))
    train_settings = OmegaConf.to_yaml(OmegaConf.create(rl_job_settings(config)))
    synth_gpus = config.cluster.synthesis_gpus_per_task if gpus else 0
    synth_settings = OmegaConf.to_yaml(OmegaConf.create(synthesis_settings(config)))
    phases: list[Phase] = []
    if config.model.hf_path == "tiny":
        phases.append(Phase("prepare", ("tiny-model", "--out", str(paths.base_model), "--warm-start-steps",
                                        str(config.model.tiny_warm_start_steps)),
                            kind="prepare", out=str(paths.base_model)))
        policy = str(paths.base_model)
    else:
        policy = config.model.hf_path
    previous = phases[-1].name if phases else None
    evaluated = None  # the checkpoint whose benchmark results the next evaluation is guarded against
    if config.eval.enabled:
        if config.eval.dataset_root == "tiny":
            phases.append(Phase("eval_data", ("tiny-eval-data", "--out", str(paths.eval_data)),
                                depends_on=(previous,) if previous else (), kind="eval_data",
                                out=str(paths.eval_data)))
            previous = phases[-1].name
        base = policy if config.model.hf_path == "tiny" else config.model.hf_path
        phases += _eval_phases(config, "base", base, None, previous)
        previous, evaluated = phases[-1].name, "base"
    for r in range(1, config.rounds + 1):
        rd = paths.round_dir(r)
        # the starting policy and every round's final policy on one fixed held-out set (round 1's stage-1 split)
        progress = ("--progress-dir", str(paths.progress)) if config.eval.heldout.enabled else ()
        progress_start = (*progress, "--progress-start", START_LABEL) if progress and r == 1 else ()
        progress_final = (*progress, "--progress-final", round_label(r)) if progress else ()
        deps = (previous,) if previous else ()
        synth1 = Phase(f"round{r}.synth1", ("synth", "--stage", "1", "--policy", policy, "--images",
                                            str(config.synthesis.get("images", "skimage")), "--out",
                                            str(rd / "synth1"), *synth_common),
                       depends_on=deps, tasks=synth_tasks, gpus_per_node=synth_gpus, kind="synth",
                       out=str(rd / "synth1"), settings=synth_settings)
        rl1 = Phase(f"round{r}.rl1", ("train", "--stage", "1", "--data", str(rd / "synth1"), "--policy", policy,
                                      "--out", str(rd / "rl1"), *train_common, *progress_start),
                    depends_on=(synth1.name,), distributed=True, nodes=parallel.nodes, ranks_per_node=rl_ranks,
                    gpus_per_node=gpus, kind="rl", out=str(rd / "rl1"), steps=config.rl.steps,
                    settings=train_settings)
        synth2 = Phase(f"round{r}.synth2", ("synth", "--stage", "2", "--policy", str(rd / "rl1"), "--stage1",
                                            str(rd / "synth1"), "--out", str(rd / "synth2"), *synth_common),
                       depends_on=(rl1.name,), tasks=synth_tasks, gpus_per_node=synth_gpus, kind="synth",
                       out=str(rd / "synth2"), settings=synth_settings)
        rl2 = Phase(f"round{r}.rl2", ("train", "--stage", "2", "--data", str(rd / "synth2"), "--policy",
                                      str(rd / "rl1"), "--out", str(rd / "rl2"), *train_common, *progress_final),
                    depends_on=(synth2.name,), distributed=True, nodes=parallel.nodes, ranks_per_node=rl_ranks,
                    gpus_per_node=gpus, kind="rl", out=str(rd / "rl2"), steps=config.rl.steps,
                    settings=train_settings)
        phases += [synth1, rl1, synth2, rl2]
        policy, previous = str(rd / "rl2"), rl2.name
        if config.eval.enabled:  # the next round waits for the guard
            phases += _eval_phases(config, f"round{r}", policy, evaluated, rl2.name)
            previous, evaluated = phases[-1].name, f"round{r}"
    phases.append(Phase("export", ("convert", "export", "--ckpt", policy, "--out", str(paths.final_hf)),
                        depends_on=(previous,), kind="export", out=str(paths.final_hf),
                        gpus_per_node=config.cluster.export_gpus if gpus else 0))
    report_settings = {"rounds": config.rounds, "reward": {"alert_gap": config.reward.alert_gap},
                       "logger": {"alerts": asdict(config.logger.alerts)}}
    phases.append(Phase("report", ("report", str(paths.root)), depends_on=("export",), kind="report",
                        out=str(paths.report), settings=OmegaConf.to_yaml(OmegaConf.create(report_settings))))
    return phases


def run_files(config: ViperConfig) -> dict[Path, str]:
    """Path -> text of the run's resolved config (``config/viper.yaml``) and of the synthesis part the synth
    jobs read."""
    paths = RunPaths(config.run_dir)
    return {paths.config: to_yaml(config),
            paths.synthesis_config: OmegaConf.to_yaml(OmegaConf.create(synthesis_settings(config)))}


def write_run_files(config: ViperConfig) -> RunPaths:
    """:func:`run_files`, each written atomically."""
    paths = RunPaths(config.run_dir)
    paths.synthesis_config.parent.mkdir(parents=True, exist_ok=True)
    for path, text in run_files(config).items():
        _atomic_write(path, text)
    return paths


def load_run_config(run_dir: str | Path, remote_text: str | None = None) -> ViperConfig:
    """The resolved config a run was started with (``run_dir/config/viper.yaml``), with ``run_dir`` as given.
    ``remote_text``: that file's text as read through an SSH tunnel (``None``: read here)."""
    path = RunPaths(run_dir).config
    if remote_text is not None:
        with tempfile.TemporaryDirectory() as scratch:
            copy = Path(scratch) / path.name
            copy.write_text(remote_text)
            return _check_run_dir(_compose_run_config(copy, path), run_dir, path)
    if not path.is_file():
        raise NemoViperError(f"{path} not found: not a run directory (or nothing was run or launched in it yet)")
    return _check_run_dir(_compose_run_config(path, path), run_dir, path)


def _compose_run_config(source: Path, path: Path) -> ViperConfig:
    try:
        return compose(source)
    except NemoViperError:
        raise
    except Exception as exc:  # yaml's parse errors, or a document that is not a mapping of sections
        detail = " ".join(str(exc).split())
        raise NemoViperError(f"{path} is not a readable run config ({type(exc).__name__}: {detail[:200]}); "
                             "run or launch the recipe again to rewrite it") from exc


def _check_run_dir(config: ViperConfig, run_dir: str | Path, path: Path) -> ViperConfig:
    if Path(config.run_dir).absolute() != Path(run_dir).absolute():
        raise NemoViperError(f"{path} belongs to run_dir={config.run_dir}, not {run_dir} (moved? launch it again "
                             f"with run_dir={Path(run_dir).absolute()})")
    return config


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


GUARD_STOP_EXIT = 3  # ``nemo-viper eval --guard-against``: the benchmark average dropped too far


def record_guard_stop(run_dir: str | Path, phase: Phase) -> None:
    """Record that ``phase`` (a round's eval) stopped the loop: the phases of later rounds are skipped."""
    (Path(run_dir) / "eval").mkdir(parents=True, exist_ok=True)
    _atomic_write(Path(run_dir) / "eval" / "stopped.json", json.dumps({"round": round_of(phase) or 0}) + "\n")


def round_of(phase: Phase) -> int | None:
    """The round number of a ``round<r>.…`` phase; None for the phases outside rounds."""
    head = phase.name.split(".")[0]
    return int(head[5:]) if head.startswith("round") and head[5:].isdigit() else None


def stopped_after_round(run_dir: str | Path) -> int | None:
    """The round whose benchmark guard stopped the loop (``run_dir/eval/stopped.json``), or None."""
    path = Path(run_dir) / "eval" / "stopped.json"
    return json.loads(path.read_text())["round"] if path.is_file() else None
