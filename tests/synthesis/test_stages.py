"""Stage 1 then stage 2 with the deterministic fake policy: records, images, counts, filters, sharding, reruns.

The fake policy (tests/workers/synth_fakes.py) gives each photo one of four captions by its pixels; with
:data:`conftest.PHOTOS` four captions are usable, one is in Chinese and one gets the critique "None".
"""

import shutil

import pytest
from PIL import Image
from synth_fakes import CAPTIONS

from nemo_viper.data import DatasetError, ShardDataset, ShardWriter, parse_record
from nemo_viper.data.decoding import fit_pixels
from nemo_viper.errors import ConfigError
from nemo_viper.synthesis.config import load_config
from nemo_viper.synthesis.diffusion import DiffusersEditor, DiffusersTextToImage
from nemo_viper.synthesis.inputs import InputError
from nemo_viper.synthesis.run import run_synthesis

FAKE_OPERATIONS = {"Change the color of the cup from blue to green.", "Remove the sign in the background.",
                   "Add a small plant next to the cup."}


def config(stage, out, policy, *overrides, **fields):
    return load_config(None, ["chunk_size=3", "batch_size=2", *overrides], stage=stage, out=str(out),
                       **fields, **{"vlm.policy": str(policy)})


def counts_add_up(manifest):
    return manifest["inputs"] == manifest["written"] + sum(manifest["skipped"].values()) + sum(
        manifest["filtered"].values()) and manifest["written"] == manifest["total_samples"]


