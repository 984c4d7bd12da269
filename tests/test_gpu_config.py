"""The GPU configuration of the policy, checked on CPU: precision x FP8 recipe x GPU x layer spec validation,
the provider's attention flags as a GPU build sets them, and Bridge's mixed-precision preset on all configs."""

import pytest
import torch

from nemo_viper.errors import ConfigError
from nemo_viper.models.policy import Accelerator, PolicyConfig, check_precision
from nemo_viper.runtime import te_import_guard

H100 = Accelerator(cuda=True, transformer_engine=True, compute_capability=(9, 0), name="H100")
B200 = Accelerator(cuda=True, transformer_engine=True, compute_capability=(10, 0), name="B200")
L40 = Accelerator(cuda=True, transformer_engine=True, compute_capability=(8, 9), name="L40S")
A100 = Accelerator(cuda=True, transformer_engine=True, compute_capability=(8, 0), name="A100")
V100 = Accelerator(cuda=True, transformer_engine=True, compute_capability=(7, 0), name="V100")
H100_NO_TE = Accelerator(cuda=True, transformer_engine=False, compute_capability=(9, 0), name="H100")
CPU = Accelerator(cuda=False, transformer_engine=False)


@pytest.mark.parametrize(
    "precision, recipe, spec, accelerator, resolved",
    [
        ("fp8", "blockwise", "auto", H100, "transformer_engine"),
        ("fp8", "mxfp8", "transformer_engine", B200, "transformer_engine"),
        ("fp8", "tensorwise", "auto", L40, "transformer_engine"),
        ("fp8", "delayed", "auto", B200, "transformer_engine"),
        ("bf16", "blockwise", "auto", H100, "transformer_engine"),
        ("bf16", "blockwise", "auto", H100_NO_TE, "local"),
        ("bf16", "blockwise", "local", H100, "local"),
        ("bf16", "blockwise", "auto", CPU, "local"),
        ("fp32", "blockwise", "auto", V100, "transformer_engine"),
    ],
)
def test_supported_combinations(precision, recipe, spec, accelerator, resolved):
    assert check_precision(precision, recipe, spec, accelerator) == resolved


@pytest.mark.parametrize(
    "precision, recipe, spec, accelerator, message",
    [
        ("fp8", "blockwise", "auto", B200, "fp8_recipe='blockwise' needs Hopper (sm90), this is sm100 (B200): use "
                                           "fp8_recipe in ['mxfp8', 'tensorwise', 'delayed'] or precision='bf16'"),
        ("fp8", "mxfp8", "auto", H100, "fp8_recipe='mxfp8' needs Blackwell (sm100+), this is sm90 (H100)"),
        ("fp8", "tensorwise", "auto", A100, "fp8_recipe='tensorwise' needs Ada, Hopper or Blackwell (sm89+)"),
        ("fp8", "blockwise", "local", H100, "precision='fp8' needs layer_spec='transformer_engine'"),
        ("fp8", "blockwise", "auto", H100_NO_TE, "precision='fp8' needs layer_spec='transformer_engine'"),
        ("fp8", "blockwise", "auto", CPU, "precision='fp8' needs a CUDA GPU"),
        ("bf16", "blockwise", "auto", V100, "precision='bf16' needs an Ampere or newer GPU (sm80+); V100 is sm70"),
        ("bf16", "blockwise", "transformer_engine", CPU, "layer_spec='transformer_engine' needs a CUDA GPU"),
        ("fp16", "blockwise", "auto", H100, "precision='fp16' is not one of"),
        ("fp8", "nvfp4", "auto", B200, "fp8_recipe='nvfp4' is not one of"),
        ("bf16", "blockwise", "te", H100, "layer_spec='te' is not one of"),
    ],
)
def test_unsupported_combinations_fail_in_one_line(precision, recipe, spec, accelerator, message):
    with pytest.raises(ConfigError) as error:
        check_precision(precision, recipe, spec, accelerator)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_token_alignment_per_recipe():
    aligned = {r: PolicyConfig(hf_path="x", precision="fp8", fp8_recipe=r).token_alignment
               for r in ("blockwise", "mxfp8", "tensorwise", "delayed")}
    assert aligned == {"blockwise": 128, "mxfp8": 32, "tensorwise": 16, "delayed": 16}
    assert PolicyConfig(hf_path="x", precision="bf16").token_alignment == 1


