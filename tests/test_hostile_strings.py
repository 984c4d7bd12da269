"""No config string reaches a shell (issue 17, defect 6).

Every string key that reaches a job is set, one at a time, to hostile values (shell metacharacters, command
substitution, a `;` that would start a command). Each value is either refused by validation with a one-line
error naming the key, or it is carried safely: the rendered sbatch scripts and task scripts are then
*executed* (with stand-ins for srun/scontrol/python that record their argv) and a real submission goes
through NeMo-Run's local tunnel (stand-in sbatch); no command planted in a value may run, and a value that
reaches a command line arrives there as one intact argument.
"""

import dataclasses
import io
import subprocess
import sys

import pytest
from slurm_fakes import FakeSlurm

from nemo_viper.launcher.nemo_run_jobs import launch, sbatch_scripts
from nemo_viper.config import ViperConfig, compose, validate
from nemo_viper.errors import ConfigError
from nemo_viper.recipes import recipe

pytestmark = pytest.mark.slow  # real NeMo-Run submissions and executed scripts


def hostile_values(trap):
    return [f"/tmp/x/my runs;touch {trap}/PWNED1;#",
            f"/tmp/x$(touch${{IFS}}{trap}/PWNED2)`touch${{IFS}}{trap}/PWNED3`'\"|&><",
            f"a'; touch {trap}/PWNED4; echo '"]


def string_keys(config: ViperConfig) -> list[str]:
    """Every string leaf of the schema, plus the synthesis strings a job receives and the mount/env entries."""
    keys = []
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if isinstance(value, str):
            keys.append(section.name)
        elif dataclasses.is_dataclass(value):
            for leaf in dataclasses.fields(value):
                inner = getattr(value, leaf.name)
                if isinstance(inner, str):
                    keys.append(f"{section.name}.{leaf.name}")
                elif dataclasses.is_dataclass(inner):
                    keys += [f"{section.name}.{leaf.name}.{f.name}" for f in dataclasses.fields(inner)
                             if isinstance(getattr(inner, f.name), str)]
    keys.remove("cluster.setup")  # shell lines by design (module load, venv activation): run as written
    return keys + ["synthesis.images", "synthesis.redraw.model", "synthesis.edit.model", "synthesis.redraw.pipeline",
                   "cluster.env.HF_HOME", "cluster.container_mounts[0]", "cluster.options.rl.qos",
                   "cluster.options.rl.mem", "cluster.options.synth.constraint"]


def set_key(config: ViperConfig, key: str, value: str) -> None:
    if key.startswith("synthesis."):
        *parents, leaf = key.split(".")[1:]
        node = config.synthesis
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    elif key.startswith("cluster.env."):
        config.cluster.env[key.split(".", 2)[2]] = value
    elif key == "cluster.container_mounts[0]":
        config.cluster.container_mounts = [value]
    else:
        section, *path = key.split(".")
        setattr(config, section, _replaced(getattr(config, section), path, value) if path else value)


def _replaced(node, path: list[str], value):
    """``node`` with ``path`` set to ``value`` (library config sections are frozen: rebuilt, checks included)."""
    head, *rest = path
    return dataclasses.replace(node, **{head: _replaced(getattr(node, head), rest, value) if rest else value})


def base_config(tmp_path):
    """The 3B recipe with jobs online (no HF_HUB_OFFLINE), so hub-id-shaped values reach the command line."""
    models = tmp_path / "models"
    config = recipe("qwen25vl_3b", f"run_dir={tmp_path / 'run'}", "synthesis.num_shards=2",
                    f"synthesis.redraw.model={models / 'qi'}", f"synthesis.edit.model={models / 'qe'}")
    config.cluster.env = {}
    return config


