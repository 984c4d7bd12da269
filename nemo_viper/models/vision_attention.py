"""The vision tower's attention over packed windows in one kernel call per block.

Qwen2.5-VL's vision transformer (HF's, which Megatron-Bridge instantiates as the policy's ``visual``) packs
the patches of every image into one sequence and attends within segments given by cumulative lengths
``cu_seqlens``: the windows of an image (``window_size`` pixels square, 64 patches at full size) in the
windowed blocks, whole images in the ``fullatt_block_indexes`` blocks. Under ``sdpa`` HF runs one SDPA call
per segment (about 80 per 1 MP image in every windowed block, again in recompute and backward); an
attention implementation whose name contains ``flash`` is handed the cumulative lengths instead.
:func:`packed_window_attention` is registered as such an implementation, :data:`VISION_ATTENTION`, and
computes, for segment ``[c_i, c_{i+1})`` of the packed ``q, k, v`` [tokens, heads, d],

    out[t] = softmax(q[t] k[c_i:c_{i+1}]^T * scale) v[c_i:c_{i+1}]    for c_i <= t < c_{i+1},

in one call:

- on CUDA in bf16/fp16, with PyTorch's variable-length flash attention (``torch.nn.attention.varlen``,
  torch >= 2.10) when the scale is its default ``d ** -0.5`` (the tower's);
- otherwise as padded batched segments: each segment gathered into a row of ``[segments, heads, longest,
  d]`` and one SDPA call with a key-padding mask (no mask, so any SDPA kernel, when all segments are the
  same length). Padded keys get zero weight and padded query rows are dropped, so the result is the
  per-segment attention exactly.

:func:`use_packed_window_attention` switches a built tower to it (the adapter edge: nothing in
transformers or Megatron-Bridge is patched).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn.functional import scaled_dot_product_attention

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10: padded SDPA everywhere
    varlen_attn = None

VISION_ATTENTION = "flash_varlen_or_padded_sdpa"


def uses_varlen_kernel(query: Tensor, scale: float) -> bool:
    """Whether :func:`packed_segment_attention` takes PyTorch's variable-length flash kernel for ``query``."""
    return (varlen_attn is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and math.isclose(scale, query.shape[-1] ** -0.5, rel_tol=1e-6))


def padded_segment_attention(query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor,
                             scale: float) -> Tensor:
    """Attention within each segment of packed ``query/key/value`` [tokens, heads, d] as one SDPA call over the
    segments padded to the longest (see the module doc); returns [tokens, heads, d]."""
    starts, lengths = cu_seqlens[:-1], cu_seqlens[1:] - cu_seqlens[:-1]
    offsets = torch.arange(int(lengths.max()), device=query.device)
    present = offsets < lengths[:, None]  # [segments, longest]
    index = torch.where(present, starts[:, None] + offsets, 0)
    q, k, v = (t[index].transpose(1, 2) for t in (query, key, value))  # [segments, heads, longest, d]
    mask = None if bool(present.all()) else present[:, None, None, :]
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)[present]


def packed_segment_attention(query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor, longest: int,
                             scale: float) -> Tensor:
    """Attention within each ``cu_seqlens`` segment of packed ``query/key/value`` [tokens, heads, d], one kernel
    call: variable-length flash attention where :func:`uses_varlen_kernel`, padded SDPA otherwise."""
    if uses_varlen_kernel(query, scale):
        cu = cu_seqlens.to(torch.int32)
        return varlen_attn(query, key, value, cu, cu, longest, longest)
    return padded_segment_attention(query, key, value, cu_seqlens, scale)


def packed_window_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                            dropout: float = 0.0, cu_seq_lens_q: Tensor | None = None,
                            cu_seq_lens_k: Tensor | None = None, max_length_q=None, is_causal: bool = False,
                            **_) -> tuple[Tensor, None]:
    """transformers' attention-implementation contract for the vision tower: ``query/key/value``
    [1, heads, tokens, d] with segments ``cu_seq_lens_q`` (= ``cu_seq_lens_k``); returns [1, tokens, heads, d]."""
    if attention_mask is not None or is_causal or dropout or cu_seq_lens_q is None:
        raise ValueError(f"{VISION_ATTENTION} computes non-causal attention within cu_seqlens segments only "
                         "(no mask, no dropout)")
    if cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_q, cu_seq_lens_k):
        raise ValueError(f"{VISION_ATTENTION} needs the same segments for queries and keys")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    longest = int(max_length_q) if max_length_q is not None else int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, d]
    return packed_segment_attention(q, k, v, cu_seq_lens_q, longest, scale).unsqueeze(0), None


def use_packed_window_attention(visual: torch.nn.Module) -> None:
    """Make HF's Qwen2.5-VL vision tower ``visual`` attend through :func:`packed_window_attention` (registered
    with transformers' ``AttentionInterface`` under :data:`VISION_ATTENTION`)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VISION_ATTENTION, packed_window_attention)
    visual.config._attn_implementation = VISION_ATTENTION
