"""nemo_viper: the Megatron/NeMo recipe for ViPER (self-evolving visual perception for Qwen2.5-VL)."""

import sys
import tomllib
from importlib.util import spec_from_file_location
from pathlib import Path

from nemo_viper.runtime.lifetime import follow_parent_from_env

__version__ = "0.1.0"


class _CheckoutPackages:
    """Finds the sub-packages that live outside ``nemo_viper/`` in a source checkout (``nemo_viper.recipes`` in
    ``recipes/``, ...) by the build's package-dir mapping in ``pyproject.toml``, in the checkout this package was
    imported from. Installed from the wheel they sit inside the package and this finder is not registered."""

    def __init__(self, checkout: Path):
        mapping = tomllib.loads((checkout / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
        self.directories = {name: checkout / directory for name, directory in mapping.items() if name != __name__}

    def find_spec(self, name, path=None, target=None):
        directory = self.directories.get(name)
        if directory is None:
            return None
        return spec_from_file_location(name, directory / "__init__.py", submodule_search_locations=[str(directory)])


_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "nemo_viper" / "__init__.py").is_file():
    sys.meta_path.insert(0, _CheckoutPackages(_checkout))

# A process started by a job of this project (directly or through torchrun / multiprocessing) dies with
# its parent: see nemo_viper.runtime.lifetime.
follow_parent_from_env()
