"""The Megatron Qwen2.5-VL pieces generation drives directly: prompt encoding and one decoder pass.

Bridge's ``Qwen25VLModel.forward`` has no per-row "logits at column c" output and re-runs the vision
tower on every call, so generation calls the parts itself: the vision tower once per prompt's images,
the language model's embedding, HF's ``get_rope_index`` for the multimodal RoPE positions, and the
megatron-core ``GPTModel`` language model with ``decoder_input=`` (:func:`row_logits`).

Layout conventions (megatron's): hidden states are ``[seq, batch, hidden]``. Prompts are RIGHT-padded,
so under causal attention no real column ever attends to padding and no attention mask is passed to
megatron. The KV cache is not megatron's static inference context (one length for all rows) but
:mod:`nemo_viper.rollout.kv_cache` (one length per slot), which owns attention during cached
generation.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

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


def _row_logits(hidden_states, output_layer, output_weight=None, *, columns: Tensor, **_):
    rows = hidden_states.gather(0, columns[None, :, None].expand(1, -1, hidden_states.shape[-1]))  # [1, B, H]
    logits, _ = output_layer(rows, weight=output_weight)
    return logits[0]


@torch.no_grad()
def row_logits(language_model, embeddings: Tensor, positions: Tensor, columns: Tensor) -> Tensor:
    """Vocab-sharded logits [B, V/TP] after column ``columns[b]`` of each row of ``embeddings`` [q, B, H].

    ``positions`` [3, B, q] are the M-RoPE positions of these q columns. No inference context and no
    attention mask: attention is causal over the q columns, or whatever the layers' core attention does
    (generation swaps in :class:`~nemo_viper.rollout.kv_cache.SlotAttention`). Rows are right-padded, so a
    real column never attends to padding.
    """
    return language_model(
        input_ids=None,
        position_ids=positions,
        attention_mask=None,
        decoder_input=embeddings,
        output_processor=partial(_row_logits, columns=columns),
    )
