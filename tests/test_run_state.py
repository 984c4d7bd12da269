"""The run state shared by ``run``, ``launch`` and ``status``: a phase is done only when its outputs verify and
its configuration is the one it ran with; a changed value re-runs the phase it affects (issue 16, item 7)."""

import json
import sys

import pytest

from nemo_viper import local_run
from nemo_viper.errors import NemoViperError
from nemo_viper.local_run import run_local
from nemo_viper.orchestration import plan
from nemo_viper.run_state import RunState, phase_states
from nemo_viper.recipes import recipe

WRITE_HF_DIR = """
import json, pathlib, sys
out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1])
out.mkdir(parents=True)
for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
    (out / name).write_text("{}")
"""


@pytest.fixture
def fake_phases(monkeypatch):
    """Phases that exit 0: ``prepare`` writes a complete HF dir, every other phase writes nothing."""
    def command(phase, index=0):
        if phase.kind == "prepare":
            return [sys.executable, "-c", WRITE_HF_DIR, *phase.args]
        return [sys.executable, "-c", "pass"]

    monkeypatch.setattr(local_run, "phase_command", command)


def test_a_phase_that_exits_0_without_its_outputs_is_not_recorded(fake_phases, tmp_path):
    config = recipe("tiny", f"run_dir={tmp_path}")
    with pytest.raises(NemoViperError) as exc:
        run_local(config)
    assert str(exc.value) == ("phase round1.synth1 finished but its outputs do not verify: not started")
    assert list(RunState(tmp_path).read()["phases"]) == ["prepare"]
    with pytest.raises(NemoViperError):  # a rerun does not skip it: the corruption cannot stick
        run_local(config)


def test_changed_value_reruns_the_phase_and_keeps_the_old_outputs(fake_phases, tmp_path):
    config = recipe("tiny", f"run_dir={tmp_path}")
    with pytest.raises(NemoViperError):
        run_local(config)
    first = RunState(tmp_path).read()["phases"]["prepare"]["fingerprint"]
    (tmp_path / "base_model" / "marker").write_text("first run")
    assert phase_states(plan(config), tmp_path)["prepare"].done

    changed = recipe("tiny", f"run_dir={tmp_path}", "model.tiny_warm_start_steps=7")
    state = phase_states(plan(changed), tmp_path)["prepare"]
    assert not state.done and state.stale and state.detail == "configuration changed since it ran"
    with pytest.raises(NemoViperError):
        run_local(changed)
    assert (tmp_path / f"base_model.superseded-{first}" / "marker").read_text() == "first run"
    assert not (tmp_path / "base_model" / "marker").exists()
    assert RunState(tmp_path).read()["phases"]["prepare"]["fingerprint"] != first


def test_old_state_files_are_not_trusted(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"finished": ["prepare", "round1.synth1"]}))
    states = phase_states(plan(recipe("tiny", f"run_dir={tmp_path}")), tmp_path)
    assert not any(s.done for s in states.values())
