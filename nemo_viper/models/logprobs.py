"""Per-token log-probabilities of response tokens under the Megatron policy (what RL calls).

For a right-padded batch of token ids ``x`` with images, position ``t`` of the result holds
``log pi(x_t | x_<t, images)`` where ``response_mask[:, t]`` is 1, and 0 elsewhere (position 0 is
always 0: nothing predicts the first token). With temperature ``T`` the distribution is
``softmax(logits / T)``, as used when sampling.

Tensor parallelism: the output layer leaves logits split over the vocabulary across TP ranks. The
log-softmax is computed on those shards (max and sum-of-exp all-reduced across the TP group, the
target logit taken on the rank that owns it); full-vocabulary logits are never gathered on one rank.
Pipeline parallelism: micro-batches run through Megatron's pipeline schedule; the last stage computes
the log-probs and broadcasts them to the other stages, so every rank returns the same tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PolicyBatch:
    """Inputs of one forward pass. ``pixel_values`` holds the patches of all images of all samples, in
    order (sample 0's images first); ``image_grid_thw`` has one ``(t, h, w)`` row per image."""

    input_ids: Tensor  # [B, S] long, right-padded
    response_mask: Tensor  # [B, S] bool/int: 1 where the log-prob of x_t is wanted
    pixel_values: Tensor | None = None  # [sum of t*h*w over images, C*patch volume]
    image_grid_thw: Tensor | None = None  # [num_images, 3]

    def __post_init__(self):
        if self.input_ids.shape != self.response_mask.shape:
            raise ValueError(
                f"input_ids {tuple(self.input_ids.shape)} and response_mask "
                f"{tuple(self.response_mask.shape)} must have the same shape"
            )
        if (self.pixel_values is None) != (self.image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw must be given together")
        if self.image_grid_thw is not None:
            patches = int(self.image_grid_thw.prod(dim=-1).sum())
            if patches != self.pixel_values.shape[0]:
                raise ValueError(
                    f"image_grid_thw describes {patches} patches but pixel_values has {self.pixel_values.shape[0]}"
                )

    def select(self, rows, vision_start_token_id: int) -> "PolicyBatch":
        """The samples at ``rows`` (indices or a slice), each with exactly its own images.

        A sample's images are the ones whose ``<|vision_start|>`` tokens it contains, in order.
        """
        input_ids, response_mask = self.input_ids[rows], self.response_mask[rows]
        if self.image_grid_thw is None:
            return PolicyBatch(input_ids, response_mask)
        images_per_sample = (self.input_ids == vision_start_token_id).sum(dim=1)
        if int(images_per_sample.sum()) != self.image_grid_thw.shape[0]:
            raise ValueError(
                f"input_ids contain {int(images_per_sample.sum())} images but image_grid_thw has "
                f"{self.image_grid_thw.shape[0]} rows"
            )
        image_owner = torch.repeat_interleave(torch.arange(len(images_per_sample)), images_per_sample)
        patch_owner = torch.repeat_interleave(image_owner, self.image_grid_thw.prod(dim=-1))
        row_ids = torch.arange(len(images_per_sample))[rows].reshape(-1)
        rank_of_row = torch.full((len(images_per_sample),), -1, dtype=torch.long)
        rank_of_row[row_ids] = torch.arange(len(row_ids))
        image_index, patch_index = (_in_row_order(rank_of_row[owner]) for owner in (image_owner, patch_owner))
        if image_index.numel() == 0:
            return PolicyBatch(input_ids, response_mask)
        return PolicyBatch(input_ids, response_mask, self.pixel_values[patch_index], self.image_grid_thw[image_index])

    def split(self, micro_batch_size: int, vision_start_token_id: int) -> list["PolicyBatch"]:
        """Consecutive micro-batches of ``micro_batch_size`` samples (the last may be smaller)."""
        batch_size = self.input_ids.shape[0]
        return [
            self.select(slice(start, start + micro_batch_size), vision_start_token_id)
            for start in range(0, batch_size, micro_batch_size)
        ]


def _in_row_order(rank: Tensor) -> Tensor:
    """Indices of the items whose owner was selected (rank >= 0), ordered by owner rank, stable."""
    kept = (rank >= 0).nonzero().flatten()
    return kept[torch.argsort(rank[kept], stable=True)]


def vocab_parallel_token_logprobs(
    logits: Tensor, input_ids: Tensor, temperature: float = 1.0, tp_group=None
) -> Tensor:
    """``log softmax(logits / T)[b, t-1, x_t]`` for t >= 1 from vocab-sharded ``logits`` [B, S, V/TP].

    Returns [B, S] (float32) with column 0 set to 0. Differentiable; uses megatron-core's
    vocab-parallel cross entropy, so only [B, S] scalars cross TP ranks.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # The division makes a fresh contiguous float32 tensor: megatron's kernel works in place on it.
    scaled = logits[:, :-1].float() / temperature
    kwargs = {} if tp_group is None else {"tp_group": tp_group}
    shifted = -vocab_parallel_cross_entropy(scaled, input_ids[:, 1:], **kwargs)
    return torch.cat([shifted.new_zeros(shifted.shape[0], 1), shifted], dim=1)


def _model_inputs(batch: PolicyBatch, device: torch.device) -> dict:
    inputs = {"input_ids": batch.input_ids.to(device), "position_ids": None, "attention_mask": None}
    if batch.pixel_values is not None:
        inputs["pixel_values"] = batch.pixel_values.to(device)
        inputs["image_grid_thw"] = batch.image_grid_thw.to(device)
    return inputs


def _pad_rows(batch: PolicyBatch, rows: int, pad_token_id: int) -> PolicyBatch:
    """Append text-only rows of padding so every micro-batch has the same shape (pipeline p2p needs it)."""
    missing = rows - batch.input_ids.shape[0]
    if missing == 0:
        return batch
    ids = torch.cat([batch.input_ids, batch.input_ids.new_full((missing, batch.input_ids.shape[1]), pad_token_id)])
    mask = torch.cat([batch.response_mask, batch.response_mask.new_zeros((missing, batch.response_mask.shape[1]))])
    return PolicyBatch(ids, mask, batch.pixel_values, batch.image_grid_thw)


@torch.no_grad()
def run_forward(policy, batch: PolicyBatch, per_micro_batch, micro_batch_size: int = 8, pad_token_id: int = 0):
    """Run ``batch`` forward through the pipeline schedule in micro-batches.

    ``per_micro_batch(output, micro_batch)`` maps the model output of a micro-batch (on the last
    pipeline stage: vocab-sharded logits [b, S, V/TP]) to a tensor with one row per sample. Returns
    those tensors concatenated over the batch on the last pipeline stage, ``None`` on other stages.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = policy.chunks
    for chunk in chunks:
        chunk.eval()
    device = next(chunks[0].parameters()).device
    batch_size, seq_length = batch.input_ids.shape
    micro_batch_size = min(micro_batch_size, batch_size)
    micro_batches = batch.split(micro_batch_size, policy.provider.vision_start_token_id)
    micro_batches = [_pad_rows(mb, micro_batch_size, pad_token_id) for mb in micro_batches]

    def forward_step(data_iterator, model):
        micro_batch = next(data_iterator)
        output = model(**_model_inputs(micro_batch, device))
        return output, lambda output_tensor, non_loss_data=True: per_micro_batch(output_tensor, micro_batch)

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=True,
        collect_non_loss_data=True,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat(outputs, dim=0)[:batch_size]


def compute_logprobs(
    policy, batch: PolicyBatch, micro_batch_size: int = 8, temperature: float = 1.0, pad_token_id: int = 0
) -> Tensor:
    """Log-probs [B, S] (float32, CPU) of the masked response tokens of ``batch`` under ``policy``.

    ``policy`` is a :class:`~nemo_viper.models.policy.MegatronPolicy`. Works at any TP/PP layout; every
    rank of a model-parallel group must call it with the same batch.
    """
    from megatron.core import parallel_state

    def logprobs_of(output, micro_batch):
        input_ids = micro_batch.input_ids.to(output.device)
        logprobs = vocab_parallel_token_logprobs(output, input_ids, temperature)
        return logprobs * micro_batch.response_mask.to(output.device)

    result = run_forward(policy, batch, logprobs_of, micro_batch_size, pad_token_id)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        if result is None:
            device = next(policy.chunks[0].parameters()).device
            result = torch.empty(batch.input_ids.shape, dtype=torch.float32, device=device)
        result = result.float().contiguous()
        torch.distributed.broadcast(
            result,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return result.float().cpu()


@torch.no_grad()
def vocab_parallel_token_entropy(logits: Tensor, temperature: float = 1.0, tp_group=None) -> Tensor:
    """Entropy [B, S] of ``softmax(logits / T)`` at the positions that predict ``x_t`` (column 0 is 0).

    ``H = log Z + max − Σ_v e^{z_v − max} z_v / Z`` with ``Z = Σ_v e^{z_v − max}``: three [B, S]
    all-reduces over the TP group, no full-vocabulary gather. Metrics only (no gradient).
    """
    from megatron.core import parallel_state

    group = tp_group or parallel_state.get_tensor_model_parallel_group()
    z = logits[:, :-1].float() / temperature
    z_max = z.max(dim=-1).values
    torch.distributed.all_reduce(z_max, op=torch.distributed.ReduceOp.MAX, group=group)
    shifted = z - z_max[..., None]
    exp = shifted.exp()
    sums = torch.stack([exp.sum(dim=-1), (exp * shifted).sum(dim=-1)])
    torch.distributed.all_reduce(sums, group=group)
    entropy = sums[0].log() - sums[1] / sums[0]
    return torch.cat([entropy.new_zeros(entropy.shape[0], 1), entropy], dim=1)
