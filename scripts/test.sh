#!/usr/bin/env bash
# The test suite (arguments go to pytest). Where CI is set, the Slurm tests must run: the local one-node
# cluster (scripts/local_slurm.sh) is started first when none is up, and stopped afterwards; elsewhere the
# Slurm tests use a cluster that is up, or are skipped with a line saying how to start one. The SSH tunnel tests
# (tests/ssh_server.py) start their own OpenSSH server; where CI is set, it and rsync (NeMo-Run copies job files
# with it) are installed first when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n ${CI:-} ]] && ! { [[ -x /usr/sbin/sshd ]] && command -v ssh rsync >/dev/null; }; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server openssh-client \
        rsync >/dev/null
fi
started=
if [[ -n ${CI:-} ]] && ! bash scripts/local_slurm.sh status >/dev/null 2>&1; then
    bash scripts/local_slurm.sh up
    started=1
fi
stop() { if [[ -n $started ]]; then bash scripts/local_slurm.sh down; fi; }
trap stop EXIT
.venv/bin/python -m pytest -q --durations=25 "$@"
