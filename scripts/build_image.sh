#!/usr/bin/env bash
# Build the project image (./Dockerfile) from the committed HEAD, and optionally its squashfs for pyxis.
#
#   bash scripts/build_image.sh [TAG] [SQUASHFS]
#   bash scripts/build_image.sh nemo_viper:latest /lustre/containers/nemo_viper.sqsh
#
# NEMO_IMAGE=nvcr.io/nvidia/nemo:TAG selects another base (default: the Dockerfile's supported tag).
# Needs docker (and enroot for the squashfs). The image records HEAD's revision, so the tree must be clean.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-nemo_viper:$(git rev-parse --short HEAD)}
SQUASHFS=${2:-}
if ! git diff --quiet HEAD --; then
  echo "error: uncommitted changes; the image records the git revision, commit first" >&2
  exit 1
fi
docker build --build-arg GIT_REVISION="$(git rev-parse HEAD)" ${NEMO_IMAGE:+--build-arg NEMO_IMAGE="$NEMO_IMAGE"} \
  -t "$TAG" .
if [[ -n $SQUASHFS ]]; then
  enroot import -o "$SQUASHFS" "dockerd://$TAG"
  echo "squashfs for pyxis: $SQUASHFS (set cluster.container_image=$SQUASHFS)"
fi
