#!/usr/bin/env bash
# A one-minute smoke run of the policy alone (the closed loop is `nemo-viper run --recipe tiny`): builds
# the tiny Qwen2.5-VL policy offline, imports it into Megatron at tensor-parallel 2 (two gloo ranks),
# scores a response with the log-prob API at TP=2, and exports the Megatron checkpoint back to a Hugging
# Face directory. tests/test_policy.py runs it and checks the round trip bit-exactly.
#
#   bash scripts/tiny_demo.sh [RUN_DIR]        # default runs/tiny_demo
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/tiny_demo}
BIN=.venv/bin
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
rm -rf "$RUN" && mkdir -p "$RUN"
"$BIN/nemo-viper" tiny-model --out "$RUN/hf"
"$BIN/torchrun" --nproc-per-node 2 -m nemo_viper.cli convert import --hf "$RUN/hf" --out "$RUN/ckpt" --tp 2
"$BIN/torchrun" --nproc-per-node 2 -m nemo_viper.models.score --ckpt "$RUN/ckpt" --tp 2 \
  --prompt "Describe this image in detail." --response "The red car is on the left."
"$BIN/nemo-viper" convert export --ckpt "$RUN/ckpt" --out "$RUN/hf_export"
echo "done: $RUN/{hf,ckpt,hf_export}"
