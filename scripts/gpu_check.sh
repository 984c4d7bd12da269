#!/usr/bin/env bash
# One-shot GPU check: the GPU path end to end on one H100/H200 in about 8 minutes, no downloads.
#
#   bash scripts/gpu_check.sh             # on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --prepare   # on a machine with PyPI access: fill .whl/ for a bare GPU machine
#
# In the NGC NeMo container (Transformer Engine, megatron-core, Megatron-Bridge, DALI installed) the check runs
# as is. On a bare GPU machine with only torch + transformers (e.g. a lent device machine), the packages come
# from the wheels in .whl/ (made by --prepare; installed with --no-index into $GPU_CHECK_SITE), and Transformer
# Engine's PyTorch extension, if its source is in .whl/ (transformer_engine_torch-*.tar.gz) and its core
# library is importable, is built from source in the background first, while the checks that need no TE run.
# The checks and their tolerances: benchmarks/gpu_check.py. The table is printed and written into
# docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
# What the check needs beyond torch/transformers; versions are the project's (constraints.txt).
PACKAGES=(megatron-core megatron-bridge omegaconf antlr4-python3-runtime hydra-core)

if [[ ${1:-} == --prepare ]]; then
    mkdir -p "$WHEELS"
    exclude=$(git rev-parse --git-path info/exclude)
    [[ $WHEELS != .whl ]] || grep -qs "^/.whl/" "$exclude" || echo /.whl/ >> "$exclude"
    for name in "${PACKAGES[@]}"; do
        pin=$(grep -iE "^${name//-/[-_]}==" constraints.txt | head -1)
        pin=${pin:-$name}
        # the GPU machine's Python (3.12, x86_64); a pure-Python package published only as source (antlr4 4.9.3)
        # is built into a wheel here
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "$pin" 2>/dev/null \
            || "$PY" -m pip wheel -q --no-deps -w "$WHEELS" "$pin" \
            || { echo "error: no wheel of $pin for Python 3.12 x86_64" >&2; exit 1; }
    done
    te=$(grep -iE '^transformer[-_]engine[-_]torch==' constraints.txt | head -1)
    [[ -n $te ]] && "$PY" -m pip download --no-deps --no-binary=:all: -d "$WHEELS" "$te"
    du -sh "$WHEELS"
    exit 0
fi

export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$WORK"
if ! "$PY" -c "import transformer_engine.pytorch" 2>/dev/null; then
    source=$(ls "$WHEELS"/transformer_engine_torch-*.tar.gz 2>/dev/null | head -1)
    if [[ -n $source ]] && "$PY" -c "import transformer_engine" 2>/dev/null; then
        echo "building Transformer Engine's PyTorch extension in the background ($source)"
        rm -f "$WORK/te_build.done"
        (NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS=${NVTE_CUDA_ARCHS:-90} MAX_JOBS=$(nproc) \
            "$PY" -m pip install -q --no-deps --no-build-isolation --target "$SITE" "$source" \
            > "$WORK/te_build.log" 2>&1; touch "$WORK/te_build.done") &
        te_wait=(--wait-for "$WORK/te_build.done")
    else
        echo "Transformer Engine is not installed and cannot be built here: the TE-spec and FP8 checks are skipped"
    fi
fi
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
        || { echo "error: installing the wheels of $WHEELS failed" >&2; exit 1; }
fi
export PYTHONPATH="$SITE:$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
# The checkpoint and the CPU reference run while TE builds; the TE checks wait for the build's marker.
"$PY" benchmarks/gpu_check.py --work "$WORK" --write-docs ${te_wait[@]+"${te_wait[@]}"} "$@"
status=$?
wait
exit $status
