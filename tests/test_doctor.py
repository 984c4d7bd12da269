"""``nemo-viper doctor``: each kind of problem is reported as one line, before any model loads."""

import importlib.util
import json

import pytest

from nemo_viper import doctor
from nemo_viper.cli import main
from nemo_viper.orchestration import write_run_files
from nemo_viper.recipes import recipe


def hf_dir(path, skip=()):
    path.mkdir(parents=True)
    files = {"config.json": json.dumps({"architectures": ["Qwen2_5_VLForConditionalGeneration"],
                                        "model_type": "qwen2_5_vl"}),
             "model.safetensors": "", "tokenizer.json": "{}", "preprocessor_config.json": "{}"}
    for name, text in files.items():
        if name not in skip:
            (path / name).write_text(text)
    return path


@pytest.fixture
def cluster(tmp_path):
    """A 3B config whose every path exists and is complete."""
    (tmp_path / "images").mkdir()
    for name in ("Qwen-Image", "Qwen-Image-Edit"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{}")
    (tmp_path / "bge").mkdir()
    (tmp_path / "bge" / "modules.json").write_text("[]")
    hf_dir(tmp_path / "qwen")
    return [f"run_dir={tmp_path / 'run'}", f"model.hf_path={tmp_path / 'qwen'}", f"synthesis.images={tmp_path / 'images'}",
            f"reward.embedding_model={tmp_path / 'bge'}", f"synthesis.redraw.model={tmp_path / 'Qwen-Image'}",
            f"synthesis.edit.model={tmp_path / 'Qwen-Image-Edit'}", "cluster.min_free_disk_gb=0"]


def problems(overrides, phase=None):
    return doctor.check(recipe("qwen25vl_3b", *overrides), phase, gpu=False)


def test_a_complete_setup_has_no_problems(cluster):
    assert problems(cluster) == []


def test_missing_path(cluster, tmp_path):
    (tmp_path / "images").rmdir()
    assert problems(cluster) == [f"synthesis.images={tmp_path / 'images'}: path not found"]


def test_incomplete_model_dirs(cluster, tmp_path):
    (tmp_path / "qwen" / "model.safetensors").unlink()
    (tmp_path / "qwen" / "preprocessor_config.json").unlink()
    (tmp_path / "Qwen-Image-Edit" / "model_index.json").unlink()
    assert problems(cluster) == [
        f"model.hf_path: {tmp_path / 'qwen'}: incomplete model directory, missing weights (model.safetensors or "
        "model.safetensors.index.json), processor (preprocessor_config.json or processor_config.json)",
        f"synthesis.edit.model={tmp_path / 'Qwen-Image-Edit'}: incomplete model directory, none of model_index.json"]


def test_sharded_weights_must_all_be_there(cluster, tmp_path):
    (tmp_path / "qwen" / "model.safetensors").unlink()
    (tmp_path / "qwen" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (tmp_path / "qwen" / "model-00001-of-00002.safetensors").write_text("")
    assert problems(cluster) == [f"model.hf_path: {tmp_path / 'qwen'}: incomplete model directory, missing weight "
                                 "shards model-00002-of-00002.safetensors"]


def test_hub_id_while_offline(cluster):
    assert problems([*cluster, "reward.embedding_model=BAAI/bge-m3"]) == [
        "reward.embedding_model='BAAI/bge-m3' is a hub id but HF_HUB_OFFLINE=1: give a local directory"]


def test_wrong_transformers_version(cluster, monkeypatch):
    real = doctor.version_problems.__globals__["installed_versions"]
    monkeypatch.setitem(doctor.version_problems.__globals__, "installed_versions",
                        lambda: {**real(), "transformers": "4.57.1"})
    assert problems(cluster) == ["transformers 4.57.1 is outside the supported range >=5.3,<6 "
                                 "(supported containers: nvcr.io/nvidia/nemo:26.08)"]


def test_disk_and_unwritable_run_dir(cluster, tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    found = problems([*cluster, f"run_dir={tmp_path / 'ro' / 'run'}", "cluster.min_free_disk_gb=1e9"])
    assert found[0] == f"run_dir={tmp_path / 'ro' / 'run'}: not writable ({tmp_path / 'ro'} is not writable)" \
        or found[0].startswith("run_dir=")  # root may write anywhere: then only the disk line is certain
    assert found[-1].startswith(f"run_dir={tmp_path / 'ro' / 'run'}: ") and "GiB free on its filesystem, " \
        "cluster.min_free_disk_gb=1e+09" in found[-1]


def test_phase_inputs_not_done(cluster):
    assert problems(cluster, "round1.rl1") == ["phase round1.rl1 needs round1.synth1, which is not done: not started"]


def test_eval_phase_needs_the_harness(cluster, monkeypatch):
    import importlib.util as util

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "lmms_eval" else real(name, *a))
    found = problems([*cluster, "eval.enabled=true", "eval.dataset_root=tiny"], "eval")
    assert found == ["phase eval needs eval_data, which is not done: not started",
                     "eval phases need lmms-eval, which is not installed (scripts/setup.sh and the project image "
                     "install it; README: Installation)"]
    assert problems(cluster, "round1.rl1")[1:] == []  # other phases do not need it


def test_phases_that_generate_on_vllm_need_a_vllm_with_the_backends_calls(cluster, monkeypatch):
    """Only the phases whose backend is vLLM are checked; the line names the keys and what is missing."""
    from nemo_viper.rollout import vllm_backend

    monkeypatch.setattr(vllm_backend, "vllm_problems", lambda: ["vllm 0.9.0 lacks LLM.reset_mm_cache"])
    run = [*cluster, "eval.enabled=true", "eval.dataset_root=tiny", "rollout.backend=vllm",
           "synthesis.vlm.generation.backend=vllm"]
    assert problems(run, "round1.rl1")[1:] == ["rollout.backend=vllm: vllm 0.9.0 lacks LLM.reset_mm_cache"]
    assert problems(run, "round1.synth1")[1:] == [
        "synthesis.vlm.generation.backend=vllm: vllm 0.9.0 lacks LLM.reset_mm_cache"]
    assert "vllm 0.9.0" not in " ".join(problems(run, "eval"))  # eval.backend is qwen2_5_vl here


def test_fp8_capability_and_te(cluster, monkeypatch):
    import torch

    from nemo_viper.models import policy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    config = recipe("qwen25vl_3b", *cluster, "model.precision=fp8")
    found = doctor.check(config, "round1.rl1", gpu=True)
    te_missing = ("model: precision='fp8' needs layer_spec='transformer_engine' (or 'auto' with Transformer Engine "
                  "installed), got layer_spec='auto' -> 'local'")
    assert te_missing in found
    monkeypatch.setattr(policy, "transformer_engine_available", lambda: True)
    found = doctor.check(config, "round1.rl1", gpu=True)  # the policy's own rule: blockwise FP8 is Hopper-only
    assert ("model: fp8_recipe='blockwise' needs Hopper (sm90), this is sm80 (GPU 0 (NVIDIA A100)): use fp8_recipe "
            "in [] or precision='bf16'") in found and te_missing not in found
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert not any(line.startswith("model:") for line in doctor.check(config, "round1.rl1", gpu=True))
    dali = "rl.image_backend=auto but NVIDIA DALI is not installed"
    assert any(line.startswith(dali) for line in found) is (importlib.util.find_spec("nvidia.dali") is None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert "4 GPUs visible, this job runs 8 ranks per node" in doctor.check(config, "round1.rl1", gpu=True)


def test_cli_prints_one_line_per_problem_and_exits_2(cluster, tmp_path, capsys):
    (tmp_path / "images").rmdir()
    (tmp_path / "qwen" / "tokenizer.json").unlink()
    config = recipe("qwen25vl_3b", *cluster)
    write_run_files(config)
    assert main(["doctor", "--run-dir", str(tmp_path / "run"), "--no-gpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("nemo_viper revision ")
    assert captured.err.splitlines() == [
        f"error: synthesis.images={tmp_path / 'images'}: path not found",
        f"error: model.hf_path: {tmp_path / 'qwen'}: incomplete model directory, missing tokenizer (tokenizer.json or "
        "tokenizer_config.json)"]
