"""Model FLOPs (``nemo_viper.planning.flops``) against PyTorch's own count of a transformers Qwen2.5-VL forward
pass (``torch.utils.flop_counter``), on a small model with unequal vision windows: two independent counts."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nemo_viper.planning.flops import lm_forward_flops, vision_forward_flops, vision_windows
from nemo_viper.planning.memory import Architecture

CONFIG = {
    "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": True, "max_position_embeddings": 4096,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "image_token_id": 290, "video_token_id": 291, "vision_start_token_id": 292, "vision_end_token_id": 293,
    "vision_config": {"depth": 3, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 64,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                      "fullatt_block_indexes": [2], "in_chans": 3},
}
GRID = (1, 12, 20)  # merged 6 x 10: windows of 4 x 4 cut to 4x2, 2x4 and 2x2 at the border


@pytest.fixture(scope="module")
def counted():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(**CONFIG)
    config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    t, h, w = GRID
    image_tokens = t * h * w // 4
    ids = torch.tensor([[5, 6, 292] + [290] * image_tokens + [293] + list(range(7, 30))])
    pixels = torch.randn(t * h * w, 3 * 2 * 14 * 14)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([GRID]))
    return counter.get_total_flops(), ids.shape[1]


def test_windows_are_transformers_windows():
    from transformers.vision_utils import get_vision_window_index

    arch = Architecture.from_hf_config(CONFIG)
    _, bounds = get_vision_window_index(torch.tensor([GRID]), spatial_merge_size=2, window_size=112, patch_size=14)
    sizes = [b - a for a, b in zip(bounds.tolist(), bounds.tolist()[1:]) if b > a]
    assert vision_windows(arch, GRID, 112) == sizes == [64, 64, 32, 32, 32, 16]


def test_forward_flops_equal_torch_count(counted):
    total, length = counted
    arch = Architecture.from_hf_config(CONFIG)
    ours = lm_forward_flops(arch, [length]) + vision_forward_flops(arch, [GRID], 112, full_attention_blocks=1)
    # transformers' rotary embedding is one small matrix product per forward (inv_freq x positions), not ours
    assert ours.full == pytest.approx(total, rel=1e-3)
    assert ours.causal < ours.full
