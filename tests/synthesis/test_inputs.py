"""Stage-1 inputs: directories, lists, webdataset shards, the embedded pool, and broken files."""

import io
import json
import tarfile
import warnings

import numpy as np
import pytest

from nemo_viper.synthesis.inputs import (SKIMAGE_PHOTOS, InputError, InputItem, LoadedImage, fingerprint, list_inputs,
                                         load_image)


@pytest.fixture
def mixed_dir(tmp_path, write_photos):
    """Three photos, a truncated JPEG, a zero-byte PNG and a text file, in two directory levels."""
    paths = write_photos(tmp_path / "images", names=("astronaut", "coffee", "rocket"))
    (tmp_path / "images" / "sub").mkdir()
    paths[2].rename(tmp_path / "images" / "sub" / paths[2].name)
    (tmp_path / "images" / "broken.jpg").write_bytes(paths[1].read_bytes()[:300])
    (tmp_path / "images" / "empty.png").write_bytes(b"")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    return tmp_path / "images"


def test_directory_lists_image_files_sorted_and_broken_ones_are_skip_reasons(mixed_dir):
    items = list_inputs(str(mixed_dir))
    assert [i.source for i in items] == ["00_astronaut.png", "01_coffee.jpg", "broken.jpg", "empty.png",
                                         "sub/02_rocket.png"]
    loaded = [load_image(i) for i in items]
    assert [x if isinstance(x, str) else "ok" for x in loaded] == ["ok", "ok", "corrupt_image", "empty_file", "ok"]
    assert loaded[1].encoded == (mixed_dir / "01_coffee.jpg").read_bytes()  # JPEG bytes are kept as they are
    assert loaded[0].image.mode == "RGB"


def test_symlink_loops_and_dangling_links_are_listed_and_counted_not_dropped(mixed_dir):
    (mixed_dir / "loop.png").symlink_to("loop.png")
    (mixed_dir / "dangling.jpg").symlink_to("nowhere.jpg")
    (mixed_dir / "sub" / "up").symlink_to("..")  # a directory loop: not followed
    items = {i.source: i for i in list_inputs(str(mixed_dir))}
    assert set(items) == {"00_astronaut.png", "01_coffee.jpg", "broken.jpg", "empty.png", "sub/02_rocket.png",
                          "loop.png", "dangling.jpg"}
    assert load_image(items["loop.png"]) == "symlink_loop"
    assert load_image(items["dangling.jpg"]) == "missing_file"


def test_text_and_jsonl_lists(mixed_dir, tmp_path):
    (tmp_path / "list.txt").write_text(f"# photos\n{mixed_dir}/00_astronaut.png\n\nimages/01_coffee.jpg\nmissing.png\n")
    items = list_inputs(str(tmp_path / "list.txt"))
    assert [i.source for i in items] == [f"{mixed_dir}/00_astronaut.png", "images/01_coffee.jpg", "missing.png"]
    assert [isinstance(load_image(i), LoadedImage) for i in items[:2]] == [True, True]
    assert load_image(items[2]) == "missing_file"

    lines = ['"images/00_astronaut.png"', '{"image": "images/01_coffee.jpg", "caption": "x"}', "",
             '{"path": "images/sub/02_rocket.png"}']
    (tmp_path / "list.jsonl").write_text("\n".join(lines))
    assert [i.source for i in list_inputs(str(tmp_path / "list.jsonl"))] == [
        "images/00_astronaut.png", "images/01_coffee.jpg", "images/sub/02_rocket.png"]
    (tmp_path / "bad.jsonl").write_text('{"caption": "no path"}\n')
    with pytest.raises(InputError, match="bad.jsonl:1"):
        list_inputs(str(tmp_path / "bad.jsonl"))


