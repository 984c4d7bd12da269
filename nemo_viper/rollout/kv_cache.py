"""Generation's KV cache: fixed slots with their own lengths, refilled in place, and the attention that reads it.

The cache holds ``slots`` samples x ``columns`` tokens per decoder layer, keys already rotated (RoPE is
applied once, when a token's key is computed). Slot ``s`` holds its sample's tokens at columns
``0 .. fill[s]``; slots advance independently, so a finished sample's slot is refilled with a waiting
sample's prompt while the others keep decoding (continuous batching), and nothing is ever copied
between slots or compacted.

During generation every decoder layer's core attention is replaced by :class:`SlotAttention`
(:func:`slot_attention`), which takes the rotated query/key/value of the new tokens from megatron's
``Attention`` (called WITHOUT an inference context, so megatron computes RoPE for exactly the
positions it is given), writes the keys/values into the cache and attends with
``torch.nn.functional.scaled_dot_product_attention``:

- **prefill** (:meth:`SlotKVCache.prefill`): a batch of right-padded prompts; their keys go to the
  columns ``0 .. q-1`` of the slots that will decode them (several slots per prompt: its ``n``
  samples), attention is causal within the prompt. Padding columns lie after every real one, so no
  real query sees them, and decoding overwrites them.
- **decode** (:meth:`SlotKVCache.decode`): one new token for slots ``0 .. B-1``, written at column
  ``fill[s]`` of its slot; slot ``s`` attends to its columns ``0 .. fill[s]`` (a boolean mask on a view
  of the first ``width`` columns: no copy of the cache).

Kernels. SDPA runs a boolean mask only on its math backend when it is combined with ``enable_gqa``
(CUDA's flash kernel takes no mask, its memory-efficient kernel no grouped query heads), and the math
backend copies every key/value group once per query head. Decode therefore folds the query heads of a
group into the query-length axis: with one new token per slot, query ``[B, heads, 1, d]`` is viewed as
``[B, groups, heads / groups, d]``, which attends to keys/values ``[B, groups, width, d]`` as plain
multi-head attention (head ``h`` reads group ``h // (heads / groups)``, megatron's and SDPA's grouping),
so the masked call is one the memory-efficient kernel runs. Prefill has no mask (causal) and keeps
``enable_gqa``, which CUDA's flash kernel runs. Megatron's and Transformer Engine's core-attention
kernels never run during cached generation, so their mask conventions do not matter. Exact for vanilla
softmax attention without sliding windows (checked, ``ConfigError`` otherwise).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.functional import scaled_dot_product_attention

from nemo_viper.errors import ConfigError


@dataclass
class _Prefill:
    slots: Tensor  # [T] long: cache slots written
    sources: Tensor  # [T] long: the batch row (prompt) each slot takes its keys from


@dataclass
class _Decode:
    fill: Tensor  # [B] long: the column each slot's new token is written to (= its earlier tokens)
    width: int  # columns read: max over the live slots' fill + 1


class SlotKVCache:
    """Keys and values of ``slots`` x ``columns`` tokens for every decoder layer (see the module doc).

    Buffers are ``[slots, groups, columns, head_dim]`` per layer, allocated (zeroed) at the first write with
    the keys' dtype, device and per-rank group count.
    """

    def __init__(self, slots: int, columns: int):
        self.slots, self.columns = slots, columns
        self.layers: dict[int, tuple[Tensor, Tensor]] = {}
        self._plan: _Prefill | _Decode | None = None

    @staticmethod
    def bytes_per_slot(config, tensor_parallel: int, columns: int, dtype: torch.dtype) -> int:
        """Cache bytes of one slot on one tensor-parallel rank (keys + values of every layer)."""
        groups = max(1, config.num_query_groups // tensor_parallel)
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * groups * config.kv_channels * columns * element

    @contextmanager
    def prefill(self, slots: Tensor, sources: Tensor):
        """Within the block, the model's forward over right-padded prompts (batch row ``sources[i]``) fills
        columns ``0 .. q-1`` of slot ``slots[i]``."""
        self._plan = _Prefill(slots, sources)
        try:
            yield
        finally:
            self._plan = None

    @contextmanager
    def decode(self, fill: Tensor, width: int):
        """Within the block, the model's one-token forward over slots ``0 .. len(fill)-1`` writes at column
        ``fill`` and attends to columns ``0 .. fill`` of each slot (``width`` >= every live slot's fill + 1)."""
        self._plan = _Decode(fill.clamp(max=self.columns - 1), min(width, self.columns))
        try:
            yield
        finally:
            self._plan = None

    def _buffers(self, layer: int, key: Tensor) -> tuple[Tensor, Tensor]:
        if layer not in self.layers:
            shape = (self.slots, key.shape[2], self.columns, key.shape[3])
            self.layers[layer] = tuple(torch.zeros(shape, dtype=key.dtype, device=key.device) for _ in range(2))
        return self.layers[layer]

    def attend(self, layer: int, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        """Store the new ``key``/``value`` [q, B, groups, d] of ``layer`` and return the attention output
        [q, B, heads * d] of ``query`` [q, B, heads, d] under the current plan."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("SlotKVCache.attend outside a prefill/decode block")
        keys, values = self._buffers(layer, key)
        new_k, new_v = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)  # [B, groups, q, d]
        if isinstance(plan, _Decode):
            return self._decode_attention(plan, keys, values, query, new_k, new_v, scale)
        length = key.shape[0]
        keys[plan.slots, :, :length] = new_k[plan.sources]
        values[plan.slots, :, :length] = new_v[plan.sources]
        q = query.permute(1, 2, 0, 3)  # [B, heads, q, d]
        out = scaled_dot_product_attention(q, new_k, new_v, is_causal=True, scale=scale, enable_gqa=True)
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)

    @staticmethod
    def _decode_attention(plan: _Decode, keys: Tensor, values: Tensor, query: Tensor, new_k: Tensor,
                          new_v: Tensor, scale: float) -> Tensor:
        """Write the new token of each slot and attend with the query heads of a group folded into the query
        axis (see the module doc): a masked SDPA call without ``enable_gqa``."""
        batch, heads, groups = query.shape[1], query.shape[2], keys.shape[1]
        rows = torch.arange(batch, device=plan.fill.device)
        keys[rows, :, plan.fill] = new_k[:, :, 0]
        values[rows, :, plan.fill] = new_v[:, :, 0]
        visible = torch.arange(plan.width, device=plan.fill.device) <= plan.fill[:, None]  # [B, width]
        grouped = query[0].reshape(batch, groups, heads // groups, query.shape[3])  # [B, groups, heads/groups, d]
        out = scaled_dot_product_attention(
            grouped,
            keys[:batch, :, : plan.width],
            values[:batch, :, : plan.width],
            attn_mask=visible[:, None, None, :],
            scale=scale,
        )
        return out.reshape(1, batch, heads * query.shape[3])


class SlotAttention(torch.nn.Module):
    """Stands in for a decoder layer's core attention during generation: attention through ``cache``."""

    def __init__(self, cache: SlotKVCache, layer: int, scale: float):
        super().__init__()
        self.cache, self.layer, self.scale = cache, layer, scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise ConfigError("generation's KV cache supports neither attention biases nor packed sequences")
        return self.cache.attend(self.layer, query, key, value, self.scale)


def _softmax_scale(config) -> float:
    if getattr(config, "window_size", None) is not None:
        raise ConfigError("generation's KV cache does not support sliding-window attention (config.window_size)")
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        raise ConfigError(f"generation's KV cache needs softmax_type='vanilla', got {config.softmax_type!r}")
    return config.softmax_scale if config.softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)


@contextmanager
def slot_attention(language_model, cache: SlotKVCache):
    """Route every decoder layer's core attention of ``language_model`` through ``cache`` inside the block
    (the original modules are put back afterwards, also on error)."""
    layers = list(language_model.decoder.layers)
    originals = [layer.self_attention.core_attention for layer in layers]
    scale = _softmax_scale(language_model.config)
    try:
        for index, layer in enumerate(layers):
            layer.self_attention.core_attention = SlotAttention(cache, index, scale)
        yield
    finally:
        for layer, original in zip(layers, originals):
            layer.self_attention.core_attention = original