def test_every_string_key_is_refused_or_carried_safely(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO())
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemorun"))
    trap = tmp_path / "trap"
    trap.mkdir()
    keys = string_keys(base_config(tmp_path))
    assert {"run_dir", "name", "model.hf_path", "reward.embedding_model", "cluster.account", "cluster.partition",
            "cluster.container_image", "cluster.job_dir", "cluster.time.rl"} <= set(keys)
    accepted: dict[str, str] = {}
    for key in keys:
        for value in hostile_values(trap):
            config = base_config(tmp_path)
            try:
                set_key(config, key, value)
                validate(config, check_paths=False)
            except ConfigError as exc:
                message = str(exc)
                assert "\n" not in message and key.split("[")[0].rsplit(".", 1)[-1] in message, (key, message)
                continue
            accepted.setdefault(key, value)
            assert not value.startswith("/") or key not in ("model.hf_path", "reward.embedding_model"), \
                "a local model path is mounted: it must be shell-safe"
    # These are pasted unquoted into shell commands or mount lists by NeMo-Run/pyxis: never accepted.
    # Account and partition become sbatch options: names only (a space would start another option).
    assert not {"run_dir", "name", "cluster.job_dir", "cluster.container_image", "synthesis.images",
                "cluster.container_mounts[0]", "cluster.time.rl", "cluster.account", "cluster.partition"} & set(accepted)
    assert {"cluster.env.HF_HOME", "model.hf_path", "reward.embedding_model"} <= set(accepted), accepted

    config = base_config(tmp_path)
    for key, value in accepted.items():
        set_key(config, key, value)
    validate(config, check_paths=False)
    slurm = FakeSlurm(tmp_path / "slurm", sys.executable)
    for name, text in sbatch_scripts(config).items():
        sbatch, task = text.split("# --- task script", 1)
        subprocess.run(["bash", "-c", sbatch], env=slurm.env(SLURM_JOB_NODELIST="node1"), check=True,
                       capture_output=True, cwd=tmp_path)
        subprocess.run(["bash", "-c", task.split("\n", 1)[1]], env=slurm.env(SLURM_ARRAY_TASK_ID="1"), check=True,
                       capture_output=True, cwd=tmp_path)
    assert not list(trap.iterdir()), "a command planted in a config value ran"
    commands = slurm.calls("python")
    assert any(argv[argv.index("--policy") + 1] == accepted["model.hf_path"] for argv in commands if "--policy" in argv)

    monkeypatch.setenv("PATH", slurm.env()["PATH"])
    output = launch(config)
    assert "Slurm job" in output and len(slurm.calls("sbatch")) == 6  # synth1 .. export and the report
    assert not list(trap.iterdir()), "a command planted in a config value ran during submission"
    # The RL jobs read the reward model from the run's config file: the value arrives there intact.
    assert compose(f"{config.run_dir}/config/viper.yaml").reward.embedding_model == accepted["reward.embedding_model"]


def test_env_values_reach_the_job_intact(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO())
    value = "a b;$(echo no)`echo no`'\""
    config = base_config(tmp_path)
    config.cluster.env["VIPER_PROBE"] = value
    slurm = FakeSlurm(tmp_path / "slurm", sys.executable)
    sbatch = sbatch_scripts(config)["export"].split("# --- task script", 1)[0]
    probe = sbatch.split("# Command 1", 1)[0] + '\nprintf %s "$VIPER_PROBE" > probe.txt\n'
    subprocess.run(["bash", "-c", probe], env=slurm.env(SLURM_JOB_NODELIST="node1"), check=True, cwd=tmp_path,
                   capture_output=True)
    assert (tmp_path / "probe.txt").read_text() == value


@pytest.mark.parametrize("value", ["/tmp/x/my runs;touch /tmp/x/PWNED;#", "/tmp/$(id)", "/tmp/a,b", "/tmp/a:b"])
def test_hostile_run_dir_is_refused_before_anything_is_written(value, tmp_path, capsys):
    from nemo_viper.cli import main

    assert main(["launch", "--recipe", "tiny", "--dry-run", f"run_dir={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: run_dir={value!r} contains characters") and "\n" not in err
