"""Shards + manifest (nemo_viper.data.shards): write/read round trip, webdataset compatibility, bad data."""

import hashlib
import io
import json
import logging
import tarfile

import numpy as np
import pytest
import webdataset as wds

from nemo_viper.data import (
    SCHEMA_VERSION,
    CorruptImageError,
    DatasetError,
    ShardDataset,
    ShardInfo,
    ShardWriter,
    write_manifest,
)


def test_round_trip(caption_dataset):
    directory, stored, images = caption_dataset()
    dataset = ShardDataset(directory)
    assert len(dataset) == len(stored) == 8 and dataset.task == "caption_refine" and not dataset.skipped
    for i, (record, image) in enumerate(zip(stored, images)):
        assert dataset.record(i) == record
        assert record.images == ("img0.png",) and record.recon_image == "recon.png"
        [decoded] = dataset.images(i)
        assert decoded.mode == "RGB" and decoded.size == image.size
        assert np.array_equal(np.asarray(decoded), np.asarray(image))  # PNG is lossless


def test_two_image_samples_keep_their_order(visual_op_dataset):
    directory, stored, pairs = visual_op_dataset
    dataset = ShardDataset(directory)
    assert [dataset.record(i) for i in range(len(dataset))] == stored
    for i, (original, edited) in enumerate(pairs):
        decoded = dataset.images(i)
        assert [np.asarray(d).tolist() for d in decoded] == [np.asarray(original).tolist(), np.asarray(edited).tolist()]


def test_jpeg_bytes_are_stored_unchanged(tmp_path, photos, make_caption_record):
    buffer = io.BytesIO()
    photos["coffee"].save(buffer, format="JPEG", quality=90)
    writer = ShardWriter(tmp_path, "jpeg", 10, task="caption_refine")
    stored = writer.write(make_caption_record(0, "coffee"), [buffer.getvalue()])
    writer.finalize()
    dataset = ShardDataset(tmp_path)
    assert stored.images == ("img0.jpg",) and stored.recon_image is None
    assert dataset.image_bytes(0) == [buffer.getvalue()]
    assert dataset.images(0)[0].size == photos["coffee"].size


def test_readable_by_webdataset(caption_dataset):
    directory, stored, images = caption_dataset()
    urls = sorted(str(p) for p in directory.glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert [s["json"]["id"] for s in samples] == [r.id for r in stored]
    for sample, image in zip(samples, images):
        assert set(sample) >= {"__key__", "json", "img0.png", "recon.png"}
        assert sample["img0.png"].size == image.size


def test_manifest(caption_dataset):
    directory, stored, _ = caption_dataset(extra={"config_hash": "abc123", "skipped": {"corrupt_image": 2}})
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["task"] == "caption_refine"
    assert [s["name"] for s in manifest["shards"]] == ["stage1-000000.tar", "stage1-000001.tar"]
    assert [s["samples"] for s in manifest["shards"]] == [4, 4] and manifest["total_samples"] == 8
    for shard in manifest["shards"]:
        assert shard["sha256"] == hashlib.sha256((directory / shard["name"]).read_bytes()).hexdigest()
    assert manifest["config_hash"] == "abc123" and manifest["skipped"] == {"corrupt_image": 2}
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "stage1-000000.tar", "stage1-000001.tar"]
    with pytest.raises(ValueError, match="total_samples"):
        write_manifest(directory, "caption_refine", [], {"total_samples": 3})


def test_writer_rejects_bad_input(tmp_path, photos, make_caption_record):
    writer = ShardWriter(tmp_path, "s", 2, task="visual_op")
    with pytest.raises(ValueError, match="task"):
        writer.write(make_caption_record(0, "coffee"), [photos["coffee"]])
    writer = ShardWriter(tmp_path, "s", 2, task="caption_refine")
    with pytest.raises(ValueError, match="needs 1 images"):
        writer.write(make_caption_record(0, "coffee"), [photos["coffee"], photos["rocket"]])
    with pytest.raises(ValueError, match="PNG/JPEG"):
        writer.write(make_caption_record(0, "coffee"), [b"GIF89a..."])


def test_missing_or_invalid_manifest(tmp_path, caption_dataset):
    with pytest.raises(DatasetError, match=f"manifest {tmp_path / 'nowhere' / 'manifest.json'} is missing"):
        ShardDataset(tmp_path / "nowhere")
    directory, _, _ = caption_dataset()
    (directory / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="manifest.json is not valid JSON"):
        ShardDataset(directory)
    write_manifest(directory, "caption_refine", [ShardInfo("../elsewhere.tar", 1, "0" * 64)])
    with pytest.raises(DatasetError, match="invalid shard entry"):
        ShardDataset(directory)


def test_missing_shard(caption_dataset):
    directory, _, _ = caption_dataset()
    (directory / "stage1-000001.tar").unlink()
    with pytest.raises(DatasetError, match="shard stage1-000001.tar listed in .* is missing"):
        ShardDataset(directory)


