"""The Megatron Qwen2.5-VL pieces generation drives directly: prompt encoding and one decoder pass.

Bridge's ``Qwen25VLModel.forward`` does not hand an inference context to its language model, so
generation calls the parts itself: the vision tower once per prompt's images, the language model's
embedding, HF's ``get_rope_index`` for the multimodal RoPE positions, and the megatron-core
``GPTModel`` language model with ``decoder_input=`` and a ``StaticInferenceContext`` (the KV cache).

Layout conventions (megatron's): hidden states are ``[seq, batch, hidden]``. Prompts are RIGHT-padded
and the decoder never sees a padding column: generation prefills only the columns every prompt has
(the shortest prompt's length) and then advances all rows one column per step, feeding the rest of a
longer prompt token by token (teacher-forced: its logits are not sampled) until that row generates.
Every row's keys are therefore contiguous real tokens from column 0, so attention needs no mask at
all: causal for the prefill, none for the one-token steps (megatron-core's static-batching rule). No
explicit attention mask is ever passed (:func:`last_logits`), which makes generation exact on every
attention implementation: megatron-core's local ``DotProductAttention`` (CPU tests), Transformer
Engine's flash/fused attention and megatron's fused causal softmax kernel (which ignores masks).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from nemo_viper.errors import ConfigError


def generation_model(policy):
    """The policy's ``Qwen25VLModel`` if this layout supports generation, else a one-line ``ConfigError``.
    Any layer spec works (local or Transformer Engine): attention is never given a mask (module doc)."""
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    if parallel_state.get_pipeline_model_parallel_world_size() > 1 or len(policy.chunks) != 1:
        raise ConfigError(
            "generation does not support pipeline parallelism: build the policy for rollouts with "
            f"pipeline_parallel=1 (got {policy.config.pipeline_parallel}, {len(policy.chunks)} model chunk(s))"
        )
    model = unwrap_model(policy.chunks[0])
    if model.config.sequence_parallel:
        raise ConfigError("generation does not support sequence parallelism: build the policy without it")
    return model


@contextmanager
def without_fp8(model):
    """Run ``model`` with bf16 GEMMs inside the block, whatever its FP8 training recipe.

    An FP8-trained policy generates in bf16: megatron enters Transformer Engine's FP8 autocast only
    when ``config.fp8`` is set, so clearing it skips FP8 quantisation (TE computes in the activation
    dtype, dequantising FP8-stored weights). Decoding steps have one token per row, far below the token
    alignment FP8 GEMMs need, and would feed the delayed-scaling amax history with decode statistics;
    the GRPO loss uses log-probs recomputed in the training precision, so sampling precision never
    enters the objective.
    """
    from megatron.core.transformer import TransformerConfig

    configs = {id(m.config): m.config for m in model.modules() if isinstance(getattr(m, "config", None), TransformerConfig)}
    saved = {key: config.fp8 for key, config in configs.items()}
    for config in configs.values():
        config.fp8 = None
    try:
        yield
    finally:
        for key, config in configs.items():
            config.fp8 = saved[key]


@dataclass
class EncodedPrompts:
    """A right-padded batch of P prompts ready for the decoder."""

    embeddings: Tensor  # [S, P, H]: token embeddings with the image features in the image-pad slots
    positions: Tensor  # [3, P, S] long: M-RoPE (temporal, height, width) positions (padding: don't care)
    lengths: Tensor  # [P] long: prompt lengths (real columns of each row)
    next_position: Tensor  # [P] long: the first generated token's position (max prompt position + 1)


def right_pad(prompts: list[Tensor], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Token ids [P, S] with every prompt starting at column 0, and the padding mask [P, S] (True = padding)."""
    ids = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True, padding_value=pad_token_id)
    lengths = torch.tensor([len(p) for p in prompts])
    return ids, torch.arange(ids.shape[1]) >= lengths[:, None]


@torch.no_grad()
def encode_prompts(model, ids: Tensor, padding: Tensor, pixel_values: Tensor | None, image_grid_thw: Tensor | None):
    """Embed right-padded prompts ``ids`` [P, S]; the images of all prompts (in prompt order) pass through
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
    return EncodedPrompts(embeddings, positions, (~padding).sum(dim=1), next_position)


def _last_position_logits(hidden_states, output_layer, output_weight=None, **_):
    logits, _ = output_layer(hidden_states[-1:], weight=output_weight)
    return logits[0]


@torch.no_grad()
def last_logits(language_model, embeddings: Tensor, positions: Tensor, context=None) -> Tensor:
    """Vocab-sharded logits [B, V/TP] after the last of ``embeddings`` [q, B, H].

    ``positions`` [3, B, L] cover all L columns seen so far (cached ones included: megatron's static
    context re-applies RoPE to the cached keys). With ``context`` the new keys/values are cached at
    ``context.sequence_len_offset``; the caller advances it. Attention is causal without any mask:
    the columns are contiguous real tokens of every row (module doc).
    """
    return language_model(
        input_ids=None,
        position_ids=positions,
        attention_mask=None,
        decoder_input=embeddings,
        inference_context=context,
        output_processor=_last_position_logits,
    )


def select_cache_rows(context, rows: Tensor) -> None:
    """Keep (or repeat) batch rows ``rows`` of every layer's cached keys and values."""
    for layer, (keys, values) in context.key_value_memory_dict.items():
        context.key_value_memory_dict[layer] = (keys.index_select(1, rows), values.index_select(1, rows))
    context.max_batch_size = len(rows)