def test_webdataset_shards_give_the_first_image_of_each_sample(mixed_dir, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard, names in enumerate([("00_astronaut.png", "01_coffee.jpg"), ("sub/02_rocket.png",)]):
        with tarfile.open(shards / f"data-{shard:03d}.tar", "w") as tar:
            for k, name in enumerate(names):
                photo = (mixed_dir / name).read_bytes()
                for member, data in [(f"s{shard}{k}.json", b"{}"), (f"s{shard}{k}.jpg", photo),
                                     (f"s{shard}{k}.second.png", b"")]:
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    expected = ["data-000.tar#s00.jpg", "data-000.tar#s01.jpg", "data-001.tar#s10.jpg"]
    for spec in (str(shards), str(shards / "data-*.tar")):
        items = list_inputs(spec)
        assert [i.source for i in items] == expected
        assert all(isinstance(load_image(i), LoadedImage) for i in items)
    assert [i.source for i in list_inputs(str(shards / "data-001.tar"))] == expected[2:]


def test_embedded_pool_is_the_scikit_image_photos():
    items = list_inputs("skimage")
    assert len(items) == len(SKIMAGE_PHOTOS) and items[0].source == "skimage:astronaut"
    assert all(isinstance(load_image(i), LoadedImage) for i in items[:3])
    assert fingerprint(items) == fingerprint(list_inputs("skimage")) != fingerprint(items[:-1])


@pytest.mark.parametrize("kind", ["empty_dir", "missing", "unknown_suffix", "empty_list"])
def test_inputs_without_images_are_a_clear_error(tmp_path, kind):
    spec = {"empty_dir": tmp_path, "missing": tmp_path / "nope", "unknown_suffix": tmp_path / "x.csv",
            "empty_list": tmp_path / "list.txt"}[kind]
    if kind == "unknown_suffix":
        spec.write_text("a,b")
    if kind == "empty_list":
        spec.write_text("# nothing\n")
    with pytest.raises(InputError, match=str(spec)):
        list_inputs(str(spec))


def test_jsonl_entries_need_a_path(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"image": 3}) + "\n")
    with pytest.raises(InputError, match="path string"):
        list_inputs(str(tmp_path / "x.jsonl"))


def _item(tmp_path, name, image, **save):
    path = tmp_path / name
    image.save(path, **save)
    return InputItem(name, str(path))


def test_a_12000_by_12000_jpeg_is_decoded_and_stored_at_the_pixel_budget(tmp_path):
    """Above PIL's warning limit (89.5M pixels), below its error limit: decoded at a reduced DCT scale, downscaled
    to the budget and stored as the PNG of what is captioned, never at full size."""
    from PIL import Image

    item = _item(tmp_path, "huge.jpg", Image.new("L", (12000, 12000), 90), quality=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning is handled, not leaked
        loaded = load_image(item, max_pixels=1280 * 28 * 28)
    assert loaded.image.size == (1001, 1001) and loaded.image.mode == "RGB"  # floor(12000 * sqrt(1003520 / 1.44e8))
    assert loaded.encoded is None  # stored as the PNG of the downscaled image
    assert abs(np.asarray(loaded.image).astype(int) - 90).max() <= 1


def test_the_budget_keeps_the_aspect_ratio_and_leaves_images_within_it_as_they_are(tmp_path):
    from PIL import Image

    gradient = Image.fromarray(np.tile(np.arange(300, dtype=np.uint8)[None, :] // 2, (100, 1)), "L").convert("RGB")
    png = _item(tmp_path, "wide.png", gradient)
    loaded = load_image(png, max_pixels=30 * 10 * 4)  # 300x100 at a budget of 1200 pixels: 60x20
    assert loaded.image.size == (60, 20) and loaded.encoded is None
    reference = gradient.resize((60, 20), Image.BICUBIC)
    assert np.array_equal(np.asarray(loaded.image), np.asarray(reference))
    kept = load_image(png, max_pixels=300 * 100)
    assert kept.image.size == (300, 100) and kept.encoded == (tmp_path / "wide.png").read_bytes()
    assert load_image(png).image.size == (300, 100)


def test_an_image_above_twice_pils_pixel_limit_is_skipped_as_too_large(tmp_path, monkeypatch):
    from PIL import Image

    item = _item(tmp_path, "bomb.png", Image.new("L", (200, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 100 // 2 - 1)
    assert load_image(item, max_pixels=1000) == "image_too_large"
