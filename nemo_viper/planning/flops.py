"""Model FLOPs of the policy's forward pass, from sizes alone (no torch): the numerator of MFU.

Only matrix products count, 2 FLOPs per multiply-add; norms, rotary, softmax and the loss do not. A
training pass (forward and backward) is 3 forward passes; recomputed activations are not counted (model
FLOPs, not hardware FLOPs), so MFU does not rise when a run recomputes more.

- **Language model**, one row of ``S`` tokens: ``2·N·S`` for the ``N`` weights a token passes through
  (per layer q and o ``h·h``, k and v ``h·g·d``, the SwiGLU MLP ``3·h·f``; the output layer ``V·h``; the
  embedding is a lookup), plus the attention products ``QKᵀ`` and ``PV``: ``2·2·L·a·d·S²`` when every
  query meets every key. A causal kernel skips the masked half: :meth:`Flops.causal` counts ``S²/2``.
  Training: ``6·N`` per token plus three times the causal attention term.
- **Vision tower**, one image of ``P`` patches: ``2·N_v·P`` (patch embedding ``3·t·p²·h_v``, per block qkv
  ``3·h_v²``, projection ``h_v²`` and SwiGLU MLP ``3·h_v·f_v``) plus the patch merger's two products on the
  ``P/m²`` merged tokens, plus per block ``2·2·h_v·Σ w²`` over its attention windows of ``w`` patches
  (windowed blocks: windows of ``window_size`` pixels a side, cut at the image border; full-attention
  blocks: the whole image). Vision attention is not causal.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from nemo_viper.planning.memory import Architecture


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs split into the weight products (``dense``) and the attention products of a kernel that
    computes every query-key pair (``attention``); causal attention keeps half of the latter."""

    dense: float
    attention: float

    @property
    def full(self) -> float:
        return self.dense + self.attention

    @property
    def causal(self) -> float:
        return self.dense + self.attention / 2

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.dense + other.dense, self.attention + other.attention)


def lm_matmul_params(arch: Architecture) -> int:
    """Weights of the language model's matrix products per token: the layers and the output layer."""
    h, kv = arch.hidden, arch.kv_heads * arch.head_dim
    layer = 2 * h * h + 2 * h * kv + 3 * h * arch.ffn
    return arch.layers * layer + arch.vocab * h


def lm_forward_flops(arch: Architecture, row_lengths: Iterable[int]) -> Flops:
    """One forward pass of the language model over rows of these token counts (padding excluded)."""
    lengths = list(row_lengths)
    dense = 2 * lm_matmul_params(arch) * sum(lengths)
    attention = 4 * arch.layers * arch.heads * arch.head_dim * sum(s * s for s in lengths)
    return Flops(dense, attention)


def vision_windows(arch: Architecture, grid_thw: tuple[int, int, int], window_size: int) -> list[int]:
    """Patches of each attention window of a windowed block for one image of ``grid_thw`` patches: squares of
    ``window_size / (patch·merge)`` merged tokens a side over each frame, the last row and column cut short."""
    t, h, w = grid_thw
    side = window_size // arch.merge // arch.patch
    rows, columns = h // arch.merge, w // arch.merge
    heights = [min(side, rows - r) for r in range(0, rows, side)]
    widths = [min(side, columns - c) for c in range(0, columns, side)]
    return [a * b * arch.merge**2 for _ in range(t) for a in heights for b in widths]


def vision_forward_flops(arch: Architecture, grids: Iterable[tuple[int, int, int]], window_size: int,
                         full_attention_blocks: int) -> Flops:
    """One forward pass of the vision tower over images of these ``(t, h, w)`` patch grids; of its
    ``vision_depth`` blocks, ``full_attention_blocks`` attend over each whole frame."""
    hv, fv = arch.vision_hidden, arch.vision_ffn
    merged = hv * arch.merge**2
    per_patch = 3 * arch.temporal_patch * arch.patch**2 * hv + arch.vision_depth * (4 * hv * hv + 3 * hv * fv)
    per_merged_token = merged * merged + merged * arch.hidden
    dense = attention = 0
    windowed_blocks = arch.vision_depth - full_attention_blocks
    for grid in grids:
        t, h, w = grid
        patches = t * h * w
        dense += 2 * per_patch * patches + 2 * per_merged_token * patches // arch.merge**2
        windows = sum(size * size for size in vision_windows(arch, grid, window_size))
        attention += 4 * hv * (windowed_blocks * windows + full_attention_blocks * t * (h * w) ** 2)
    return Flops(dense, attention)

