"""Experiment trackers beside ``metrics.jsonl`` and TensorBoard: Weights & Biases and MLflow (rank 0 only).

The run config's ``logger`` section, named and nested as NeMo-RL's logger config::

    logger:
      wandb_enabled: true
      wandb: {project: viper, entity: my-team, name: "", group: "", tags: [tiny], mode: online}
      mlflow_enabled: true
      mlflow: {experiment_name: viper, run_name: "", tracking_uri: "sqlite:///mlflow.db", tags: {}}
      samples_every: 4     # sample generations to samples.jsonl and the trackers (0 = off)
      num_samples: 2       # prompts per logged step
      alerts: {...}        # nemo_viper.training.alerts.AlertConfig

An empty run name becomes ``<run dir>-<round>-<stage>`` (the last three parts of the stage's ``out``), the
W&B group the run dir's name. Each RL stage is one tracker run; its ids are kept in ``out/trackers.json``,
so a resumed stage continues the same W&B run (``resume="allow"``) and the same MLflow run. The resolved
run config is logged once, when the tracker run is created (W&B ``config``, MLflow params + ``config.json``).
Metrics carry the training step (W&B: the ``step`` metric as x-axis, so re-logged steps after a resume are
kept, not dropped). ``wandb`` and ``mlflow-skinny`` are optional dependencies (``pip install
nemo-viper[trackers]``), imported only when enabled.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_viper.errors import ConfigError
from nemo_viper.training.alerts import AlertConfig

WANDB_MODES = ("online", "offline")
STATE_FILE = "trackers.json"


@dataclass(frozen=True)
class WandbConfig:
    """``wandb.init`` arguments. ``mode: offline`` writes the run under ``out/wandb`` for ``wandb sync``."""

    project: str = "nemo-viper"
    entity: str = ""
    name: str = ""
    group: str = ""
    tags: tuple[str, ...] = ()
    mode: str = "online"

    def __post_init__(self):
        if self.mode not in WANDB_MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {WANDB_MODES}")


@dataclass(frozen=True)
class MLflowConfig:
    """MLflow run settings. ``tracking_uri`` empty: MLflow's own default (``MLFLOW_TRACKING_URI`` or ``./mlruns``)."""

    experiment_name: str = "nemo-viper"
    run_name: str = ""
    tracking_uri: str = ""
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LoggerConfig:
    """The run config's ``logger`` section (see the module docstring)."""

    wandb_enabled: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow_enabled: bool = False
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    samples_every: int = 0
    num_samples: int = 2
    alerts: AlertConfig = field(default_factory=AlertConfig)

    def __post_init__(self):
        if self.samples_every < 0:
            raise ConfigError(f"samples_every={self.samples_every} must be >= 0 (0 = no sample logging)")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples={self.num_samples} must be >= 1")


def check_installed(config: LoggerConfig) -> None:
    """A :class:`ConfigError` naming the key when an enabled tracker's package is not installed."""
    import importlib.util

    for key, package in (("wandb_enabled", "wandb"), ("mlflow_enabled", "mlflow")):
        if getattr(config, key) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"logger.{key}=true needs the {package!r} package: pip install 'nemo-viper[trackers]'")


def default_run_name(out: str | Path) -> str:
    """``<run dir>-<round>-<stage>`` from a stage's output directory (e.g. ``tiny-round1-rl1``)."""
    return "-".join(Path(out).resolve().parts[-3:])


def _flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """``{"rl.grpo.loss.eps_low": "0.2", ...}``: a nested config as MLflow params."""
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, (list, tuple)) else str(tree)}


class _Wandb:
    def __init__(self, config: WandbConfig, out: Path, run_id: str | None, run_config: dict):
        import wandb

        self.wandb = wandb
        resumed = run_id is not None
        self.run = wandb.init(
            project=config.project, entity=config.entity or None, name=config.name or default_run_name(out),
            group=config.group or Path(out).resolve().parts[-3], tags=list(config.tags), mode=config.mode,
            dir=str(out), id=run_id or uuid.uuid4().hex[:8], resume="allow",
            config=None if resumed else run_config,
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({"step": step, **metrics})

    def log_samples(self, step: int, rows: list[dict]) -> None:
        columns = list(rows[0])
        table = self.wandb.Table(columns=columns, data=[[_cell(row[c]) for c in columns] for row in rows])
        self.run.log({"step": step, "samples": table})

    def close(self) -> None:
        self.run.finish()
        self.wandb.teardown()  # stops the wandb-core service process: nothing outlives the job


class _MLflow:
    def __init__(self, config: MLflowConfig, out: Path, run_id: str | None, run_config: dict):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=config.tracking_uri or None)
        if run_id is None:
            experiment = self.client.get_experiment_by_name(config.experiment_name)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(config.experiment_name))
            run = self.client.create_run(experiment_id, run_name=config.run_name or default_run_name(out),
                                         tags=dict(config.tags))
            run_id = run.info.run_id
            self._log_config(run_id, run_config)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def _log_config(self, run_id: str, run_config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in _flatten(run_config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=params[start:start + 100])
        self.client.log_dict(run_id, run_config, "config.json")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def log_samples(self, step: int, rows: list[dict]) -> None:
        columns = {c: [_cell(row[c]) for row in rows] for c in rows[0]}
        self.client.log_table(self.run_id, columns, f"samples/step_{step:06d}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _cell(value):
    """A table cell: numbers and strings as they are, anything else as JSON."""
    return value if isinstance(value, (int, float, str)) or value is None else json.dumps(value)


class Trackers:
    """The enabled trackers of one RL stage (none on ranks other than 0, or when nothing is enabled).

    ``run_config``: the resolved run config, logged once when the tracker runs are created.
    """

    def __init__(self, config: LoggerConfig, out: str | Path, run_config: dict | None = None, enabled: bool = True):
        self.config = config
        self.out = Path(out)
        self._trackers: dict[str, Any] = {}
        if not enabled or not (config.wandb_enabled or config.mlflow_enabled):
            return
        self.out.mkdir(parents=True, exist_ok=True)
        state = self._read_state()
        run_config = run_config or {}
        if config.wandb_enabled:
            self._trackers["wandb"] = _Wandb(config.wandb, self.out, state.get("wandb"), run_config)
        if config.mlflow_enabled:
            self._trackers["mlflow"] = _MLflow(config.mlflow, self.out, state.get("mlflow"), run_config)
        self._write_state({name: tracker.run_id for name, tracker in self._trackers.items()})

    @property
    def run_ids(self) -> dict[str, str]:
        return {name: tracker.run_id for name, tracker in self._trackers.items()}

    def _read_state(self) -> dict:
        path = self.out / STATE_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write_state(self, state: dict) -> None:
        tmp = self.out / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.out / STATE_FILE)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for tracker in self._trackers.values():
            tracker.log(step, metrics)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        if rows:
            for tracker in self._trackers.values():
                tracker.log_samples(step, rows)

    def close(self) -> None:
        for tracker in self._trackers.values():
            tracker.close()
        self._trackers = {}
