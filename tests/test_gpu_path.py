"""GPU-only checks (``pytest -m gpu``; skipped without CUDA): the policy in bf16/FP8 on the Transformer Engine
spec against fp32, a local-spec checkpoint on the TE spec, NCCL collectives. (Generation on the TE spec:
``tests/rollout/test_megatron_generation.py``, its ``gpu`` test.)"""

import json

import pytest

from launch import run_worker
from test_policy import reference  # noqa: F401 - the batch and transformers' outputs (fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_policy_precisions_and_collectives_on_the_gpu(tiny_hf_dir, reference, tmp_path):  # noqa: F811
    result = run_worker("gpu_policy.py", "--hf", str(tiny_hf_dir), "--inputs", str(reference["path"]),
                        "--out", str(tmp_path), gpu=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["nccl_backend"] == "nccl" and report["cpu_tensor_travels_on"] == "cuda:0"
    assert report["bf16_blockwise"]["built_spec"] == "transformer_engine"
    assert report["bf16_blockwise"]["max_diff"] < 0.1, report
    ran = [k for k, v in report.items() if k.startswith("fp8_") and "max_diff" in v]
    assert ran, f"no FP8 recipe ran on this GPU: {report}"
    for key in ran:
        assert report[key]["max_diff"] < 0.5, report
