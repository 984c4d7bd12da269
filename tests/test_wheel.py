"""The wheel carries the recipes, the launcher and the YAML inside ``nemo_viper`` and works from any directory.

Built from a copy of the working tree (``pip wheel --no-deps --no-build-isolation``, offline) and installed
``--no-deps`` into a fresh venv whose only other packages are this environment's dependencies, reached
through a ``.pth`` line naming this venv's site-packages (a plain path: the ``.pth`` files there, the
editable install of the checkout included, are not processed, so the checkout is not importable). Then
``nemo-viper launch --dry-run`` runs from ``/``.
"""

import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from launch import REPO, copy_checkout
from test_import_graph import modules, package_dirs


def test_the_build_lists_every_package_of_the_tree_and_no_symlink():
    """``packages`` in pyproject.toml names every directory with an ``__init__.py`` under the mapped directories."""
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    in_tree = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert sorted(packages) == sorted(in_tree)
    links = [str(p.relative_to(REPO)) for root in package_dirs().values() for p in root.rglob("*") if p.is_symlink()]
    assert links == []


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(venv, wheel)``: the project's wheel installed in a fresh venv."""
    root = tmp_path_factory.mktemp("wheel")
    tree = copy_checkout(root / "tree")
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(root / "dist"), str(tree)], check=True, env=env, timeout=600)
    (wheel,) = (root / "dist").glob("nemo_viper-*.whl")
    venv = root / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3.*/site-packages"))
    (site / "dev_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--no-deps", str(wheel)], check=True, env=env, timeout=600)
    return venv, wheel


def test_a_checkout_on_pythonpath_imports_its_own_mapped_packages(tmp_path):
    """A copy of the checkout used without installing it (PYTHONPATH, as NeMo-Run's packaged code) imports
    ``nemo_viper.recipes`` / ``.launcher`` / ``.conf`` from its own top-level directories, not the installed ones."""
    tree = copy_checkout(tmp_path / "tree")
    names = ("nemo_viper", "nemo_viper.recipes", "nemo_viper.launcher", "nemo_viper.conf")
    where = subprocess.run([sys.executable, "-c", "import importlib.util, sys\nfor name in sys.argv[1:]:\n"
                            "    print(importlib.util.find_spec(name).origin)", *names], cwd="/", timeout=120,
                           env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True, text=True)
    assert where.returncode == 0, where.stderr[-3000:]
    assert where.stdout.split() == [str(tree / d / "__init__.py") for d in ("nemo_viper", "recipes", "launcher", "conf")]


@pytest.mark.slow
def test_wheel_holds_recipes_launcher_and_yaml_inside_the_package(installed):
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"nemo_viper"}  # no top-level recipes / launcher packages
    assert {"nemo_viper/recipes/__init__.py", "nemo_viper/launcher/nemo_run_jobs.py",
            "nemo_viper/conf/recipes/tiny.yaml", "nemo_viper/conf/cluster/slurm.yaml"} <= set(names)
    yaml_in_repo = {str(p.relative_to(REPO)) for p in (REPO / "conf").rglob("*.yaml")}
    assert {n.removeprefix("nemo_viper/") for n in names if n.startswith("nemo_viper/conf/") and n.endswith(".yaml")} \
        == yaml_in_repo


@pytest.mark.slow
def test_installed_wheel_launches_a_dry_run_from_the_root_directory(installed, tmp_path):
    venv, _ = installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", NEMORUN_HOME=str(tmp_path / "nemorun"))
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.util, nemo_viper.config as c, nemo_viper.recipes as r, nemo_viper.launcher as l; "
         "print(c.CONF_DIR, r.__file__, l.__file__, importlib.util.find_spec('recipes'), "
         "importlib.util.find_spec('launcher'), sep='\\n')"],
        cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    conf_dir, recipes, launcher, top_recipes, top_launcher = where.stdout.split("\n")[:5]
    site = str(next((venv / "lib").glob("python3.*/site-packages")))
    assert all(p.startswith(site) for p in (conf_dir, recipes, launcher)), where.stdout
    assert (top_recipes, top_launcher) == ("None", "None")

    result = subprocess.run([str(venv / "bin" / "nemo-viper"), "launch", "--recipe", "tiny", "--dry-run",
                             f"run_dir={tmp_path / 'run'}"], cwd="/", env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    phases = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("submit ")]
    assert phases == ["prepare", "round1.synth1", "round1.rl1", "round1.synth2", "round1.rl2", "export", "report"], result.stdout
