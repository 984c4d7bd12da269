"""The run's state: which phases are done, decided by their outputs and their configuration.

``run_dir/state.json`` (written atomically under a file lock, so array tasks may record concurrently)::

    {"version": 2,
     "phases": {"round1.synth1": {"fingerprint": "3f0c...", "finished_at": "2026-11-30T07:02:11Z"}, ...},
     "jobs":   {"round1.synth1": {"job_id": "123456", "array": "0-63%8", "submitted_at": "..."}, ...},
     "superseded": {"round1.rl1": [{"out": ".../round1/rl1", "path": ".../round1/rl1.superseded-3f0c...",
                                    "record": {"fingerprint": "3f0c...", ...}, "moved_at": "..."}], ...}}

A phase is **done** only when both hold:

1. its outputs exist and verify (:func:`output_problem`): a complete HF directory (``prepare``, ``export``),
   a dataset manifest whose shards are all present and that holds samples (synthesis), an RL run whose
   ``checkpoints/latest`` is a complete checkpoint of the configured final step; benchmark results of every
   task asked for (``eval``), or local copies of every benchmark (``eval_data``);
2. the state file records it with the **fingerprint** the current configuration gives it: a hash of the
   phase's command, the configuration it reads from files, and the fingerprints of the phases it depends
   on (:func:`fingerprints`). Changing a value therefore re-runs the phase it affects and everything
   downstream; a value that changes no phase (e.g. ``cluster.time``) re-runs nothing.

Every other phase is **pending**; :func:`phase_states` says why (``not started``, ``partial: ...``,
``outputs invalid: ...``, ``configuration changed``). A phase recorded with another fingerprint is
*stale*: as it re-runs, its outputs are moved aside to ``<out>.superseded-<old fingerprint>``
(:func:`clear_for_rerun`), so the re-run starts clean and nothing is deleted; ``nemo-viper restore RUN_DIR
[PHASE ...]`` puts them back with their record (:func:`restore`).

Shared by the local runner (``nemo-viper run``), the launcher (``nemo-viper launch``: only pending phases
are submitted) and ``nemo-viper status``. Importing this module does not import torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from nemo_viper.errors import NemoViperError

if TYPE_CHECKING:
    from nemo_viper.orchestration import Phase

STATE_VERSION = 2
STATE_FILE = "state.json"
# Files an HF model directory needs, by what they provide (any one file of a group is enough).
HF_MODEL_FILES = {
    "config": ("config.json",),
    "weights": ("model.safetensors", "model.safetensors.index.json"),
    "tokenizer": ("tokenizer.json", "tokenizer_config.json"),
    "processor": ("preprocessor_config.json", "processor_config.json"),
}


def hf_model_problem(path: str | Path) -> str | None:
    """What makes ``path`` not a complete HF Qwen2.5-VL directory (config, weights, tokenizer, processor)."""
    path = Path(path)
    if not path.is_dir():
        return f"{path}: directory not found"
    missing = [f"{what} ({' or '.join(names)})" for what, names in HF_MODEL_FILES.items()
               if not any((path / name).is_file() for name in names)]
    if missing:
        return f"{path}: incomplete model directory, missing {', '.join(missing)}"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError) as exc:
            return f"{index}: unreadable weight index ({exc})"
        absent = sorted(s for s in shards if not (path / s).is_file())
        if absent:
            return f"{path}: incomplete model directory, missing weight shards {', '.join(absent[:3])}"
    return None


def _dataset_problem(out: Path) -> str | None:
    from nemo_viper.data.shards import DatasetError, read_manifest

    try:
        manifest = read_manifest(out)
    except DatasetError as exc:
        chunks = out / "chunks"
        done = len(list(chunks.glob("c*.json"))) if chunks.is_dir() else 0
        return f"partial: {done} chunks committed, no manifest yet" if done else str(exc)
    absent = [s["name"] for s in manifest["shards"] if not (out / s["name"]).is_file()]
    if absent:
        return f"{out}: {len(absent)} shard(s) of the manifest are missing, e.g. {absent[0]}"
    if manifest["total_samples"] < 1:
        return f"{out}: the dataset holds no samples ({manifest.get('inputs', '?')} inputs)"
    return None


def _rl_problem(out: Path, steps: int) -> str | None:
    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        return f"{out}: no checkpoint yet" if out.is_dir() else "not started"
    ckpt = out / "checkpoints" / pointer.read_text().strip()
    state = ckpt / "trainer_state.json"
    if not (ckpt / "nemo_viper_checkpoint.json").is_file() or not (ckpt / "model").is_dir() or not state.is_file():
        return f"{ckpt}: incomplete checkpoint"
    step = json.loads(state.read_text()).get("step")
    if step != steps:
        return f"partial: at step {step} of {steps}"
    return None


def output_problem(phase: Phase) -> str | None:
    """``None`` when ``phase``'s outputs exist and verify; otherwise what is missing or wrong (one line)."""
    out = Path(phase.out)
    if phase.kind in ("prepare", "export"):
        return hf_model_problem(out) if out.exists() else "not started"
    if phase.kind == "synth":
        return _dataset_problem(out) if out.exists() else "not started"
    if phase.kind == "rl":
        return _rl_problem(out, phase.steps)
    if phase.kind == "report":
        return None if (out / "report.md").is_file() else "not started"
    if phase.kind in ("eval", "eval_data"):
        from nemo_viper.evaluation.results import eval_output_problem

        return eval_output_problem(phase.kind, out, phase.args)
    raise ValueError(f"unknown phase kind {phase.kind!r}")


