"""Fixtures of the synthesis tests: real photos (and broken files), the tiny policy's processor, the fake
VLM and the tiny diffusers pipelines. Torch runs single-threaded here: the 2-core CI machine is shared."""

import io
import sys

import pytest
import torch
from launch import WORKERS
from PIL import Image

sys.path.insert(0, str(WORKERS))

PHOTOS = ("astronaut", "coffee", "camera", "rocket", "hubble_deep_field", "motorcycle_left")
"""Names in the embedded pool (``skimage:<name>``)."""


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_photos(directory, names=PHOTOS, side=64):
    """The photos as small files (JPEG for every other one, PNG otherwise); returns their paths."""
    from nemo_viper.synthesis.inputs import list_inputs

    pool = {item.source.removeprefix("skimage:"): item for item in list_inputs("skimage")}
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        image = Image.open(io.BytesIO(pool[name].read())).convert("RGB")
        image.thumbnail((side, side))
        path = directory / f"{i:02d}_{name}.{'jpg' if i % 2 else 'png'}"
        image.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def write_photos():
    """``(directory, names=PHOTOS, side=64) -> paths``: pool photos as small PNG/JPEG files."""
    return _write_photos


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    _write_photos(root)
    return root


@pytest.fixture(scope="session")
def processor(tiny_hf_dir):
    from nemo_viper.models.processor import load_processor

    return load_processor(tiny_hf_dir)


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """Directory holding both tiny diffusers pipelines (built once per session)."""
    from nemo_viper.synthesis.tiny_diffusion import write_tiny_pipelines

    root = tmp_path_factory.mktemp("tiny_diffusion")
    write_tiny_pipelines(root)
    return root


@pytest.fixture
def fake_components(processor):
    """``(config) -> Components`` with the fake VLM, painter and editor (``editor_mode`` of FakeEditor)."""
    from synth_fakes import FakeEditor, FakePainter, FakeVLMBackend

    from nemo_viper.synthesis.run import Components
    from nemo_viper.synthesis.vlm import VLM

    def make(config, editor_mode="local"):
        vlm = VLM(FakeVLMBackend(processor.tokenizer), processor, config.vlm)
        return Components(vlm, painter=FakePainter(), editor=FakeEditor(editor_mode))

    return make
