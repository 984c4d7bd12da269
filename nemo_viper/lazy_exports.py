"""PEP 562 lazy re-exports: a package names its public objects and the submodule of each, and a submodule
is imported only when one of its names is first read — so importing a package's torch-free settings
module does not load the package's torch code."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_getattr(package: str, sources: Mapping[str, str]) -> Callable[[str], object]:
    """The module ``__getattr__`` of ``package``: ``name`` -> ``package.<sources[name]>.name``."""

    def __getattr__(name: str) -> object:
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{sources[name]}"), name)

    return __getattr__
