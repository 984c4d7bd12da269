"""The Megatron Qwen2.5-VL pieces generation drives directly: prompt encoding and one decoder pass.

Bridge's ``Qwen25VLModel.forward`` does not hand an inference context to its language model, so
generation calls the parts itself: the vision tower once per prompt's images, the language model's
embedding, HF's ``get_rope_index`` for the multimodal RoPE positions, and the megatron-core
``GPTModel`` language model with ``decoder_input=`` and a ``StaticInferenceContext`` (the KV cache).

Layout conventions (megatron's): hidden states are ``[seq, batch, hidden]``; prompts are LEFT-padded,
so every prompt ends in the last column and one cache column index serves all rows while decoding.
Padding is hidden by an explicit boolean attention mask (True = masked), which megatron-core's local
``DotProductAttention`` applies as given; Transformer Engine's attention would ignore it under the
causal mask type, so the TE layer spec is rejected (:func:`generation_model`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nemo_viper.errors import ConfigError


def generation_model(policy):
    """The policy's ``Qwen25VLModel`` if this layout supports generation, else a one-line ``ConfigError``."""
    from megatron.core import parallel_state
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.utils import unwrap_model

    if parallel_state.get_pipeline_model_parallel_world_size() > 1 or len(policy.chunks) != 1:
        raise ConfigError(
            "generation does not support pipeline parallelism: build the policy for rollouts with "
            f"pipeline_parallel=1 (got {policy.config.pipeline_parallel}, {len(policy.chunks)} model chunk(s))"
        )
    model = unwrap_model(policy.chunks[0])
    if model.config.sequence_parallel:
        raise ConfigError("generation does not support sequence parallelism: build the policy without it")
    attention = type(model.language_model.decoder.layers[0].self_attention.core_attention)
    if not issubclass(attention, DotProductAttention):
        raise ConfigError(
            f"generation needs megatron-core's local attention for its padding masks (layer_spec='local'); "
            f"this policy uses {attention.__name__}"
        )
    return model


@dataclass
class EncodedPrompts:
    """A left-padded batch of P prompts ready for the decoder."""

    embeddings: Tensor  # [S, P, H]: token embeddings with the image features in the image-pad slots
    positions: Tensor  # [3, P, S] long: M-RoPE (temporal, height, width) positions, 0 at padding
    padding: Tensor  # [P, S] bool: True at left padding
    next_position: Tensor  # [P] long: the first generated token's position (max prompt position + 1)


def left_pad(prompts: list[Tensor], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Token ids [P, S] with every prompt flush right, and the padding mask [P, S] (True = padding)."""
    ids = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True, padding_value=pad_token_id, padding_side="left")
    lengths = torch.tensor([len(p) for p in prompts])
    padding = torch.arange(ids.shape[1]) < (ids.shape[1] - lengths)[:, None]
    return ids, padding


@torch.no_grad()
def encode_prompts(model, ids: Tensor, padding: Tensor, pixel_values: Tensor | None, image_grid_thw: Tensor | None):
    """Embed left-padded prompts ``ids`` [P, S]; the images of all prompts (in prompt order) pass through
    the vision tower once. Positions follow HF's ``get_rope_index`` with the padding masked out."""
    device = next(model.parameters()).device
    ids, padding = ids.to(device), padding.to(device)
    embeddings = model.language_model.embedding(input_ids=ids, position_ids=None)  # [S, P, H]
    if pixel_values is not None:
        image_grid_thw = image_grid_thw.to(device)
        features = model.get_image_features(pixel_values.to(device), image_grid_thw, return_dict=True).pooler_output
        features = torch.cat(features, dim=0).to(embeddings.dtype)
        slots = (ids == model.config.image_token_id)[..., None].expand(-1, -1, embeddings.shape[-1])
        embeddings = embeddings.transpose(0, 1).masked_scatter(slots, features).transpose(0, 1).contiguous()
    token_types = (ids == model.config.image_token_id).int()
    positions, _ = model.get_rope_index(ids, token_types, image_grid_thw, None, attention_mask=(~padding).long())
    next_position = positions.masked_fill(padding[None], -1).amax(dim=(0, 2)) + 1
    return EncodedPrompts(embeddings, positions, padding, next_position)


def attention_mask(padding: Tensor, queries: int) -> Tensor:
    """Boolean mask [B, 1, queries, L] (True = masked) for the last ``queries`` of L columns: causal, and
    never a padding key."""
    if queries == 1:  # decoding: the query is the last column, nothing lies in its future
        return padding[:, None, None, :]
    length = padding.shape[1]
    query_columns = torch.arange(length - queries, length, device=padding.device)
    future = torch.arange(length, device=padding.device)[None, :] > query_columns[:, None]  # [q, L]
    return future[None, None] | padding[:, None, None, :]


def _last_position_logits(hidden_states, output_layer, output_weight=None, **_):
    logits, _ = output_layer(hidden_states[-1:], weight=output_weight)
    return logits[0]


@torch.no_grad()
def last_logits(language_model, embeddings: Tensor, positions: Tensor, padding: Tensor, context=None) -> Tensor:
    """Vocab-sharded logits [B, V/TP] after the last of ``embeddings`` [q, B, H].

    ``positions`` [3, B, L] and ``padding`` [B, L] cover all L columns seen so far (cached ones
    included: megatron's static context re-applies RoPE to the cached keys). With ``context`` the
    new keys/values are cached at ``context.sequence_len_offset``; the caller advances it.
    """
    return language_model(
        input_ids=None,
        position_ids=positions,
        attention_mask=attention_mask(padding, embeddings.shape[0]),
        decoder_input=embeddings,
        inference_context=context,
        output_processor=_last_position_logits,
    )


def select_cache_rows(context, rows: Tensor) -> None:
    """Keep (or repeat) batch rows ``rows`` of every layer's cached keys and values."""
    for layer, (keys, values) in context.key_value_memory_dict.items():
        context.key_value_memory_dict[layer] = (keys.index_select(1, rows), values.index_select(1, rows))
    context.max_batch_size = len(rows)