@pytest.fixture(scope="module")
def inputs_with_broken_files(photo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    shutil.copytree(photo_dir, root, dirs_exist_ok=True)
    (root / "98_corrupt.jpg").write_bytes((photo_dir / "01_coffee.jpg").read_bytes()[:400])
    (root / "99_empty.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def stage1(tiny_hf_dir, inputs_with_broken_files, tiny_pipelines, processor, tmp_path_factory):
    """Stage 1 with the fake policy and the tiny Stable Diffusion redraw: ``(dir, manifest, config)``."""
    from synth_fakes import FakeVLMBackend

    from nemo_viper.synthesis.run import Components
    from nemo_viper.synthesis.vlm import VLM

    out = tmp_path_factory.mktemp("stage1")
    cfg = config(1, out, tiny_hf_dir, "keep_redraw=true", f"redraw.model={tiny_pipelines}/StableDiffusionPipeline",
                 "vlm.max_pixels=2048", images=str(inputs_with_broken_files))  # below the 64-pixel photos' size
    components = Components(VLM(FakeVLMBackend(processor.tokenizer), processor, cfg.vlm),
                            painter=DiffusersTextToImage(cfg.redraw))
    return out, run_synthesis(cfg, components), cfg


def test_stage1_records_validate_images_decode_and_counts_add_up(stage1, inputs_with_broken_files):
    out, manifest, cfg = stage1
    assert counts_add_up(manifest) and manifest["inputs"] == 8
    assert manifest["skipped"] == {"corrupt_image": 1, "empty_file": 1}
    assert manifest["filtered"] == {"caption_wrong_language": 1, "no_refinements": 1}
    assert set(manifest["timings_s"]) == {"load", "caption", "redraw", "critique", "rewrite", "write"}
    assert manifest["source_checkpoint"] == cfg.vlm.policy and len(manifest["config_hash"]) == 16
    assert manifest["dropped_items"]["refinement_duplicate"] == 4 and manifest["chunks"] == 3

    dataset = ShardDataset(out)
    assert len(dataset) == 4 and not dataset.skipped
    for i in range(len(dataset)):
        record = dataset.record(i)
        parse_record(record.to_dict())
        assert record.initial_caption in CAPTIONS[:2]
        assert record.refinements == ("The cup is blue, not red.", 'The sign reads "CLOSED".')
        assert not record.refined_caption.startswith("Description")
        assert record.recon_image == "recon.png" and record.synth_ckpt == cfg.vlm.policy
        (image,) = dataset.images(i)
        original = Image.open(inputs_with_broken_files / record.source).convert("RGB")
        assert original.width * original.height > 2048 >= image.width * image.height  # stored at the budget
        assert image.tobytes() == fit_pixels(original, 2048).tobytes()
    assert [dataset.record(i).id for i in range(len(dataset))] == ["s1-0000002", "s1-0000003", "s1-0000004",
                                                                   "s1-0000005"]


def test_stage1_records_feed_the_rl_prompts(stage1):
    from nemo_viper.data.task_prompt import task_prompt

    dataset = ShardDataset(stage1[0])
    prompt = task_prompt(dataset.record(0), dataset.images(0))
    assert prompt.ground_truth == list(dataset.record(0).refinements) and len(prompt.images) == 1


def test_stage2_with_the_tiny_instruct_pix2pix(stage1, tiny_hf_dir, tiny_pipelines, fake_components, tmp_path):
    cfg = config(2, tmp_path, tiny_hf_dir, f"edit.model={tiny_pipelines}/StableDiffusionInstructPix2PixPipeline",
                 stage1=str(stage1[0]))
    components = fake_components(cfg)
    components.editor = DiffusersEditor(cfg.edit)
    manifest = run_synthesis(cfg, components)
    assert counts_add_up(manifest) and manifest["written"] == 4  # the tiny preset's band admits random edits
    assert set(manifest["timings_s"]) == {"load", "entities", "operations", "edit", "filter", "write"}
    dataset = ShardDataset(tmp_path)
    for i in range(len(dataset)):
        record = dataset.record(i)
        assert record.id == f"{ShardDataset(stage1[0]).record(i).id}-op"
        assert set(record.operations) <= FAKE_OPERATIONS and 1 <= len(record.operations) <= len(record.hard_entities)
        assert record.edit_pipeline == f"StableDiffusionInstructPix2PixPipeline:{cfg.edit.model}"
        original, edited = dataset.images(i)
        assert original.size == edited.size and original.width % 16 == original.height % 16 == 0
        assert 0.75 * 64 * 64 <= original.width * original.height <= 1.25 * 64 * 64  # edit.pixels of the tiny preset


@pytest.mark.parametrize("mode,band,reason", [("identity", 1.0, "edit_unchanged"),
                                              ("replace", 0.4, "edit_replaced_image"), ("local", 0.4, None)])
def test_stage2_filters_failed_edits(stage1, tiny_hf_dir, fake_components, tmp_path, mode, band, reason):
    cfg = config(2, tmp_path, tiny_hf_dir, f"filters.max_changed_fraction={band}", "edit.pixels=null",
                 stage1=str(stage1[0]))
    manifest = run_synthesis(cfg, fake_components(cfg, editor_mode=mode))
    assert counts_add_up(manifest)
    if reason:
        assert manifest["written"] == 0 and manifest["filtered"] == {reason: 4}
    else:
        assert manifest["written"] == 4 and manifest["filtered"] == {}
        dataset = ShardDataset(tmp_path)
        original, edited = dataset.images(0)
        assert original.size == edited.size and original.tobytes() != edited.tobytes()


def test_stage2_optional_verification_drops_denied_operations(stage1, tiny_hf_dir, fake_components, tmp_path):
    cfg = config(2, tmp_path, tiny_hf_dir, "filters.verify_operations=true", stage1=str(stage1[0]))
    manifest = run_synthesis(cfg, fake_components(cfg))
    assert counts_add_up(manifest) and manifest["dropped_items"]["operation_unverified"] == 4
    dataset = ShardDataset(tmp_path)
    assert all("Remove the sign in the background." not in dataset.record(i).operations for i in range(len(dataset)))


def test_stage2_entity_candidates_from_the_caption(stage1, tiny_hf_dir, fake_components, tmp_path):
    from nemo_viper.synthesis.entities import caption_candidates

    cfg = config(2, tmp_path, tiny_hf_dir, "filters.entity_candidates=caption", stage1=str(stage1[0]))
    components = fake_components(cfg)
    manifest = run_synthesis(cfg, components)
    assert counts_add_up(manifest) and manifest["written"] == 4
    assert components.vlm.backend.calls == 3  # one operation call per batch (2+1, 1), no entity call
    dataset = ShardDataset(tmp_path)
    for i in range(len(dataset)):
        record = dataset.record(i)
        assert set(record.hard_entities) <= set(caption_candidates(record.source_caption))


def test_three_shard_tasks_give_the_same_dataset_as_one(tiny_hf_dir, photo_dir, fake_components, tmp_path):
    cfg = config(1, tmp_path / "one", tiny_hf_dir, images=str(photo_dir))
    one = run_synthesis(cfg, fake_components(cfg))
    manifests = []
    for index in range(3):
        cfg = config(1, tmp_path / "three", tiny_hf_dir, "chunk_size=1", images=str(photo_dir), shard_index=index,
                     num_shards=3)
        manifests.append(run_synthesis(cfg, fake_components(cfg)))
    assert manifests[:2] == [None, None] and manifests[2] is not None
    three = manifests[2]
    assert three["total_samples"] == one["total_samples"] == 4 and three["filtered"] == one["filtered"]

    def samples(directory):
        dataset = ShardDataset(directory)
        return {dataset.record(i).id: (dataset.record(i), dataset.image_bytes(i)) for i in range(len(dataset))}

    assert samples(tmp_path / "one") == samples(tmp_path / "three")


def test_rerun_of_a_finished_job_builds_nothing_and_other_configs_are_refused(stage1, tiny_hf_dir, photo_dir):
    out, manifest, cfg = stage1
    again = run_synthesis(cfg)  # no components given: building the real policy would fail the test
    assert again["shards"] == manifest["shards"]
    other = load_config(None, ["vlm.caption_tokens=7"], stage=1, out=str(out), images=cfg.images,
                        **{"vlm.policy": str(tiny_hf_dir)})
    with pytest.raises(ConfigError, match="another synthesis configuration"):
        run_synthesis(other)


def test_bad_inputs_are_clear_errors(tiny_hf_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="lists no images"):
        run_synthesis(config(1, tmp_path / "a", tiny_hf_dir, images=str(tmp_path / "empty")))
    ShardWriter(tmp_path / "s1", "s1", 1, task="caption_refine").finalize()
    with pytest.raises(DatasetError, match="holds no samples"):
        run_synthesis(config(2, tmp_path / "b", tiny_hf_dir, stage1=str(tmp_path / "s1")))
    writer = ShardWriter(tmp_path / "ops", "ops", 1, task="visual_op")
    writer.finalize()
    with pytest.raises(ConfigError, match="reads caption_refine data"):
        run_synthesis(config(2, tmp_path / "c", tiny_hf_dir, stage1=str(tmp_path / "ops")))


def test_config_hash_ignores_the_work_split_but_not_the_settings(tiny_hf_dir, tmp_path):
    from nemo_viper.synthesis.config import config_hash

    base = config(1, tmp_path, tiny_hf_dir)
    split = config(1, tmp_path / "elsewhere", tiny_hf_dir, "batch_size=5", "vlm.generation.backend=vllm",
                   "vlm.generation.megatron.max_batch_size=3", shard_index=1,
                   num_shards=2)
    changed = config(1, tmp_path, tiny_hf_dir, "seed=1")
    assert config_hash(base, "x") == config_hash(split, "x") != config_hash(changed, "x")
    assert config_hash(base, "x") != config_hash(base, "y")


@pytest.mark.parametrize("override,message", [("bogus=1", "bogus"), ("filters.max_refinements=9", "max_refinements"),
                                              ("vlm.temperature=-1", "temperature"), ("edit.dtype=int8", "dtype"),
                                              ("redraw.pipeline=FluxPipeline", "redraw.model=tiny exists only")])
def test_config_errors_name_the_key(tiny_hf_dir, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        config(1, tmp_path, tiny_hf_dir, override)


def test_an_rl_run_directory_is_recorded_as_its_latest_checkpoint(tiny_hf_dir, tmp_path):
    from nemo_viper.models.checkpoint_dir import METADATA_FILE
    from nemo_viper.synthesis.config import resolved_policy

    step = tmp_path / "run" / "checkpoints" / "step_0000002"
    step.mkdir(parents=True)
    (step / METADATA_FILE).write_text("{}")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_0000002\n")
    assert resolved_policy(config(2, tmp_path / "o", tmp_path / "run", stage1="s")) == str(step.resolve())
    assert resolved_policy(config(2, tmp_path / "o", tiny_hf_dir, stage1="s")) == str(tiny_hf_dir.resolve())
