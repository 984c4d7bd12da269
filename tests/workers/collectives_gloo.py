"""Worker: the collectives helper on a real 2-rank gloo group (values, dtypes, devices, object collectives), and
every kind of training metric reduced over the two ranks by its declared reduction.

``--out DIR``: each rank saves its metric inputs and the reduced metrics to ``DIR/rank{R}.pt`` (the test
computes the float64 reference from the inputs of both ranks).
"""

import argparse

import torch
import torch.distributed as dist

from nemo_viper.algorithms import LossNormalizer, PolicyLossConfig, group_advantages, logprob_mismatch
from nemo_viper.models.batch import PolicyBatch
from nemo_viper.models.interfaces import TrainingBatch
from nemo_viper.runtime import collectives
from nemo_viper.runtime.metrics import Metric, combine, reduce_metrics
from nemo_viper.training.grpo import GRPOLoss, rollout_statistics
from nemo_viper.training.rollout_batch import RolloutBatch

LOSS = PolicyLossConfig(eps_low=0.1, eps_high=0.1, dual_clip_c=2.0, kl_beta=0.1)


def loss_inputs(seed: int = 0, rows: int = 7, columns: int = 9) -> dict[str, torch.Tensor]:
    """A float64 batch for the loss (both ranks' rows; rank 0 takes the first 4, rank 1 the last 3): ragged
    responses, an empty row, ratios far from 1 so every clip term acts."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 3, 6, 0, 8, 2, 5])
    mask = torch.arange(columns)[None] < lengths[:, None]
    old = -torch.rand(rows, columns, generator=gen, dtype=torch.float64) * 3
    logprobs = old + torch.randn(rows, columns, generator=gen, dtype=torch.float64) * 0.5
    ref = old + torch.randn(rows, columns, generator=gen, dtype=torch.float64) * 0.3
    advantages = torch.randn(rows, generator=gen, dtype=torch.float64)
    return {"logprobs": logprobs, "old_logprobs": old, "ref_logprobs": ref, "advantages": advantages, "mask": mask}


RANK_ROWS = (slice(0, 4), slice(4, 7))


def loss_metrics(rank: int) -> dict[str, Metric]:
    """This rank's loss metrics as the policy produces them: GRPOLoss per micro-batch (2 rows each), with the
    normaliser of both ranks' rows, combined over the micro-batches."""
    full = loss_inputs()
    normalizer = LossNormalizer.from_masks([full["mask"]])
    rows = RANK_ROWS[rank]
    batch = TrainingBatch(PolicyBatch(torch.zeros_like(full["mask"][rows], dtype=torch.long), full["mask"][rows]),
                          {k: full[k][rows] for k in ("old_logprobs", "ref_logprobs", "advantages")})
    loss_fn = GRPOLoss(LOSS)
    parts = []
    for start in range(0, batch.rows, 2):
        micro = batch.select(slice(start, start + 2))
        loss, metrics = loss_fn(full["logprobs"][rows][start : start + 2], micro, normalizer)
        parts.append({**metrics, "loss": Metric.sum(loss.detach())})
    return {f"train/{k}": combine([p[k] for p in parts]) for k in parts[0]}


def rollout_inputs(rank: int) -> dict:
    """Rank-specific rollouts: different rewards, response lengths, truncation and sampler log-probs."""
    gen = torch.Generator().manual_seed(100 + rank)
    rows, columns = 6 + 2 * rank, 10
    lengths = torch.randint(1, columns, (rows,), generator=gen)
    mask = torch.arange(columns)[None] < lengths[:, None]
    return {"rewards": torch.rand(rows, generator=gen, dtype=torch.float64) * (1 + rank),
            "group_index": torch.arange(rows) // 2, "mask": mask, "truncated": lengths > 6,
            "reward_metrics": {"format": 0.25 + rank / 2, "recall": 0.1 * (rank + 1)},
            "trainer_logprobs": -torch.rand(rows, columns, generator=gen, dtype=torch.float64),
            "sampler_logprobs": -torch.rand(rows, columns, generator=gen, dtype=torch.float64)}


def step_metrics(rank: int) -> dict[str, Metric]:
    """This rank's rollout statistics and log-prob mismatch as the GRPO step produces them, plus a replicated
    value (like the gradient norm)."""
    x = rollout_inputs(rank)
    rollout = RolloutBatch(PolicyBatch(torch.zeros_like(x["mask"], dtype=torch.long), x["mask"]), x["group_index"],
                           x["rewards"], [str(g) for g in x["group_index"].tolist()], x["truncated"],
                           x["reward_metrics"], x["sampler_logprobs"])
    advantages = group_advantages(rollout.rewards, rollout.group_index)
    metrics = rollout_statistics(rollout, advantages)
    mismatch = logprob_mismatch(x["trainer_logprobs"], x["sampler_logprobs"], x["mask"])
    metrics.update({f"rollout/logprob_diff_{k}": v for k, v in mismatch.items()})
    metrics["train/grad_norm"] = Metric.replicated(3.25)
    return metrics


def check_metric_reductions(rank: int, out: str) -> None:
    from nemo_viper.runtime.collectives import DataParallel

    data_parallel = DataParallel(rank=rank, size=dist.get_world_size(), group=dist.group.WORLD)
    produced = {**step_metrics(rank), **loss_metrics(rank)}
    reduced = reduce_metrics(produced, data_parallel)
    torch.save({"produced": {k: (float(m.value), m.reduce.value) for k, m in produced.items()}, "reduced": reduced},
               f"{out}/rank{rank}.pt")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
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
    check_metric_reductions(rank, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
