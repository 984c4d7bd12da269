"""The slim launcher install (``scripts/install_launcher.sh``, the README's "Submitting from a workstation") in a
fresh venv without system site packages: the project ``--no-deps`` and its ``launcher`` extra pinned by
``constraints.txt``, from PyPI (or pip's cache: ``scripts/setup.sh`` downloads the same pinned wheels).

From that venv's ``nemo-viper`` the launcher's commands (:func:`test_launcher_imports.launcher_commands`)
render what they render in the full environment, where none of the training stack is installed: no torch,
numpy, transformers, Megatron, vLLM or scikit-image, so a project import of one fails the command. Pillow is
there (NeMo-Run's ``leptonai`` requires it and loads it); that the project itself imports no PIL is
``tests/test_launcher_imports.py``'s check.
"""

import os
import subprocess
import sys
import time

import pytest
from launch import copy_checkout
from test_launcher_imports import BLOCKED, check_launcher_output, launcher_commands

SLIM_MAX_MB = 640  # measured: 523 MB


@pytest.mark.slow
def test_the_launcher_extra_alone_installs_and_renders_a_dry_run(tmp_path):
    tree = copy_checkout(tmp_path / "tree")  # the build writes build/ and *.egg-info next to its sources
    venv = tmp_path / "launcher"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHON=sys._base_executable, PIP_NO_COMPILE="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               NEMORUN_HOME=str(tmp_path / "nemorun"))
    start = time.monotonic()
    install = subprocess.run(["bash", str(tree / "scripts" / "install_launcher.sh"), str(venv)], env=env,
                             capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - start
    assert install.returncode == 0 and "ERROR" not in install.stderr, install.stderr[-4000:]
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    du = subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True, check=True)
    size_mb = int(du.stdout.split()[0])
    print(f"slim launcher install: {seconds:.1f} s, venv {size_mb} MB")
    assert size_mb < SLIM_MAX_MB

    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import importlib.util, sys, nemo_viper\nprint(nemo_viper.__file__)\n"
                            "print(*[m for m in sys.argv[1:] if importlib.util.find_spec(m)])", *BLOCKED],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    location, installed = probe.stdout.splitlines()
    assert location.startswith(str(venv)), location  # the installed copy, not the checkout
    assert set(installed.split()) <= {"PIL"}  # no torch, numpy, transformers, Megatron, vLLM, scikit-image

    outputs = []
    for argv in launcher_commands(tmp_path):
        start = time.monotonic()
        result = subprocess.run([str(venv / "bin" / "nemo-viper"), *argv], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        print(f"nemo-viper {' '.join(argv[:3])}: {time.monotonic() - start:.1f} s")
        assert result.returncode == 0, f"{argv}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        outputs.append(result.stdout)
    check_launcher_output(*outputs)
