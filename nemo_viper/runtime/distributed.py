"""Process-group and Megatron model-parallel initialisation (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_viper.errors import ConfigError
from nemo_viper.runtime import cpu_mode, gc_heap, te_import_guard


def prepare_megatron() -> None:
    """Without CUDA, require the entry point's CPU mode; then import megatron-core and Megatron-Bridge (through
    the TE import guard; once per process, frozen out of the garbage collector's walks:
    :mod:`nemo_viper.runtime.gc_heap`). Call before using them."""
    te_import_guard.install()
    cpu_mode.require()
    gc_heap.import_long_lived("megatron.bridge")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ParallelLayout:
    """Tensor / pipeline parallel sizes; data parallel is whatever the world size leaves."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1

    def data_parallel(self, world_size: int) -> int:
        model_parallel = self.tensor_parallel * self.pipeline_parallel
        if world_size % model_parallel:
            raise ConfigError(
                f"tensor_parallel x pipeline_parallel = {self.tensor_parallel} x {self.pipeline_parallel} "
                f"does not divide the world size {world_size}"
            )
        return world_size // model_parallel


def init_process_group() -> None:
    """Join the job's process group (torchrun env vars), or start a 1-process group. Idempotent."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def init_model_parallel(layout: ParallelLayout, seed: int) -> None:
    """Initialise Megatron's parallel state for ``layout`` (re-initialising if it differs) and seed RNGs."""
    prepare_megatron()
    init_process_group()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    layout.data_parallel(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        current = ParallelLayout(
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
        )
        if current != layout:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor_parallel,
            pipeline_model_parallel_size=layout.pipeline_parallel,
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
