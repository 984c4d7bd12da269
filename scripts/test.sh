#!/usr/bin/env bash
# The test suite (arguments go to pytest). Where CI is set, the Slurm tests must run: the local one-node
# cluster (scripts/local_slurm.sh) is started first when none is up, and stopped afterwards; elsewhere the
# Slurm tests use a cluster that is up, or are skipped with a line saying how to start one.
set -euo pipefail
cd "$(dirname "$0")/.."
started=
if [[ -n ${CI:-} ]] && ! bash scripts/local_slurm.sh status >/dev/null 2>&1; then
    bash scripts/local_slurm.sh up
    started=1
fi
stop() { if [[ -n $started ]]; then bash scripts/local_slurm.sh down; fi; }
trap stop EXIT
.venv/bin/python -m pytest -q --durations=25 "$@"
