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

import torch
from torch import Tensor

from nemo_viper.models.batch import PolicyBatch, concat_ranges
from nemo_viper.models.config import ENTROPY_CHUNK_ROWS
from nemo_viper.runtime import collectives


def forward_micro_batch(model, batch: PolicyBatch, device: torch.device):
    """``model(...)`` on one micro-batch: the output of the Megatron Qwen2.5-VL ``model`` (possibly wrapped).

    Shared image sets (``batch.image_sets``) pass the vision tower once per stored image, however many rows
    show them; the features are copied into the image slots of each such row. The result, and the gradients
    (the copies' gradients add up in the shared features), equal those of the per-row layout, where every
    row runs its own copy of the images through the tower: the tower's saved activations shrink by the
    number of rows per image set (``n`` for a GRPO rollout).

    On a stage before the last the output is the hidden states sent to the next stage, made contiguous: the
    model's layers keep the strides of its ``[S, B, H]`` transpose of the ``[B, S, H]`` embeddings, and the
    pipeline's point-to-point sends take only contiguous tensors.
    """
    from megatron.core.utils import unwrap_model

    output = _forward(model, batch, device)
    return output if unwrap_model(model).post_process else output.contiguous()


def _forward(model, batch: PolicyBatch, device: torch.device):
    if batch.image_sets is None or batch.image_grid_thw is None:
        return model(**batch.model_inputs(device))
    from megatron.core.utils import unwrap_model

    sets, set_sizes = batch.image_set_sizes()
    image_index = batch.stored_image_index(sets, set_sizes).to(device)
    input_ids, grid = batch.input_ids.to(device), batch.image_grid_thw.to(device)
    inputs = {"input_ids": input_ids, "position_ids": None, "attention_mask": None,
              "image_grid_thw": grid[image_index]}  # per row: the multimodal RoPE positions need it
    core = unwrap_model(model)
    if core.pre_process:  # later pipeline stages only need the positions
        inputs["inputs_embeds"] = _embed_with_shared_images(
            core, input_ids, batch.pixel_values.to(device), grid, image_index)
    return model(**inputs)


def _embed_with_shared_images(core, input_ids: Tensor, pixel_values: Tensor, grid: Tensor, image_index: Tensor):
    """Token embeddings [B, S, H] with the features of stored image ``image_index[k]`` in the k-th image's
    slots (row order); each stored image runs through the vision tower once."""
    embeddings = core.language_model.embedding(input_ids=input_ids, position_ids=None).transpose(0, 1)
    features = core.get_image_features(pixel_values, grid, return_dict=True).pooler_output  # one per image
    tokens = torch.tensor([len(f) for f in features])
    token_index = concat_ranges(torch.cumsum(tokens, 0) - tokens, tokens, image_index.cpu())
    row_features = torch.cat(features)[token_index.to(input_ids.device)].to(embeddings.dtype)
    slots = input_ids == core.config.image_token_id
    if int(slots.sum()) != row_features.shape[0]:
        raise ValueError(f"input_ids hold {int(slots.sum())} image tokens but the images give {row_features.shape[0]} features")
    return embeddings.masked_scatter(slots[..., None].expand_as(embeddings), row_features)


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


def _pad_rows(batch: PolicyBatch, rows: int, pad_token_id: int) -> PolicyBatch:
    """Append text-only rows of padding so every micro-batch has the same shape (pipeline p2p needs it)."""
    missing = rows - batch.input_ids.shape[0]
    if missing == 0:
        return batch
    ids = torch.cat([batch.input_ids, batch.input_ids.new_full((missing, batch.input_ids.shape[1]), pad_token_id)])
    mask = torch.cat([batch.response_mask, batch.response_mask.new_zeros((missing, batch.response_mask.shape[1]))])
    sets, images_per_row = batch.image_sets, batch.images_per_row
    if sets is not None:
        sets = torch.cat([sets, sets.new_full((missing,), -1)])
    if images_per_row is not None:
        images_per_row = torch.cat([images_per_row, images_per_row.new_zeros((missing,))])
    return PolicyBatch(ids, mask, batch.pixel_values, batch.image_grid_thw, sets, images_per_row)


