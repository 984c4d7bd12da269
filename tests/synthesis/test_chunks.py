"""Chunk planning, atomic chunk commits, cleanup of interrupted attempts, and the merge into one manifest."""

import pytest
from PIL import Image

from nemo_viper.data import CaptionRefineRecord, ShardDataset
from nemo_viper.errors import ConfigError
from nemo_viper.synthesis.chunks import ChunkStats, ChunkStore, assigned_chunks, plan_chunks


def test_chunks_cover_the_input_once_and_split_round_robin():
    chunks = plan_chunks(10, 3)
    assert [(c.start, c.stop) for c in chunks] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    parts = [assigned_chunks(chunks, w, 3) for w in range(3)]
    assert [[c.index for c in p] for p in parts] == [[0, 3], [1], [2]]
    assert plan_chunks(0, 3) == []


def record(i: int) -> CaptionRefineRecord:
    return CaptionRefineRecord(id=f"s1-{i:07d}", images=["img0"], initial_caption="A red cup.",
                               refinements=["The cup is blue."], refined_caption="A blue cup.", source="x",
                               synth_ckpt="ckpt")


def commit(store, chunk, ids):
    writer = store.open(chunk)
    stats = ChunkStats(inputs=len(ids) + 1, written=len(ids))
    stats.filtered["no_refinements"] += 1
    stats.timings["caption"] += 0.5
    for i in ids:
        writer.write(record(i), [Image.new("RGB", (8, 8), (i, 0, 0))])
    store.commit(chunk, writer, stats)


def test_commit_merge_and_cleanup_of_an_interrupted_attempt(tmp_path):
    store = ChunkStore(tmp_path, "caption_refine", "hash-a", samples_per_shard=2)
    chunks = plan_chunks(8, 4)
    commit(store, chunks[0], [0, 1, 2])
    assert store.is_done(chunks[0]) and not store.is_done(chunks[1])
    assert store.merge(chunks, {}) is None  # not every chunk is committed
    assert not (tmp_path / "manifest.json").exists()

    # An attempt at chunk 1 killed after one shard was renamed into place and before its marker was written:
    writer = store.open(chunks[1])
    for i in (4, 5, 6):
        writer.write(record(i), [Image.new("RGB", (8, 8))])
    stale = tmp_path / "caption_refine-c000001-000000.tar"
    (writer.out_dir / stale.name).rename(stale)
    # (or killed while writing its marker, which leaves the marker's temporary file)
    (tmp_path / "chunks" / ".c000001.json.4242.partial").write_text('{"chunk": 1')
    # ... the rerun starts the chunk again: the stale shard, marker and the staging directory are removed.
    commit(store, chunks[1], [4, 6])
    assert not list(tmp_path.glob(".staging/*/*.partial")) and not list(tmp_path.glob("chunks/.*.partial"))

    manifest = store.merge(chunks, {"stage": 1})
    assert manifest["total_samples"] == 5 and manifest["chunks"] == 2 and manifest["stage"] == 1
    assert manifest["inputs"] == 7 and manifest["written"] == 5 and manifest["filtered"] == {"no_refinements": 2}
    assert manifest["timings_s"] == {"caption": 1.0} and manifest["step_samples"] == {}
    assert [s["name"] for s in manifest["shards"]] == [
        "caption_refine-c000000-000000.tar", "caption_refine-c000000-000001.tar", "caption_refine-c000001-000000.tar"]
    dataset = ShardDataset(tmp_path)
    assert [dataset.record(i).id for i in range(len(dataset))] == [f"s1-{i:07d}" for i in (0, 1, 2, 4, 6)]
    assert not (tmp_path / ".staging").exists()


def test_a_directory_of_another_configuration_is_refused(tmp_path):
    store = ChunkStore(tmp_path, "caption_refine", "hash-a", samples_per_shard=2)
    commit(store, plan_chunks(2, 2)[0], [0])
    ChunkStore(tmp_path, "caption_refine", "hash-a", 2).check_config()
    with pytest.raises(ConfigError, match="another synthesis configuration"):
        ChunkStore(tmp_path, "caption_refine", "hash-b", 2).check_config()