@pytest.fixture(scope="module")
def provider_for(tiny_hf_dir):
    """``provider_for(config, layer_spec, cuda)``: Bridge's provider of the tiny checkpoint, configured as
    build_policy configures it on a machine with (cuda=True) or without a GPU; nothing is instantiated."""
    te_import_guard.install()
    from megatron.bridge import AutoBridge
    from transformers import AutoConfig

    from nemo_viper.models.hf_checkpoint import read_qwen25_vl_config
    from nemo_viper.models.policy import configure_provider

    hf_config = read_qwen25_vl_config(tiny_hf_dir)
    bridge = AutoBridge.from_hf_config(AutoConfig.from_pretrained(tiny_hf_dir))

    def build(config, layer_spec, cuda):
        provider = bridge.to_megatron_provider(load_weights=False)
        configure_provider(provider, config, hf_config, layer_spec, cuda)
        return provider

    return build


def test_gpu_local_spec_never_uses_the_mask_ignoring_causal_kernel(provider_for, tiny_hf_dir):
    """Megatron's fused causal softmax never reads the mask; on a GPU build of the local spec it must be off."""
    from megatron.bridge.models.gpt_provider import local_layer_spec
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    provider = provider_for(PolicyConfig(hf_path=str(tiny_hf_dir), precision="bf16"), "local", cuda=True)
    assert provider.transformer_layer_spec is local_layer_spec
    assert provider.bf16 and provider.params_dtype == torch.bfloat16
    spec = local_layer_spec(provider)
    assert spec.submodules.self_attention.params["attn_mask_type"] == AttnMaskType.causal
    softmax = FusedScaleMaskSoftmax(  # as DotProductAttention builds it from the provider
        input_in_fp16=provider.fp16, input_in_bf16=provider.bf16, attn_mask_type=AttnMaskType.causal,
        scaled_masked_softmax_fusion=provider.masked_softmax_fusion, mask_func=attention_mask_func,
        softmax_in_fp32=provider.attention_softmax_in_fp32, scale=None,
    )
    mask = torch.zeros(8, 1, 64, 64, dtype=torch.bool)
    assert not softmax.is_kernel_available(mask, b=8, np=4, sq=64, sk=64)  # 3B at TP1: would be True


def test_gpu_te_spec_keeps_the_fused_kernels(provider_for, tiny_hf_dir):
    from megatron.bridge.models.gpt_provider import transformer_engine_layer_spec

    provider = provider_for(PolicyConfig(hf_path=str(tiny_hf_dir), precision="bf16"), "transformer_engine", cuda=True)
    assert provider.transformer_layer_spec is transformer_engine_layer_spec
    assert provider.masked_softmax_fusion  # unused by TE attention; no mask is ever passed (generation test)
    cpu = provider_for(PolicyConfig(hf_path=str(tiny_hf_dir), precision="fp32"), "local", cuda=False)
    assert not cpu.masked_softmax_fusion and not cpu.gradient_accumulation_fusion and cpu.params_dtype == torch.float32


@pytest.mark.parametrize(
    "recipe, fp8_param_gather, mxfp8_reuse",
    [("blockwise", False, False), ("mxfp8", True, True), ("tensorwise", True, False), ("delayed", True, False)],
)
def test_fp8_preset_reaches_model_ddp_and_optimizer(provider_for, tiny_hf_dir, recipe, fp8_param_gather, mxfp8_reuse):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from nemo_viper.models.policy import apply_precision

    config = PolicyConfig(hf_path=str(tiny_hf_dir), precision="fp8", fp8_recipe=recipe)
    provider = provider_for(config, "transformer_engine", cuda=True)
    assert provider.fp8 in ("hybrid", "e4m3") and provider.fp8_recipe == recipe and provider.bf16
    ddp, optimizer = DistributedDataParallelConfig(), OptimizerConfig(optimizer="adam", lr=1e-6)
    apply_precision(config, ddp_config=ddp, optimizer_config=optimizer)
    assert ddp.fp8_param_gather is fp8_param_gather and ddp.grad_reduce_in_fp32
    assert ddp.reuse_grad_buf_for_mxfp8_param_ag is mxfp8_reuse
    assert optimizer.bf16 and optimizer.params_dtype == torch.bfloat16 and optimizer.fp8_recipe == recipe


def test_fp32_and_bf16_optimizer_configs(tiny_hf_dir):
    from megatron.core.optimizer import OptimizerConfig

    from nemo_viper.models.policy import apply_precision

    te_import_guard.install()
    for precision, bf16, dtype in (("fp32", False, torch.float32), ("bf16", True, torch.bfloat16)):
        optimizer = OptimizerConfig(optimizer="adam", lr=1e-6)
        apply_precision(PolicyConfig(hf_path=str(tiny_hf_dir), precision=precision), optimizer_config=optimizer)
        assert optimizer.bf16 is bf16 and optimizer.params_dtype == dtype