@torch.no_grad()
def run_forward(policy, batch: PolicyBatch, per_micro_batch, micro_batch_size: int = 8, pad_token_id: int = 0):
    """Run ``batch`` forward through the pipeline schedule in micro-batches.

    ``per_micro_batch(output, micro_batch)`` maps the model output of a micro-batch (on the last
    pipeline stage: vocab-sharded logits [b, S', V/TP]) to a tensor with one row per sample. Returns
    those tensors concatenated over the batch on the last pipeline stage, ``None`` on other stages.
    Micro-batches are padded to ``policy.config.token_alignment`` columns (FP8), ``S' >= S``; a
    per-sample output of more than one dimension is cut back to its first ``S`` columns of dim 1.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = policy.chunks
    for chunk in chunks:
        chunk.eval()
    device = next(chunks[0].parameters()).device
    batch_size, seq_length = batch.input_ids.shape
    micro_batch_size = min(micro_batch_size, batch_size)
    micro_batches = batch.split(micro_batch_size)
    micro_batches = [
        _pad_rows(mb, micro_batch_size, pad_token_id).pad_columns(policy.config.token_alignment, pad_token_id)
        for mb in micro_batches
    ]

    def forward_step(data_iterator, model):
        micro_batch = next(data_iterator)
        output = forward_micro_batch(model, micro_batch, device)
        return output, lambda output_tensor, non_loss_data=True: per_micro_batch(output_tensor, micro_batch)

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=micro_batches[0].input_ids.shape[1],
        micro_batch_size=micro_batch_size,
        forward_only=True,
        collect_non_loss_data=True,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    result = torch.cat(outputs, dim=0)[:batch_size]
    return result[:, :seq_length] if result.dim() > 1 else result


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
        result = collectives.broadcast(
            result.float(),
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return result.float().cpu()


@torch.no_grad()
def vocab_parallel_token_entropy(logits: Tensor, temperature: float = 1.0, tp_group=None,
                                 chunk_rows: int = ENTROPY_CHUNK_ROWS) -> Tensor:
    """Entropy [B, S] of ``softmax(logits / T)`` at the positions that predict ``x_t`` (column 0 is 0).

    ``H = log Z + max − Σ_v e^{z_v − max} z_v / Z`` with ``Z = Σ_v e^{z_v − max}``, ``z = logits / T``:
    two [B, S] all-reduces over the TP group, no full-vocabulary gather. The float32 work runs over
    ``chunk_rows`` positions at a time, so its temporaries are ``chunk_rows x V/TP`` floats, not
    ``B x S x V/TP``. Metrics only (no gradient).
    """
    group = tp_group
    if group is None:  # Megatron's TP group (imported only then: a caller with a group needs no Megatron)
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    shard = logits[:, :-1]  # a view: no copy of the logits
    # max(z) = max(logits) / T exactly (division by T > 0 is monotonic, also after rounding)
    z_max = shard.max(dim=-1).values.float() / temperature
    z_max = collectives.all_reduce(z_max, collectives.ReduceOp.MAX, group)
    sums = z_max.new_empty(2, *z_max.shape)
    for row in range(shard.shape[0]):
        for start in range(0, shard.shape[1], chunk_rows):
            span = slice(start, start + chunk_rows)
            shifted = shard[row, span].float() / temperature - z_max[row, span, None]
            exp = shifted.exp()
            sums[0, row, span] = exp.sum(dim=-1)
            sums[1, row, span] = (exp * shifted).sum(dim=-1)
    sums = collectives.all_reduce(sums, group=group)
    entropy = sums[0].log() - sums[1] / sums[0]
    return torch.cat([entropy.new_zeros(entropy.shape[0], 1), entropy], dim=1)
