#!/usr/bin/env bash
# Install nemo_viper inside the NGC NeMo container (e.g. nvcr.io/nvidia/nemo:26.08) on a GPU cluster.
#
#   bash scripts/install_in_container.sh
#
# The container already has torch, Transformer Engine, apex, megatron-core and Megatron-Bridge built for
# its CUDA stack. This installs the project (editable) plus the light packages it may lack, with the
# container's versions of those packages frozen as constraints, and fails if torch changed anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
protect=$(mktemp)
"$PY" -m pip freeze | grep -iE '^(torch|transformer[-_]engine[-_a-z0-9]*|apex|megatron[-_]core|megatron[-_]bridge|transformers|triton|numpy|nvidia-[-_a-z0-9]+)==' > "$protect" || true
before=$("$PY" -c 'import torch; print(torch.__version__)')
"$PY" -m pip install -c "$protect" -e ".[container]"
after=$("$PY" -c 'import torch; print(torch.__version__)')
[[ $before == "$after" ]] || { echo "error: torch changed from $before to $after" >&2; exit 1; }
echo "nemo_viper installed; container torch $after, TE/megatron-core/Megatron-Bridge untouched"
