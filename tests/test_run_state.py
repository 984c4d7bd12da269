"""The run state shared by ``run``, ``launch`` and ``status``: a phase is done only when its outputs verify and
its configuration is the one it ran with; a changed value re-runs the phase it affects (issue 16, item 7)."""

import json
import sys
from pathlib import Path

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


OWNER = """
import errno, fcntl, sys, time
if sys.argv[2] == "no-flock":
    def no_flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")
    fcntl.flock = no_flock
from nemo_viper.runtime.locks import run_dir_owner
with run_dir_owner(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("flock", ["flock", "no-flock"])
def test_a_second_run_is_refused_before_it_touches_the_run_dir(fake_phases, tmp_path, monkeypatch, capsys, flock):
    """While one process owns the run dir, ``run`` with the same or another value fails with one line and
    changes nothing: no config rewrite, no log truncated, nothing set aside (also where ``flock`` fails)."""
    import errno
    import fcntl
    import os
    import subprocess

    from launch import REPO

    from nemo_viper.cli import main

    run = tmp_path / "run"
    with pytest.raises(NemoViperError):
        run_local(recipe("tiny", f"run_dir={run}"))  # prepare done, then synth1 fails: a run dir with contents
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert run / "logs" / "prepare.log" in before and run / "config" / "viper.yaml" in before
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(run), flock], cwd=REPO, stdout=subprocess.PIPE,
                             text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert owner.stdout.readline().strip() == "held"
        if flock == "no-flock":
            def refuse(*args):
                raise OSError(errno.ENOSYS, "Function not implemented")

            monkeypatch.setattr(fcntl, "flock", refuse)
        for overrides in ([], ["model.tiny_warm_start_steps=7"]):
            assert main(["run", "--recipe", "tiny", f"run_dir={run}", *overrides]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"error: {run} is in use by another run (pid {owner.pid}") and "\n" not in err, err
        assert main(["restore", str(run)]) == 2
        assert "is in use by another run" in capsys.readouterr().err
    finally:
        owner.kill()
        owner.wait()
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    assert not list(run.glob("*.superseded-*"))


@pytest.fixture
def marker_phases(monkeypatch):
    """Phases that write ``<out>/marker`` (verified: a phase is complete when its marker is there) and exit 0,
    but those named in the returned set, which exit 1 without writing."""
    failing = set()

    def command(phase, index=0):
        if phase.name in failing:
            return [sys.executable, "-c", "raise SystemExit(1)"]
        return [sys.executable, "-c", "import pathlib, sys; p = pathlib.Path(sys.argv[1]); "
                "p.mkdir(parents=True, exist_ok=True); (p / 'marker').write_text(sys.argv[2])",
                phase.out, phase.name]

    monkeypatch.setattr(local_run, "phase_command", command)
    monkeypatch.setattr("nemo_viper.run_state.output_problem",
                        lambda phase: None if (Path(phase.out) / "marker").is_file() else "not started")
    monkeypatch.setattr("nemo_viper.doctor.check", lambda config, phase: [])
    return failing


def test_a_failed_rerun_with_a_changed_value_keeps_later_outputs_and_restore_brings_back_the_rest(
        marker_phases, tmp_path, capsys):
    from nemo_viper.cli import main

    config = recipe("tiny", f"run_dir={tmp_path}")
    assert run_local(config)[-2:] == ["export", "report"]
    finished = RunState(tmp_path).read()["phases"]

    marker_phases.add("round1.rl1")
    changed = recipe("tiny", f"run_dir={tmp_path}", "rl.grpo.optimizer.lr=1e-3")
    with pytest.raises(NemoViperError, match="phase round1.rl1 failed"):
        run_local(changed)
    after = RunState(tmp_path).read()
    for later in ("round1.synth2", "round1.rl2", "export", "report"):  # not started: outputs and records untouched
        assert after["phases"][later] == finished[later]
    for out in ("round1/synth2", "round1/rl2", "final_hf"):
        assert (tmp_path / out / "marker").is_file()
    assert "round1.rl1" not in after["phases"]
    aside = tmp_path / "round1" / f"rl1.superseded-{finished['round1.rl1']['fingerprint']}"
    assert (aside / "marker").read_text() == "round1.rl1"

    assert main(["restore", str(tmp_path), "round1.rl1"]) == 0
    assert f"round1.rl1: restored {tmp_path}/round1/rl1 from {aside}" in capsys.readouterr().out
    assert (tmp_path / "round1" / "rl1" / "marker").is_file() and not aside.exists()
    assert RunState(tmp_path).read()["phases"] == finished
    assert run_local(config) == []  # the original value: every phase done again, nothing rerun
    assert main(["restore", str(tmp_path)]) == 2
    assert "no set-aside outputs" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    ("[]", "holds a JSON list, not an object"),
    ('{"version": 2, "phases": {"prepare": 3}}', "phases.prepare is 3, not a dict"),
    ('{"version": 2, "phases": {"prepare": {"fingerprint": 7}}}', "phases.prepare.fingerprint is 7"),
    ('{"version": 2, "phases": [], "jobs": {}}', "'phases' is a list"),
    ('{"version": 2, "phases": {}, "jobs": {"x": "y"}}', "jobs.x is 'y', not a dict"),
    ("\udcff", "is not"),
])
def test_a_wrong_typed_state_file_is_one_line_naming_the_entry(fake_phases, tmp_path, capsys, content, message):
    (tmp_path / "state.json").write_bytes(content.encode(errors="surrogateescape"))
    from nemo_viper.cli import main

    assert main(["run", "--recipe", "tiny", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path}/state.json") and message in err and "\n" not in err, err
    assert not (tmp_path / "config").exists()  # refused before anything was written


@pytest.mark.parametrize("text", ["rl: [unclosed\n  x: :\n", "- a\n- b\n", "\x00\x01binary"])
def test_a_corrupt_run_config_is_one_line_naming_the_file(tmp_path, capsys, text):
    from nemo_viper.cli import main

    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "viper.yaml").write_text(text)
    for argv in (["status", str(tmp_path)], ["doctor", "--run-dir", str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {tmp_path}/config/viper.yaml is not a readable run config") and "\n" not in err
