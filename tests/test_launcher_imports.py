"""The launcher's commands (``launch --dry-run``, ``status``, ``plan``, the tiny recipe's included) load no training
stack: they run from the slim ``launcher`` install (README, "Submitting from a workstation";
``tests/test_launcher_install.py`` installs it).

They run in a fresh interpreter with an import blocker: a ``sys.meta_path`` finder that raises on torch,
transformers, megatron, vllm, PIL, skimage or numpy when the import comes from the project's own code
(``nemo_viper``, ``launcher/``, ``recipes/``). Imports that NeMo-Run's own dependencies make are let through:
NeMo-Run is the launcher's dependency, and what it loads is its business. Every ``import`` statement the project's
code runs is recorded as well (``builtins.__import__``, which sees a module already loaded too): it names none
of those, and each package outside the standard library it names must be declared by the ``launcher`` extra, not
merely arrive with NeMo-Run.
"""

import importlib.metadata
import re
import subprocess
import sys
import tomllib

from launch import REPO
from test_import_graph import package_dirs

BLOCKED = ("torch", "transformers", "megatron", "vllm", "PIL", "skimage", "numpy")

_BLOCKER = """
import sys

BLOCKED = set({blocked!r})
PROJECT = tuple({project!r})


class ProjectImportBlocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in BLOCKED:
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
            frame = frame.f_back  # importlib's own frames
        if frame is not None and frame.f_code.co_filename.startswith(PROJECT):
            raise ImportError(f"{{name}} imported by {{frame.f_code.co_filename}}:{{frame.f_lineno}}")
        return None


sys.meta_path.insert(0, ProjectImportBlocker())

import atexit, builtins

_import, imported = builtins.__import__, set()


def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and (globals or {{}}).get("__file__", "").startswith(PROJECT):
        imported.add(name.partition(".")[0])
    return _import(name, globals, locals, fromlist, level)


builtins.__import__ = recording_import
atexit.register(lambda: print("imported by the project:", *sorted(imported), file=sys.stderr))
from nemo_viper.cli import main

sys.exit(main(sys.argv[1:]))
"""


def launcher_commands(tmp_path) -> list[list[str]]:
    """The launcher's commands on the tiny recipe, as a workstation runs them: a Slurm dry run with a
    three-shard synthesis array, ``status`` of a run dir as ``launch`` leaves it before any job ran (only its
    resolved config), and ``plan`` of the 3B and of the tiny recipe."""
    from nemo_viper.config import to_yaml
    from nemo_viper.recipes import recipe

    fresh = tmp_path / "fresh"
    (fresh / "config").mkdir(parents=True)
    (fresh / "config" / "viper.yaml").write_text(to_yaml(recipe("tiny", f"run_dir={fresh}")))
    return [
        ["launch", "--recipe", "tiny", "--executor", "slurm", "--dry-run", "cluster.account=viper_acct",
         "cluster.container_image=null", "synthesis.num_shards=3", "cluster.synthesis_max_parallel=2",
         f"run_dir={tmp_path / 'run'}"],
        ["status", str(fresh)],
        ["plan", "--recipe", "qwen25vl_3b"],
        ["plan", "--recipe", "tiny"],  # the tiny model's parameters counted from its sizes, not built
    ]


def check_launcher_output(launch: str, status: str, plan_3b: str, plan_tiny: str) -> None:
    """What :func:`launcher_commands` print: one sbatch script per phase, chained ``afterok``, synthesis as a
    job array, RL under torchrun; the fresh run's phases pending; both plans fitting."""
    scripts = dict(part.split("\n", 1) for part in launch.split("######## ")[1:])
    assert sorted(scripts) == ["export", "prepare", "report", "round1-rl1", "round1-rl2", "round1-synth1",
                               "round1-synth2"]
    assert all("#SBATCH --account=viper_acct\n" in text for text in scripts.values())
    chain = ["prepare", "round1-synth1", "round1-rl1", "round1-synth2", "round1-rl2", "export", "report"]
    for before, phase in zip(chain, chain[1:]):
        assert f"#SBATCH --dependency='afterok:<{before}>'\n" in scripts[phase]
    assert "--dependency" not in scripts["prepare"]
    assert all("#SBATCH --array=0-2%2\n" in scripts[p] for p in ("round1-synth1", "round1-synth2"))
    assert all(" torchrun " in scripts[p] and "--array" not in scripts[p] for p in ("round1-rl1", "round1-rl2"))
    assert "round1.rl2     pending" in status and "export         pending" in status
    assert "every phase fits 80 GiB" in plan_3b and "every phase fits 80 GiB" in plan_tiny
    assert "memory plan of recipe tiny: 0.52M parameters (the tiny model)" in plan_tiny


def _distribution(name: str) -> str:
    """A distribution's or requirement's name, normalised (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", name).group()).lower()


def test_launch_status_and_plan_import_no_training_stack(tmp_path):
    project = [str(path) + "/" for path in package_dirs().values()]
    script = _BLOCKER.format(blocked=BLOCKED, project=project)
    outputs, imported = [], set()
    for argv in launcher_commands(tmp_path):  # each in its own interpreter: what NeMo-Run loaded (torch, where
        # installed) is not in sys.modules when the next command's own imports run, so the blocker sees them
        result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120,
                                cwd=REPO)
        assert result.returncode == 0, f"{argv}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        outputs.append(result.stdout)
        (listing,) = [line for line in result.stderr.splitlines() if line.startswith("imported by the project:")]
        imported |= set(listing.split(":")[1].split())
    check_launcher_output(*outputs)
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["launcher"]
    distributions = importlib.metadata.packages_distributions()
    third_party = {_distribution(dist) for name in imported - set(sys.stdlib_module_names) - {"nemo_viper"}
                   for dist in distributions.get(name, [name])}
    assert {"nemo-run", "omegaconf", "pyyaml"} <= third_party  # the recording sees them
    assert not imported & set(BLOCKED)  # not even a module NeMo-Run had loaded before
    assert third_party <= {_distribution(requirement) for requirement in extra}
