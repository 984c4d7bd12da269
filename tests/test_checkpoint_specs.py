"""Policy checkpoints across layer specs: local (CPU import) <-> Transformer Engine (GPU) checkpoint keys."""

import json
from types import SimpleNamespace

import pytest

from launch import run_worker
from nemo_viper.errors import CheckpointError
from nemo_viper.models.checkpoint import match_checkpoint_keys

EXTRA = "language_model.decoder.layers.self_attention.core_attention._extra_state"
TENSORS = ["language_model.decoder.layers.self_attention.linear_qkv.layer_norm_weight",
           "language_model.decoder.layers.self_attention.linear_qkv.weight", "vision_model.blocks.0.attn.qkv.weight"]


def sharded(keys):
    return {f"name:{key}": SimpleNamespace(key=key) for key in keys}


def test_te_model_loads_a_local_checkpoint():
    model = sharded(TENSORS + [EXTRA])
    assert match_checkpoint_keys(model, set(TENSORS), "ckpt") == {f"name:{EXTRA}"}
    assert sorted(model) == sorted(f"name:{key}" for key in TENSORS)


def test_local_model_loads_a_te_checkpoint_and_same_spec_is_untouched():
    for checkpoint in (TENSORS + [EXTRA], TENSORS):
        model = sharded(TENSORS)
        assert match_checkpoint_keys(model, set(checkpoint), "ckpt") == set()
        assert sorted(entry.key for entry in model.values()) == sorted(TENSORS)


def test_a_missing_tensor_is_a_one_line_error():
    with pytest.raises(CheckpointError) as error:
        match_checkpoint_keys(sharded(TENSORS + [EXTRA]), set(TENSORS[:2]), "/runs/x")
    assert str(error.value).startswith("/runs/x: the checkpoint has no 'vision_model.blocks.0.attn.qkv.weight' (1 ")
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_checkpoints_load_across_layer_specs(tiny_hf_dir, tmp_path):
    result = run_worker("spec_checkpoint.py", "--hf", str(tiny_hf_dir), "--out", str(tmp_path))
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["local_only_keys"] == [] and report["te_only_keys"] == [EXTRA]
    assert {"language_model.decoder.layers.self_attention.linear_qkv.layer_norm_weight",  # local spec saves TE names
            "language_model.decoder.layers.mlp.linear_fc1.layer_norm_weight"} <= set(report["norm_keys"])
    assert report["random_init_difference"] > 1e-3  # the loads below really replace the weights
    assert report["te_to_local_difference"] == 0.0
    assert report["local_to_te_difference"] == 0.0
    assert report["fresh_extra_state"] == [f"language_model.decoder.layers.{i}.self_attention.core_attention._extra_state"
                                           for i in range(2)]
    assert "has no 'language_model.decoder.final_layernorm.weight'" in report["missing_key_error"]
