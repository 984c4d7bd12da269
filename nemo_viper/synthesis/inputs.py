"""Stage-1 inputs: the list of source images, in a deterministic order, and their safe decoding.

:func:`list_inputs` accepts

- ``skimage``: the embedded default pool, the real photos shipped with scikit-image (:data:`SKIMAGE_PHOTOS`);
- a directory: its image files (:data:`IMAGE_SUFFIXES`, any depth, sorted by relative path); a directory
  without image files but with ``.tar`` files is read as webdataset shards;
- a ``.txt`` file: one image path per line (relative to the list's directory; blank lines and ``#``
  comments ignored);
- a ``.jsonl`` file: per line a path string or an object with an ``image``, ``path`` or ``file`` key;
- a webdataset ``.tar`` shard or a glob of them (``shards/*.tar``): per sample (webdataset key) its first
  image member.

Listing reads no image. An input that lists nothing is an :class:`InputError`; a listed image that is
missing, empty or does not decode is skipped and counted later (:func:`load_image`), never a crash.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import importlib.util
import io
import json
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nemo_viper.errors import NemoViperError

if TYPE_CHECKING:  # PIL is imported where images are decoded: listing (the launcher's count) needs no PIL
    from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png", "coins.png",
    "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
    "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
)
"""scikit-image's photographs (its synthetic test patterns and drawings are left out)."""


class InputError(NemoViperError):
    """The input does not exist, has an unknown kind, or lists no image; the message names it."""


@dataclass(frozen=True)
class InputItem:
    """One source image: ``source`` names it in records and logs, relative to the input (a path inside the
    directory or as listed, ``<shard name>#<member>``, ``skimage:<name>``); the bytes are ``path`` (the
    whole file) or ``size`` bytes at ``offset`` inside ``path`` (a tar member)."""

    source: str
    path: str
    offset: int | None = None
    size: int | None = None

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset is None:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


@dataclass(frozen=True)
class LoadedImage:
    """A decoded RGB image (:mod:`nemo_viper.data.decoding`'s rule) and the bytes to store: the original bytes
    of a plain image, or ``None``: store ``image`` as PNG, so training decodes the pixels synthesis saw."""

    image: Image.Image
    encoded: bytes | None


def list_inputs(spec: str) -> list[InputItem]:
    """The items of an input (see the module docstring); raises :class:`InputError` when there are none."""
    if spec == "skimage":
        items = _skimage_pool()
    else:
        path = Path(spec)
        if any(c in spec for c in "*?["):
            items = [item for shard in sorted(glob.glob(spec)) for item in _tar_items(Path(shard))]
        elif path.is_dir():
            items = _directory_items(path)
        elif not path.is_file():
            raise InputError(f"input {spec} does not exist")
        elif path.suffix == ".txt":
            items = _text_list_items(path)
        elif path.suffix == ".jsonl":
            items = _jsonl_items(path)
        elif path.suffix == ".tar":
            items = _tar_items(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            items = [InputItem(str(path), str(path))]
        else:
            raise InputError(f"input {spec}: expected a directory, .txt, .jsonl, .tar, an image or 'skimage'")
    if not items:
        raise InputError(f"input {spec} lists no images")
    return items


def fingerprint(items: list[InputItem]) -> str:
    """A hash of the item list (sources in order): a rerun on another list is refused (config hash)."""
    return hashlib.sha256("\n".join(item.source for item in items).encode()).hexdigest()[:16]


def load_image(item: InputItem, max_pixels: int | None = None) -> LoadedImage | str:
    """The decoded image, at most ``max_pixels`` pixels (:func:`~nemo_viper.data.decoding.fit_pixels`; a
    downscaled image is stored as the PNG of what was captioned), or the skip reason: ``missing_file`` (also
    a dangling symlink), ``symlink_loop``, ``unreadable_file`` (exists but cannot be read: permissions, a
    directory named like an image, an I/O error), ``empty_file``, ``corrupt_image`` (does not decode
    completely, e.g. a truncated JPEG) or ``image_too_large`` (above twice PIL's ``MAX_IMAGE_PIXELS``, PIL's
    decompression-bomb error). Between once and twice that limit PIL only warns: such an image is decoded
    (a JPEG at the smallest DCT scale that still covers the budget) and downscaled, the warning silenced."""
    try:
        data = item.read()
    except FileNotFoundError:
        return "missing_file"
    except OSError as e:
        return "symlink_loop" if e.errno == errno.ELOOP else "unreadable_file"
    if not data:
        return "empty_file"
    from PIL import Image

    from nemo_viper.data.decoding import budget_size, fit_pixels, is_plain, to_rgb8

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
        with opened:
            size = budget_size(opened.width, opened.height, max_pixels)
            plain = is_plain(opened) and size == opened.size
            if not plain:
                opened.draft(opened.mode, size)  # JPEG only: decode at a reduced scale no smaller than ``size``
            opened.load()
            image = fit_pixels(to_rgb8(opened), max_pixels)
    except Image.DecompressionBombError:
        return "image_too_large"
    except (OSError, SyntaxError, ValueError):
        return "corrupt_image"
    return LoadedImage(image, data if plain else None)


def _skimage_pool() -> list[InputItem]:
    """The photos in scikit-image's package directory, found without importing scikit-image."""
    try:
        spec = importlib.util.find_spec("skimage")
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        raise InputError("input skimage: scikit-image is not installed here")
    root = Path(spec.origin).parent / "data"
    return [InputItem(f"skimage:{name.rsplit('.', 1)[0]}", str(root / name)) for name in SKIMAGE_PHOTOS]


def _directory_items(root: Path) -> list[InputItem]:
    """Image files at any depth; symlinks with an image suffix are listed even when they lead nowhere (a loop,
    a dangling link), so that loading skips and counts them (directory symlinks are not followed)."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and (p.is_file() or (p.is_symlink() and not p.is_dir())))
    if files:
        return [InputItem(p.relative_to(root).as_posix(), str(p)) for p in files]
    return [item for shard in sorted(root.glob("*.tar")) for item in _tar_items(shard)]


def _text_list_items(path: Path) -> list[InputItem]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [_listed(path, line) for line in lines if line and not line.startswith("#")]


def _jsonl_items(path: Path) -> list[InputItem]:
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number} is not JSON: {e}") from e
        if isinstance(entry, dict):
            entry = next((entry[k] for k in ("image", "path", "file") if isinstance(entry.get(k), str)), None)
        if not isinstance(entry, str):
            raise InputError(f"{path}:{number}: expected a path string or an object with an image/path/file key")
        items.append(_listed(path, entry))
    return items


def _listed(list_file: Path, entry: str) -> InputItem:
    path = Path(entry) if Path(entry).is_absolute() else list_file.parent / entry
    return InputItem(entry, str(path))


def _tar_items(shard: Path) -> list[InputItem]:
    """The first image member of every sample (webdataset key = member name up to the base name's first dot)."""
    try:
        with tarfile.open(shard, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"webdataset shard {shard} is unreadable: {e}") from e
    items, seen = [], set()
    for member in members:
        directory, _, base = member.name.rpartition("/")
        stem, dot, extension = base.partition(".")
        key = f"{directory}/{stem}" if directory else stem
        if dot and key not in seen and f".{extension.rsplit('.', 1)[-1].lower()}" in IMAGE_SUFFIXES:
            seen.add(key)
            items.append(InputItem(f"{shard.name}#{member.name}", str(shard), member.offset_data, member.size))
    return items
