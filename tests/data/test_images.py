"""Qwen2.5-VL image preprocessing (nemo_viper.data.images): parity of the DALI pipeline with the HF processor,
patch layout, prompts with several images, corrupt images, configuration and backend selection."""

import io
import logging

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.image_utils import PILImageResampling

from nemo_viper.data import ShardDataset
from nemo_viper.data import images as images_module
from nemo_viper.data.images import (
    ImageDecodeError,
    ImageProcessingConfig,
    PromptImages,
    QwenImagePreprocessor,
    Resize,
    patchify,
)
from nemo_viper.errors import ConfigError

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280
CONFIG = ImageProcessingConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
# Tolerances in grey levels (one level is 1 / 255 / std after normalisation, 0.0142-0.0150), measured for
# DALI 2.4 (CPU) against Qwen2VLImageProcessorPil on Pillow 13 over scikit-image photos, JPEG and PNG, with
# pixel budgets from 28*28*64 to 28*28*16384 (up to 11x downscales): inside the image at most 2 levels
# (rounding in each of the two resize passes); in the outermost 2 rows/columns at most 7 levels, where the
# kernel overhangs the edge (PIL renormalises it, DALI repeats the edge pixel), growing with the downscale
# factor; mean abs diff at most 3.0e-4 normalised. A single 2-D DALI resize would be off by up to 16 levels.
INTERIOR_LEVELS = 2
BORDER_LEVELS = 8
MEAN_ABS_DIFF = 5e-4


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo_arrays() -> dict[str, np.ndarray]:
    """Real photos of several sizes and aspect ratios, one greyscale, one tiny and one very large (uint8)."""
    arrays = {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "camera")}
    arrays["tiny"] = np.ascontiguousarray(arrays["astronaut"][200:220, 180:210])  # 20x30: up to min_pixels
    arrays["large"] = np.tile(arrays["coffee"], (5, 5, 1))[:2000, :3000]  # 3000x2000: down to max_pixels
    return arrays


@pytest.fixture(scope="module")
def hf_processor():
    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def dali():
    return QwenImagePreprocessor(CONFIG, backend="dali", device="cpu")


def reference(hf_processor, encoded: list[bytes]) -> dict:
    return hf_processor([Image.open(io.BytesIO(data)) for data in encoded], return_tensors="pt")


