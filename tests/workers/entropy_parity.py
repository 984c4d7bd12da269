"""Worker: the entropy metric on vocab-sharded bf16 logits (one shard per rank of a gloo group, TP2 and TP1) against the
previous unchunked implementation and a float64 full-vocabulary reference; records the largest tensor any
op created during the chunked call."""

import argparse

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from nemo_viper.models.logprobs import vocab_parallel_token_entropy
from nemo_viper.runtime import collectives


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # views allocate nothing
            return out
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.bytes = max(self.bytes, tensor.numel() * tensor.element_size())
        return out


def unchunked_entropy(logits, temperature, group):
    """The metric as computed before chunking (several full [B, S, V/TP] float32 temporaries)."""
    z = logits[:, :-1].float() / temperature
    z_max = z.max(dim=-1).values
    z_max = collectives.all_reduce(z_max, collectives.ReduceOp.MAX, group)
    shifted = z - z_max[..., None]
    exp = shifted.exp()
    sums = torch.stack([exp.sum(dim=-1), (exp * shifted).sum(dim=-1)])
    sums = collectives.all_reduce(sums, group=group)
    entropy = sums[0].log() - sums[1] / sums[0]
    return torch.cat([entropy.new_zeros(entropy.shape[0], 1), entropy], dim=1)


def entropies(full, group, rank: int, world: int) -> dict:
    """The chunked, unchunked and float64 reference entropies of ``full``, vocab-sharded over ``world`` ranks."""
    logits = full.chunk(world, dim=-1)[rank].contiguous()
    result = {}
    for temperature in (1.0, 0.7):
        tracker = LargestTensor()
        with tracker:
            chunked = vocab_parallel_token_entropy(logits, temperature, group, chunk_rows=8)
        reference = torch.distributions.Categorical(logits=full[:, :-1].double() / temperature).entropy()
        result[temperature] = {"chunked": chunked, "unchunked": unchunked_entropy(logits, temperature, group),
                               "reference": torch.cat([torch.zeros(3, 1, dtype=torch.float64), reference], 1),
                               "largest_bytes": tracker.bytes}
    result["shard_float32_bytes"] = logits[:, :-1].numel() * 4
    return result


def main():
    """On two ranks: TP2 (one shard per rank) and TP1 (rank 0 alone in a one-rank group), one launch for both."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "run on two ranks"
    full = (torch.randn(3, 37, 512, generator=torch.Generator().manual_seed(0)) * 4).to(torch.bfloat16)
    full[1, 5] = 0  # a uniform row
    full[2, 7, 3] = 80  # a one-hot row
    results = {2: entropies(full, dist.group.WORLD, rank, world)}
    alone = dist.new_group([0])  # every rank takes part in creating it
    if rank == 0:
        results[1] = entropies(full, alone, 0, 1)
        torch.save(results, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
