"""The vision tower's packed-window attention against transformers' own (one SDPA call per window), forward and
backward, with windows of unequal length (images whose sides are not whole windows) and two images."""

import copy

import pytest
import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

import nemo_viper.models.vision_attention as vision_attention
from nemo_viper.models.vision_attention import VISION_ATTENTION, packed_segment_attention, use_packed_window_attention

DEPTH = 3


@pytest.fixture(scope="module")
def towers():
    """transformers' tower under sdpa and a copy switched to the packed-window attention (float64, random init)."""
    torch.manual_seed(0)
    config = Qwen2_5_VLVisionConfig(depth=DEPTH, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=24,
                                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                                    fullatt_block_indexes=[1], in_channels=3)
    config._attn_implementation = "sdpa"
    reference = Qwen2_5_VisionTransformerPretrainedModel._from_config(config).double()
    packed = copy.deepcopy(reference)
    use_packed_window_attention(packed)
    return reference, packed


def run(tower, pixels, grid):
    pixels = pixels.clone().requires_grad_(True)
    out = tower(pixels, grid_thw=grid).pooler_output
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {name: p.grad.clone() for name, p in tower.named_parameters()}
    tower.zero_grad()
    return out.detach(), pixels.grad, grads


def test_packed_window_attention_matches_transformers_forward_and_backward(towers, monkeypatch):
    reference, packed = towers
    assert reference.config._attn_implementation == "sdpa" and packed.config._attn_implementation == VISION_ATTENTION
    grid = torch.tensor([[1, 10, 6], [1, 6, 12]])  # 2x2-merged windows of 4x4 patches: 16, 8 and 4 patches long
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, dtype=torch.float64)
    calls = []
    real = vision_attention.scaled_dot_product_attention
    monkeypatch.setattr(vision_attention, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(kwargs.get("attn_mask")) or real(*args, **kwargs))
    expected, got = run(reference, pixels, grid), run(packed, pixels, grid)
    assert len(calls) == DEPTH  # one call per block, masked: the windows (and the two images) differ in length
    assert all(mask is not None for mask in calls)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    for name, grad in expected[2].items():
        torch.testing.assert_close(got[2][name], grad, msg=name)


def test_segments_of_equal_length_need_no_mask(monkeypatch):
    """Equal segments: one unmasked call (any SDPA kernel), equal to attention over each segment alone."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(12, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 4, 8, 12])
    masks = []
    real = vision_attention.scaled_dot_product_attention
    monkeypatch.setattr(vision_attention, "scaled_dot_product_attention",
                        lambda *args, **kwargs: masks.append(kwargs.get("attn_mask")) or real(*args, **kwargs))
    out = packed_segment_attention(q, k, v, cu, 4, 0.3)
    assert masks == [None]
    for start in (0, 4, 8):
        part = slice(start, start + 4)
        weights = torch.softmax(0.3 * torch.einsum("qhd,khd->hqk", q[part], k[part]), dim=-1)
        torch.testing.assert_close(out[part], torch.einsum("hqk,khd->qhd", weights, v[part]))
