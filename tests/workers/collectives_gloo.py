"""Worker: the collectives helper on a real 2-rank gloo group (values, dtypes, devices, object collectives)."""

import torch
import torch.distributed as dist

from nemo_viper.runtime import collectives


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    counts = torch.tensor([3 + rank, 1], dtype=torch.int64)
    summed = collectives.all_reduce(counts)
    assert summed.tolist() == [7, 2] and summed.dtype == torch.int64, summed
    assert counts.tolist() == [3 + rank, 1], "the argument must not be modified"
    top = collectives.all_reduce(torch.tensor([float(rank), -float(rank)], dtype=torch.float64), collectives.ReduceOp.MAX)
    assert top.tolist() == [1.0, 0.0], top
    strided = torch.arange(6.0).reshape(2, 3).t()[:, 0] + rank  # non-contiguous
    gathered = collectives.all_gather(strided)
    assert gathered.shape == (2, 3) and gathered[1].tolist() == (strided - rank + 1).tolist(), gathered
    sent = collectives.broadcast(torch.full((2,), float(rank)), src=1)
    assert sent.tolist() == [1.0, 1.0], sent
    assert collectives.all_gather_object({"rank": rank}) == [{"rank": 0}, {"rank": 1}]
    assert collectives.broadcast_object("hello" if rank == 0 else None, src=0) == "hello"
    collectives.barrier()
    print(f"collectives ok {rank}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
