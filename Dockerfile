# The project image: the NGC NeMo container plus nemo_viper and exactly the packages the container lacks
# (container/requirements.lock; then container/requirements-nodeps.lock --no-deps: lmms-eval, qwen-vl-utils;
# then vLLM: the container's own if it ships one in the supported range, else container/requirements-vllm.lock
# --no-deps, its wheel if built for the container's torch, else built from source against that torch).
# The container's torch, Transformer Engine, apex, megatron-core, Megatron-Bridge and transformers are never replaced: the install step fails the build if they would be,
# or if their versions are outside the ranges the code supports (nemo_viper/environment.py).
#
#   bash scripts/build_image.sh                 # docker build with the git revision recorded, + enroot import
#
# Supported base images: nvcr.io/nvidia/nemo:26.08 (NEMO_IMAGE=... to try another; the version checks decide).
ARG NEMO_IMAGE=nvcr.io/nvidia/nemo:26.08
FROM ${NEMO_IMAGE}
ARG NEMO_IMAGE
ARG GIT_REVISION=unknown

COPY . /opt/nemo_viper
WORKDIR /opt/nemo_viper
RUN python scripts/install_in_container.py --lock container/requirements.lock \
        --nodeps-lock container/requirements-nodeps.lock --vllm-lock container/requirements-vllm.lock \
        --revision "${GIT_REVISION}" \
        --base-image "${NEMO_IMAGE}" --info-out /opt/nemo_viper/BUILD_INFO.json \
 && nemo-viper doctor --recipe tiny --no-gpu > /dev/null

ENV HF_HUB_OFFLINE=1
LABEL org.opencontainers.image.revision="${GIT_REVISION}" \
      org.opencontainers.image.base.name="${NEMO_IMAGE}" \
      org.opencontainers.image.title="nemo_viper"
