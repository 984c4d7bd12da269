"""RL prompt source over shards (nemo_viper.data.prompt_source): DP sharding, per-epoch order, resume, bad data."""

import io
import logging

import pytest

from nemo_viper.data import DatasetError, ShardDataset, ShardWriter, ground_truth
from nemo_viper.data.prompt_source import ShardPromptSource
from nemo_viper.errors import ConfigError
from nemo_viper.training.loop import TaskPrompt


def build_prompt(record, images):
    """A trivial task-prompt builder (the real one lives in nemo_viper.prompts)."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": getattr(record, "initial_caption", "")}]
    return TaskPrompt(record.id, [{"role": "user", "content": content}], images, ground_truth(record))


@pytest.fixture
def dataset(caption_dataset):
    directory, _, _ = caption_dataset(samples_per_shard=3)
    return ShardDataset(directory)


def ids(source, count):
    return [p.sample_id for p in source.next_prompts(count)]


def test_prompts_carry_images_and_ground_truth(dataset):
    [prompt] = ShardPromptSource(dataset, build_prompt, seed=0).next_prompts(1)
    index = [dataset.record(i).id for i in range(len(dataset))].index(prompt.sample_id)
    assert prompt.ground_truth == list(dataset.record(index).refinements)
    assert [image.size for image in prompt.images] == [image.size for image in dataset.images(index)]


def test_two_ranks_see_every_sample_once_per_epoch(dataset):
    all_ids = sorted(dataset.record(i).id for i in range(len(dataset)))
    ranks = [ShardPromptSource(dataset, build_prompt, seed=3, dp_rank=r, dp_world=2) for r in range(2)]
    share = len(dataset) // 2
    for _ in range(3):  # epochs
        seen = [ids(source, share) for source in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == all_ids


def test_uneven_shares_still_cover_the_epoch(photos, make_caption_record, tmp_path):
    writer = ShardWriter(tmp_path / "odd", "odd", 4, task="caption_refine")
    for i, name in enumerate(list(photos)[:5]):
        writer.write(make_caption_record(i, name), [photos[name]])
    writer.finalize()
    dataset = ShardDataset(tmp_path / "odd")
    ranks = [ShardPromptSource(dataset, build_prompt, seed=1, dp_rank=r, dp_world=2) for r in range(2)]
    assert [len(source.rank_share(0)) for source in ranks] == [3, 2]
    assert sorted(ids(ranks[0], 3) + ids(ranks[1], 2)) == [f"cap-{i}" for i in range(5)]


def test_order_depends_on_seed_and_epoch(dataset):
    n = len(dataset)
    first = ids(ShardPromptSource(dataset, build_prompt, seed=7), 3 * n)
    assert ids(ShardPromptSource(dataset, build_prompt, seed=7), 3 * n) == first
    assert ids(ShardPromptSource(dataset, build_prompt, seed=8), 3 * n) != first
    epochs = [first[e * n : (e + 1) * n] for e in range(3)]
    assert all(sorted(epoch) == sorted(epochs[0]) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize("drawn", [0, 3, 4, 9])  # start, mid-epoch, exact epoch end, second epoch
def test_restore_continues_exactly(dataset, drawn):
    source = ShardPromptSource(dataset, build_prompt, seed=5, dp_rank=1, dp_world=2)
    ids(source, drawn)
    state = source.state_dict()
    expected = ids(source, 10)
    restored = ShardPromptSource(dataset, build_prompt, seed=5, dp_rank=1, dp_world=2)
    restored.load_state_dict(state)
    assert ids(restored, 10) == expected


def test_restore_refuses_a_different_layout(dataset):
    state = ShardPromptSource(dataset, build_prompt, seed=5, dp_rank=0, dp_world=2).state_dict()
    with pytest.raises(ConfigError, match="saved dp_world=2, now 1"):
        ShardPromptSource(dataset, build_prompt, seed=5).load_state_dict(state)
    with pytest.raises(ConfigError, match="saved seed=5, now 6"):
        ShardPromptSource(dataset, build_prompt, seed=6, dp_world=2).load_state_dict(state)


def truncated_png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def test_corrupt_image_is_skipped_and_counted_once(tmp_path, photos, make_caption_record, caplog):
    writer = ShardWriter(tmp_path, "mixed", 10, task="caption_refine")
    for i, name in enumerate(list(photos)[:4]):
        writer.write(make_caption_record(i, name), [truncated_png(photos[name]) if i == 2 else photos[name]])
    writer.finalize()
    source = ShardPromptSource(ShardDataset(tmp_path), build_prompt, seed=0)
    with caplog.at_level(logging.WARNING, logger="nemo_viper.data.prompt_source"):
        served = ids(source, 9)  # three epochs of the three good samples
    assert sorted(served) == sorted(["cap-0", "cap-1", "cap-3"] * 3)
    assert source.skipped == {"corrupt_image": 1}
    assert "sample '000000_000002' in shard mixed-000000.tar" in caplog.text


def test_unusable_setups_are_clear_errors(tmp_path, photos, make_caption_record, dataset):
    writer = ShardWriter(tmp_path, "broken", 10, task="caption_refine")
    for i, name in enumerate(list(photos)[:2]):
        writer.write(make_caption_record(i, name), [truncated_png(photos[name])])
    writer.finalize()
    with pytest.raises(DatasetError, match="no image of data-parallel rank 0's share"):
        ShardPromptSource(ShardDataset(tmp_path), build_prompt, seed=0).next_prompts(1)
    with pytest.raises(DatasetError, match="fewer than the 16 data-parallel ranks"):
        ShardPromptSource(dataset, build_prompt, seed=0, dp_rank=0, dp_world=16)
    with pytest.raises(ConfigError, match="dp_rank"):
        ShardPromptSource(dataset, build_prompt, seed=0, dp_rank=2, dp_world=2)