def fingerprints(phases: list[Phase], run_dir: str | Path) -> dict[str, str]:
    """Phase name -> 16 hex digits over its command, its file-borne settings and its dependencies' prints.

    Paths under ``run_dir`` (absolute) are taken relative to it, so a moved run dir keeps its prints. The shard
    split (``--shard-index``/``--num-shards``) is not part of a phase's command (see
    :meth:`~nemo_viper.orchestration.Phase.task_args`), so re-splitting a synthesis phase re-runs nothing.
    """
    root = str(Path(run_dir).absolute())
    prints: dict[str, str] = {}
    for phase in phases:
        args = ["$RUN_DIR" + a[len(root):] if a == root or a.startswith(root + "/") else a for a in phase.args]
        blob = json.dumps({"args": args, "settings": phase.settings,
                           "upstream": [prints[d] for d in phase.depends_on]}, sort_keys=True)
        prints[phase.name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return prints


@dataclass(frozen=True)
class PhaseState:
    name: str
    done: bool
    detail: str  # "done", or why not
    stale: bool = False  # recorded with another configuration: its outputs are set aside before a re-run


def parse_state(text: str | None, origin: str | Path) -> dict:
    """The state file's content (``None``: no file yet), checked entry by entry; ``origin`` names it in errors."""
    if text is None:
        return {"version": STATE_VERSION, "phases": {}, "jobs": {}, "superseded": {}}
    try:
        state = json.loads(text)
    except ValueError as exc:
        raise NemoViperError(f"{origin} is not valid JSON ({exc}); remove it to re-derive the state") from exc
    if not isinstance(state, dict):
        raise NemoViperError(f"{origin} holds a JSON {type(state).__name__}, not an object; remove it to "
                             "re-derive the state")
    if state.get("version") != STATE_VERSION:  # version 1 listed names without configurations: trust none
        state = {"version": STATE_VERSION, "phases": {}, "jobs": state.get("jobs", {})}
    state.setdefault("superseded", {})
    for key, entry_type in (("phases", dict), ("jobs", dict), ("superseded", list)):
        entries = state.setdefault(key, {})
        bad = (f"{key!r} is a {type(entries).__name__}" if not isinstance(entries, dict) else
               next((f"{key}.{name} is {entry!r}" for name, entry in entries.items()
                     if not isinstance(entry, entry_type)), None))
        if bad is None and key == "phases":
            bad = next((f"phases.{name}.fingerprint is {entry.get('fingerprint')!r}"
                        for name, entry in entries.items() if not isinstance(entry.get("fingerprint"), str)), None)
        if bad:
            raise NemoViperError(f"{origin}: {bad}, not a {entry_type.__name__}; remove it (or that entry) "
                                 "to re-derive the state")
    return state


class RunState:
    """``run_dir/state.json`` (see the module docstring)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / STATE_FILE

    def read(self) -> dict:
        if not self.path.is_file():
            return parse_state(None, self.path)
        try:
            text = self.path.read_text()
        except UnicodeDecodeError as exc:
            raise NemoViperError(f"{self.path} is not text ({exc}); remove it to re-derive the state") from exc
        return parse_state(text, self.path)

    @contextmanager
    def _update(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from nemo_viper.runtime.locks import hold

        with hold(self.path.with_name(f".{STATE_FILE}.lock"), wait=True):
            state = self.read()
            yield state
            tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(state, indent=2) + "\n")
            os.replace(tmp, self.path)

    def record_done(self, name: str, fingerprint: str) -> None:
        with self._update() as state:
            state["phases"][name] = {"fingerprint": fingerprint, "finished_at": _now()}

    def forget(self, names: list[str]) -> None:
        with self._update() as state:
            for name in names:
                state["phases"].pop(name, None)

    def record_jobs(self, jobs: dict[str, dict]) -> None:
        with self._update() as state:
            add_jobs(state, jobs)


def add_jobs(state: dict, jobs: dict[str, dict]) -> None:
    """Record the Slurm jobs just submitted (phase -> ``{"job_id": ..., ...}``) in ``state``."""
    for name, job in jobs.items():
        state["jobs"][name] = {**job, "submitted_at": _now()}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def phase_states(phases: list[Phase], run_dir: str | Path, recorded: dict | None = None) -> dict[str, PhaseState]:
    """Each phase's state under the current configuration (see the module docstring).

    ``recorded``: the state file's ``phases``, read where this machine cannot see the run dir (through an SSH
    tunnel). The outputs are then not checked from here: a phase recorded under its current fingerprint is
    done, as ``mark-done`` recorded it only after its outputs verified."""
    remote = recorded is not None
    recorded = RunState(run_dir).read()["phases"] if recorded is None else recorded
    prints = fingerprints(phases, run_dir)
    states = {}
    for phase in phases:
        record = recorded.get(phase.name)
        problem = ("not recorded done" if not record else None) if remote else output_problem(phase)
        if record and record["fingerprint"] != prints[phase.name]:
            states[phase.name] = PhaseState(phase.name, False, "configuration changed since it ran", stale=True)
        elif record and problem is None:
            states[phase.name] = PhaseState(phase.name, True, "done")
        elif record:
            states[phase.name] = PhaseState(phase.name, False, f"outputs invalid: {problem}")
        else:
            states[phase.name] = PhaseState(phase.name, False, problem or "outputs complete, not recorded")
    return states


def verify_and_record(phase: Phase, phases: list[Phase], run_dir: str | Path) -> None:
    """Record ``phase`` done if its outputs verify; otherwise a one-line error naming the problem."""
    problem = output_problem(phase)
    if problem is not None:
        raise NemoViperError(f"phase {phase.name} finished but its outputs do not verify: {problem}")
    RunState(run_dir).record_done(phase.name, fingerprints(phases, run_dir)[phase.name])


def select_phases(phases: list[Phase], run_dir: str | Path, start: str | None = None, recorded: dict | None = None
                  ) -> tuple[list[Phase], dict[str, PhaseState]]:
    """The phases to run now (in plan order) and the states that decided it; changes nothing.

    Pending phases run; with ``start``, that phase and every phase after it in the plan run too (a forced
    restart point). ``recorded``: as for :func:`phase_states`.
    """
    names = [p.name for p in phases]
    if start is not None and start not in names:
        raise NemoViperError(f"--from {start!r} is not a phase of this run; phases: {', '.join(names)}")
    states = phase_states(phases, run_dir, recorded)
    if start is not None:
        for name in names[names.index(start):]:
            states[name] = PhaseState(name, False, f"forced (--from {start})", stale=True)
    return [p for p in phases if not states[p.name].done], states


def clear_for_rerun(selected: list[Phase], states: dict[str, PhaseState], run_dir: str | Path) -> list[str]:
    """Just before ``selected`` run: set aside the outputs of stale (and forced) ones and forget their records.

    ``nemo-viper run`` calls it for each phase as that phase starts, so a rerun with a changed value that fails
    (or is rejected) earlier leaves every later phase's finished outputs where they are. A set-aside directory
    is recorded under ``superseded`` in ``state.json`` and :func:`restore` puts it back. Returns one line per
    directory moved."""
    moved = []
    with RunState(run_dir)._update() as state:
        for phase in selected:
            record = state["phases"].pop(phase.name, None)
            if states[phase.name].stale:
                target = _set_aside(phase.out, (record or {}).get("fingerprint", "forced"))
                if target is not None:
                    state["superseded"].setdefault(phase.name, []).append(
                        {"out": phase.out, "path": str(target), "record": record, "moved_at": _now()})
                    moved.append(f"{phase.name}: previous outputs moved to {target} (to get them back: "
                                 f"nemo-viper restore {run_dir} {phase.name})")
    return moved


def _set_aside(out: str | Path, reason: str) -> Path | None:
    """Move ``out`` to ``<out>.superseded-<reason>`` (numbered if taken); returns the new path."""
    out = Path(out)
    if not out.exists():
        return None
    target = out.with_name(f"{out.name}.superseded-{reason}")
    n = 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}.superseded-{reason}.{n}")
    os.replace(out, target)
    return target


def restore(run_dir: str | Path, names: list[str] | None = None) -> list[str]:
    """Put back the outputs :func:`clear_for_rerun` set aside last for each phase of ``names`` (every phase that
    has some, if none given), with the record they were finished with: run again with the configuration they
    were made with and they count as done. What is in their place now (a failed or newer run's outputs) is set
    aside in turn, so a restore can itself be undone. Returns one line per phase."""
    lines = []
    with RunState(run_dir)._update() as state:
        superseded = state["superseded"]
        names = names or sorted(superseded)
        if not names:
            raise NemoViperError(f"{run_dir}: no set-aside outputs to restore (state.json lists none)")
        unknown = [n for n in names if not superseded.get(n)]
        if unknown:
            have = ", ".join(sorted(n for n in superseded if superseded[n])) or "none"
            raise NemoViperError(f"{run_dir}: no set-aside outputs of {', '.join(unknown)} (phases with some: {have})")
        for name in names:
            entry = superseded[name].pop()
            if not Path(entry["path"]).exists():
                raise NemoViperError(f"{entry['path']} (set-aside outputs of {name}) no longer exists")
            current = state["phases"].pop(name, None)
            displaced = _set_aside(entry["out"], (current or {}).get("fingerprint", "replaced"))
            if displaced is not None:
                superseded[name].append({"out": entry["out"], "path": str(displaced), "record": current,
                                            "moved_at": _now()})
            os.replace(entry["path"], entry["out"])
            if entry["record"] is not None:
                state["phases"][name] = entry["record"]
            lines.append(f"{name}: restored {entry['out']} from {entry['path']}"
                         + (f" (what was there moved to {displaced})" if displaced else ""))
            if not superseded[name]:
                del superseded[name]
    return lines
