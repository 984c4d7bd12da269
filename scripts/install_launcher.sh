#!/usr/bin/env bash
# The launcher's own environment, for a workstation or a login node (README, "Submitting from a workstation"):
#
#   bash scripts/install_launcher.sh ~/viper-launcher        # then ~/viper-launcher/bin/nemo-viper launch ...
#
# A venv of Python 3.12 ($PYTHON, else python3.12) holding this checkout without its dependencies, and the list
# of the `launcher` extra in pyproject.toml (NeMo-Run, OmegaConf, PyYAML) pinned by constraints.txt: NeMo-Run
# 0.11.1 does not bound leptonai, whose newest release it cannot import. `launch`, `status` and `plan` import
# nothing else of the project's dependencies (tests/test_launcher_imports.py); tests/test_launcher_install.py
# runs this script. A re-run installs the checkout again (after a `git pull`).
set -euo pipefail
VENV=${1:?usage: bash scripts/install_launcher.sh VENV_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
"${PYTHON:-python3.12}" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
mapfile -t LAUNCHER < <("$VENV/bin/python" -c 'import sys, tomllib
print(*tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["launcher"], sep="\n")' \
    "$ROOT/pyproject.toml")
"${PIP[@]}" --constraint "$ROOT/constraints.txt" "${LAUNCHER[@]}"
"${PIP[@]}" --no-deps "$ROOT"  # last: --no-deps also skips pip's report of the base dependencies left out
