"""One launch, also a one-rank run: after the checks on every rank, the ranks leave the launch's process group
and rank 0 continues alone in a process group of its own (world size 1, data-parallel size 1), as a one-rank
launch would run, without a second import of Megatron-Bridge."""

import torch.distributed as dist


def leave_for_a_group_of_one() -> bool:
    """Every rank leaves Megatron's parallel state and the launch's process group; rank 0 then starts a process
    group of one (same backend). True on rank 0. Drop every model built in the launch's groups first."""
    from megatron.core import parallel_state

    rank, backend = dist.get_rank(), dist.get_backend()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    if rank == 0:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return rank == 0
