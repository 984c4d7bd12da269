"""The published Qwen2.5-VL-3B (tied embeddings, vocab 151936) and 7B (untied, vocab 152064) architectures at
full width, language model cut to 2 layers, full 32-block vision tower, random weights in the published
on-disk format (flat config.json, bf16 safetensors shards): the Megatron policy against transformers at TP1
and TP2 (logits, log-probs), greedy generation against ``transformers.generate``, and a bit-exact
import/export round trip.

Each step runs in its own process (the fp32 HF reference and the fp32 Megatron policy are ~5 GB / ~9 GB
for 3B / 7B each, never resident together); one checkpoint and one reference per size are shared by the
tests of that size. Measured by hand on the 2-core machine: max |Δlogit| 5e-6 (3B) / 8e-6 (7B).
"""

import subprocess
import sys

import pytest
import torch

from launch import REPO, WORKERS, run_worker

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4


def run_step(*args: str) -> None:
    """A non-distributed worker step (checkpoint writing, the transformers reference)."""
    env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "",
           "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(WORKERS / "full_size.py"), *args], capture_output=True, text=True,
                            timeout=900, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-6000:]


@pytest.fixture(scope="module", params=["3b", "7b"])
def size(request, tmp_path_factory):
    """``(size, hf_dir, reference file, work dir)``: the checkpoint and transformers' outputs on it."""
    work = tmp_path_factory.mktemp(request.param)
    run_step("write", "--size", request.param, "--out", str(work / "hf"))
    run_step("reference", "--hf", str(work / "hf"), "--out", str(work / "reference.pt"))
    return request.param, work / "hf", work / "reference.pt", work


def megatron(size, tp: int, *extra: str) -> dict:
    _, hf, reference, work = size
    out = work / f"megatron_tp{tp}.pt"
    run_worker("full_size.py", "megatron", "--hf", str(hf), "--inputs", str(reference), "--out", str(out),
               "--tp", str(tp), *extra, nproc=tp, timeout=900)
    return torch.load(out)


def assert_matches(result: dict, reference_file) -> None:
    reference = torch.load(reference_file, weights_only=False)
    vocab = reference["logits"].shape[-1]
    assert result["logits"].shape[-1] == vocab  # the published vocabulary: no padding to a TP multiple
    valid = reference["valid"]
    logit_diff = (result["logits"][..., :vocab] - reference["logits"])[valid].abs().max().item()
    logprob_diff = (result["logprobs"] - reference["logprobs"]).abs().max().item()
    assert logit_diff <= TOLERANCE, f"logits differ from transformers by {logit_diff}"
    assert logprob_diff <= TOLERANCE, f"log-probs differ from transformers by {logprob_diff}"
    assert result["greedy"] == reference["greedy"]


def test_tp1_matches_transformers_and_exports_bit_exact(size):
    from safetensors import safe_open

    _, hf, reference, work = size
    assert_matches(megatron(size, 1, "--export", str(work / "exported")), reference)
    handles = {}
    for directory in (hf, work / "exported"):  # tensor name -> open file, read one tensor at a time
        files = [safe_open(file, "pt") for file in sorted(directory.glob("*.safetensors"))]
        handles[directory] = {name: handle for handle in files for name in handle.keys()}
    original, exported = handles[hf], handles[work / "exported"]
    assert sorted(exported) == sorted(original)
    for name in original:
        tensor, roundtrip = original[name].get_tensor(name), exported[name].get_tensor(name)
        assert roundtrip.dtype == tensor.dtype == torch.bfloat16 and torch.equal(roundtrip, tensor), name


def test_tp2_matches_transformers(size):
    assert_matches(megatron(size, 2), size[2])