@pytest.mark.parametrize("verify_checksums, message", [(True, "manifest checksum"), (False, "truncated")])
def test_truncated_shard(caption_dataset, verify_checksums, message):
    directory, _, _ = caption_dataset()
    shard = directory / "stage1-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DatasetError, match=f"stage1-000000.tar.*{message}"):
        ShardDataset(directory, verify_checksums=verify_checksums)


def test_checksum_mismatch(caption_dataset):
    directory, _, _ = caption_dataset()
    shard = directory / "stage1-000001.tar"
    with tarfile.open(shard) as tar:
        offset = tar.getmember("000001_000003.recon.png").offset_data
    data = bytearray(shard.read_bytes())
    data[offset + 100] ^= 0xFF  # inside an image's bytes: the tar structure stays valid
    shard.write_bytes(bytes(data))
    assert len(ShardDataset(directory, verify_checksums=False)) == 8
    with pytest.raises(DatasetError, match="stage1-000001.tar does not match its manifest checksum"):
        ShardDataset(directory)


def rewrite_member(directory, shard_name, member_name, transform):
    """Rebuild one shard with ``transform(bytes)`` applied to one member, and re-checksum the manifest."""
    path = directory / shard_name
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            data = transform(data) if member.name == member_name else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    rechecksum(directory)


def rechecksum(directory):
    manifest = json.loads((directory / "manifest.json").read_text())
    for shard in manifest["shards"]:
        shard["sha256"] = hashlib.sha256((directory / shard["name"]).read_bytes()).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("position", ["right after it", "after another sample"])
def test_a_repeated_sample_key_names_the_shard_the_key_and_both_members(caption_dataset, position):
    """A hostile shard repeating a key (webdataset would make two samples of it, or keep either entry)."""
    directory, _, _ = caption_dataset()
    path = directory / "stage1-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first, data = next((m, d) for m, d in members if m.name == "000000_000000.json")
    copy = tarfile.TarInfo(first.name)
    copy.size = len(data)
    at = members.index((first, data)) + 1 if position == "right after it" else len(members)
    members.insert(at, (copy, data))
    with tarfile.open(path, "w") as tar:
        for member, payload in members:
            tar.addfile(member, io.BytesIO(payload))
    rechecksum(directory)
    with pytest.raises(DatasetError) as raised:
        ShardDataset(directory)
    message = str(raised.value)
    assert str(path) in message and "sample key '000000_000000' occurs twice" in message, message
    assert message.count("'000000_000000.json'") == 2 and "\n" not in message, message


def test_record_missing_field_is_skipped_and_counted(caption_dataset, caplog):
    directory, stored, _ = caption_dataset()

    def drop_refinements(data):
        record = json.loads(data)
        del record["refinements"]
        return json.dumps(record).encode()

    rewrite_member(directory, "stage1-000001.tar", "000001_000002.json", drop_refinements)
    with caplog.at_level(logging.WARNING, logger="nemo_viper.data.shards"):
        dataset = ShardDataset(directory)
    assert dataset.skipped == {"missing_field:refinements": 1}
    assert [dataset.record(i).id for i in range(len(dataset))] == [r.id for r in stored if r.id != "cap-6"]
    assert "'000001_000002' in shard stage1-000001.tar: missing_field:refinements" in caplog.text
    assert "record 'cap-6'" in caplog.text


def test_corrupt_image_header_is_skipped_at_index_time(caption_dataset, caplog):
    directory, stored, _ = caption_dataset()
    rewrite_member(directory, "stage1-000000.tar", "000000_000001.img0.png", lambda data: b"")
    rewrite_member(directory, "stage1-000001.tar", "000001_000000.img0.png", lambda data: b"not an image at all")
    with caplog.at_level(logging.WARNING, logger="nemo_viper.data.shards"):
        dataset = ShardDataset(directory)
    assert dataset.skipped == {"corrupt_image": 2} and len(dataset) == len(stored) - 2
    assert "'000000_000001' in shard stage1-000000.tar: corrupt_image" in caplog.text
    assert "'000001_000000' in shard stage1-000001.tar: corrupt_image" in caplog.text


def test_corrupt_image_body_raises_at_read_time(tmp_path, photos, make_caption_record):
    buffer = io.BytesIO()
    photos["rocket"].save(buffer, format="PNG")
    writer = ShardWriter(tmp_path, "bad", 10, task="caption_refine")
    writer.write(make_caption_record(0, "rocket"), [buffer.getvalue()[: len(buffer.getvalue()) // 2]])
    writer.finalize()
    dataset = ShardDataset(tmp_path)
    assert len(dataset) == 1 and not dataset.skipped  # a valid header passes the index-time check
    with pytest.raises(CorruptImageError, match="'img0.png' of sample '000000_000000' in shard bad-000000.tar"):
        dataset.images(0)