def grey_level_diffs(diff: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
    """Per image ``[3, H, W]``: ``diff`` (patch rows, HF layout) back in pixel positions, in grey levels."""
    p, m, t = CONFIG.patch_size, CONFIG.merge_size, CONFIG.temporal_patch_size
    maps = []
    for patches, (_, gh, gw) in zip(diff.split(grid.prod(-1).tolist()), grid.tolist()):
        x = patches.view(gh // m, gw // m, m, m, 3, t, p, p)[:, :, :, :, :, 0]
        x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)
        maps.append(x.abs() * torch.tensor(CONFIG.image_std).view(3, 1, 1) * 255)
    return maps


def assert_close_to(out: PromptImages, ref: dict, what: str) -> None:
    assert torch.equal(out.image_grid_thw, ref["image_grid_thw"]), what
    assert out.pixel_values.dtype == torch.float32 and out.pixel_values.shape == ref["pixel_values"].shape, what
    diff = out.pixel_values - ref["pixel_values"]
    assert diff.abs().mean() <= MEAN_ABS_DIFF, f"{what}: mean abs diff {diff.abs().mean()}"
    for levels in grey_level_diffs(diff, out.image_grid_thw):
        interior, border = levels[:, 2:-2, 2:-2].max(), levels.max()
        assert interior <= INTERIOR_LEVELS + 1e-3 and border <= BORDER_LEVELS + 1e-3, f"{what}: {interior}, {border}"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_dali_matches_the_hf_processor(dali, hf_processor, photo_arrays, fmt):
    encoded = {name: encode(pixels, fmt) for name, pixels in photo_arrays.items()}
    outputs = dali([[data] for data in encoded.values()])
    for (name, data), out in zip(encoded.items(), outputs):
        assert_close_to(out, reference(hf_processor, [data]), f"{name} ({fmt})")
    grids = {name: out.image_grid_thw[0].tolist() for name, out in zip(encoded, outputs)}
    assert grids["tiny"] == [1, 4, 6]  # 20x30 -> 56x84: at least min_pixels
    assert grids["large"][1] * grids["large"][2] * 14 * 14 <= MAX_PIXELS < 3000 * 2000
    assert grids["astronaut"] == [1, 36, 36]


def test_prompts_with_several_images_match_the_hf_processor(dali, hf_processor, photo_arrays):
    """One result per prompt: its images' patches concatenated in order, one grid row per image."""
    prompts = [
        [encode(photo_arrays["chelsea"], "JPEG")],
        [encode(photo_arrays["coffee"], "PNG"), encode(photo_arrays["coffee"][:, ::-1].copy(), "PNG")],
        [encode(photo_arrays["tiny"], "PNG"), encode(photo_arrays["camera"], "JPEG")],
    ]
    outputs = dali(prompts)
    assert len(outputs) == len(prompts)
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        assert out.image_grid_thw.shape == (len(prompt), 3)
        assert_close_to(out, reference(hf_processor, prompt), f"prompt {i}")


def test_shard_samples_are_preprocessed_once_per_prompt(visual_op_dataset, dali, hf_processor):
    """``ShardDataset.image_bytes`` of two-image samples in, one result per sample, as the HF processor."""
    dataset = ShardDataset(visual_op_dataset[0])
    outputs = dali([dataset.image_bytes(i) for i in range(len(dataset))])
    assert len(outputs) == len(dataset)
    for i, out in enumerate(outputs):
        assert_close_to(out, hf_processor(dataset.images(i), return_tensors="pt"), f"sample {i}")


def test_pil_backend_is_the_hf_processor(hf_processor, photo_arrays):
    pil = QwenImagePreprocessor(CONFIG, backend="pil")
    prompts = [
        [encode(photo_arrays["rocket"], "JPEG")],
        [encode(photo_arrays["tiny"], "PNG"), encode(photo_arrays["camera"], "PNG")],
    ]
    for prompt, out in zip(prompts, pil(prompts)):
        ref = reference(hf_processor, prompt)
        assert torch.equal(out.pixel_values, ref["pixel_values"])
        assert torch.equal(out.image_grid_thw, ref["image_grid_thw"])


def test_patchify_is_the_hf_patch_layout(hf_processor):
    """Images already at a valid size are not resized, so HF's output is its patch layout of the pixels."""
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2, 84, 112, 3), dtype=np.uint8)
    mean, std = torch.tensor(CONFIG.image_mean), torch.tensor(CONFIG.image_std)
    normalised = (torch.from_numpy(batch).double() / 255 - mean) / std
    patches = patchify(normalised.float(), CONFIG)
    assert patches.shape == (2, 6 * 8, 3 * 2 * 14 * 14)
    for image, image_patches in zip(batch, patches):
        ref = hf_processor(Image.fromarray(image), return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(image_patches, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "size", [(427, 640, 420, 644), (300, 451, 308, 448), (400, 600, 392, 588), (512, 512, 200, 480)]
)
def test_resize_pass_order_is_pillows(photo_arrays, size):
    """PIL's resize equals its two one-axis passes in the order ``Resize.first_pass`` says (a Pillow canary)."""
    height, width, new_height, new_width = size
    image = Image.fromarray(np.ascontiguousarray(np.tile(photo_arrays["rocket"], (2, 2, 1))[:height, :width]))
    first = image.resize(Resize(*size).first_pass()[::-1], Image.BICUBIC)
    two_passes = first.resize((new_width, new_height), Image.BICUBIC)
    assert np.array_equal(np.asarray(two_passes), np.asarray(image.resize((new_width, new_height), Image.BICUBIC)))


@pytest.mark.parametrize("backend", ["dali", "pil"])
def test_corrupt_images_fail_only_their_prompt(photo_arrays, backend):
    preprocessor = QwenImagePreprocessor(CONFIG, backend=backend, device="cpu")
    good = encode(photo_arrays["chelsea"], "JPEG")
    jpeg, png = encode(photo_arrays["coffee"], "JPEG"), encode(photo_arrays["coffee"], "PNG")
    prompts = [
        [good],
        [b"not an image at all"],
        [good, jpeg[: len(jpeg) // 2]],  # valid header, truncated body
        [png[: len(png) // 2]],
        [b""],
        [encode(np.zeros((2, 500), dtype=np.uint8), "PNG")],  # aspect ratio 250: Qwen's rule refuses it
        [good],
    ]
    results = preprocessor(prompts, return_errors=True)
    expected_failures = {1: 0, 2: 1, 3: 0, 4: 0, 5: 0}
    for i, result in enumerate(results):
        if i in expected_failures:
            assert isinstance(result, ImageDecodeError), i
            assert (result.prompt, result.image) == (i, expected_failures[i])
        else:
            assert torch.equal(result.pixel_values, preprocessor([[good]])[0].pixel_values)
    assert "aspect ratio" in str(results[5])
    with pytest.raises(ImageDecodeError, match="image 0 of prompt 1"):
        preprocessor(prompts)


def test_from_pretrained_reads_the_checkpoints_image_processor(tiny_hf_dir, photo_arrays):
    from nemo_viper.models.processor import load_processor

    preprocessor = QwenImagePreprocessor.from_pretrained(tiny_hf_dir, backend="dali", device="cpu")
    assert preprocessor.config == ImageProcessingConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    data = encode(photo_arrays["coffee"], "PNG")
    ref = load_processor(tiny_hf_dir).image_processor(Image.open(io.BytesIO(data)), return_tensors="pt")
    assert_close_to(preprocessor([[data]])[0], ref, "coffee with the tiny checkpoint's pixel budget")


def test_unsupported_processor_settings_are_refused():
    with pytest.raises(ConfigError, match="do_normalize"):
        ImageProcessingConfig.from_hf(Qwen2VLImageProcessorPil(do_normalize=False))
    with pytest.raises(ConfigError, match="resample"):
        ImageProcessingConfig.from_hf(Qwen2VLImageProcessorPil(resample=PILImageResampling.BILINEAR))
    with pytest.raises(ConfigError, match="min_pixels"):
        ImageProcessingConfig(min_pixels=4096, max_pixels=1024)
    with pytest.raises(ConfigError, match="backend"):
        QwenImagePreprocessor(CONFIG, backend="opencv")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            QwenImagePreprocessor(CONFIG, backend="dali", device="cuda")
    with pytest.raises(TypeError, match="sequence of encoded images"):
        QwenImagePreprocessor(CONFIG, backend="pil")([b"\x89PNG"])


def test_without_dali_auto_falls_back_to_pil_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(images_module, "dali_importable", lambda: False)
    with caplog.at_level(logging.WARNING, logger=images_module.__name__):
        assert QwenImagePreprocessor(CONFIG).backend == "pil"
    assert "DALI is not importable" in caplog.text
    with pytest.raises(ConfigError, match="not importable"):
        QwenImagePreprocessor(CONFIG, backend="dali")


@pytest.mark.gpu  # DALI's mixed (nvJPEG) decoder
def test_gpu_pipeline_matches_the_hf_processor(hf_processor, photo_arrays):
    """Not yet run: no GPU was available when it was written; nvJPEG may need a looser bound for JPEG."""
    gpu = QwenImagePreprocessor(CONFIG, backend="dali", device="cuda")
    encoded = [encode(pixels, "PNG") for pixels in photo_arrays.values()]
    for data, out in zip(encoded, gpu([[data] for data in encoded])):
        assert out.pixel_values.is_cuda
        on_cpu = PromptImages(out.pixel_values.cpu(), out.image_grid_thw.cpu())
        assert_close_to(on_cpu, reference(hf_processor, [data]), "GPU pipeline")


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG (greyscale ``[H, W]`` or RGB ``[H, W, 3]`` uint16), written by hand: PIL cannot write 16-bit RGB."""
    import struct
    import zlib

    height, width = pixels.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels.reshape(height, -1))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2 if pixels.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def odd_images() -> dict[str, tuple[bytes, np.ndarray]]:
    """Encoded images that decoders disagree on, with the RGB pixels the decoding rule gives, computed
    independently of nemo_viper.data.decoding."""
    rng = np.random.default_rng(0)
    photo = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((96, 72)))
    grey = np.asarray(Image.fromarray(skimage.data.camera()).resize((96, 72)))
    cases = {}
    # 16 bits: high byte v, any low byte -> v (PIL's convert("RGB") made the greyscale one almost white)
    cases["grey16"] = (png16(grey.astype(np.uint16) * 256 + rng.integers(0, 256, grey.shape, dtype=np.uint16)),
                       np.repeat(grey[..., None], 3, -1))
    cases["rgb16"] = (png16(photo.astype(np.uint16) * 256 + rng.integers(0, 256, photo.shape, dtype=np.uint16)),
                      photo)
    buffer = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(buffer, format="JPEG", quality=95)
    cases["cmyk"] = (buffer.getvalue(), np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    palette_image = Image.fromarray(photo).quantize(32)
    buffer = io.BytesIO()
    palette_image.save(buffer, format="PNG", transparency=0)  # entry 0 transparent: alpha is dropped
    palette = np.asarray(palette_image.getpalette()[: 32 * 3], dtype=np.uint8).reshape(-1, 3)
    cases["palette"] = (buffer.getvalue(), palette[np.asarray(palette_image)])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    stored = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    cases["exif_rotated"] = (buffer.getvalue(), np.ascontiguousarray(np.rot90(stored, k=-1)))
    cases["plain"] = (encode(photo, "PNG"), photo)
    return cases


@pytest.mark.parametrize("name", ["grey16", "rgb16", "cmyk", "palette", "exif_rotated", "plain"])
def test_one_decoding_rule_on_every_path(name, dali, hf_processor, tmp_path):
    """Synthesis (decoded and stored image), the shard reader, the PIL and the DALI backends all see the rule's
    pixels; the stored bytes decode to them in any decoder."""
    from nemo_viper.synthesis.inputs import InputItem, load_image

    data, expected = odd_images()[name]
    path = tmp_path / f"{name}.img"
    path.write_bytes(data)
    loaded = load_image(InputItem(name, str(path)))
    assert np.array_equal(np.asarray(loaded.image), expected), "synthesis decodes other pixels"
    if loaded.encoded is None:  # stored as PNG of the decoded image (ShardWriter)
        buffer = io.BytesIO()
        loaded.image.save(buffer, format="PNG")
        stored = buffer.getvalue()
    else:
        assert name == "plain" and loaded.encoded == data
        stored = data
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored)).convert("RGB")), expected), "stored pixels"

    reference = hf_processor([Image.fromarray(expected)], return_tensors="pt")
    pil = QwenImagePreprocessor(CONFIG, backend="pil")
    for what, encoded in (("original", data), ("stored", stored)):
        (from_pil,) = pil([[encoded]])
        assert torch.equal(from_pil.pixel_values, reference["pixel_values"]), f"PIL backend, {what} bytes"
        (from_dali,) = dali([[encoded]])
        assert_close_to(from_dali, reference, f"DALI backend, {what} bytes")
