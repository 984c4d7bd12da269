"""Let ``import megatron.bridge`` succeed where Transformer Engine's PyTorch extension is missing.

Megatron-Bridge 0.6 guards every Transformer Engine import except one:
``megatron/bridge/peft/lora_layers.py`` runs ``import transformer_engine.pytorch as te`` on the
``AutoBridge`` import path. Without TE (any CPU machine; a GPU machine without a TE build) that
import fails, and with it all of Megatron-Bridge.

:func:`install` adds an import hook that, for that one module only, compiles its source with the
bare import replaced by a guarded one: the real TE module when it imports, otherwise a placeholder
whose classes fail loudly when used (TE-fused LoRA is a GPU feature). The file on disk is never
modified, and no fake ``transformer_engine`` enters ``sys.modules`` (megatron-core would then
believe TE is present and pick TE layer specs).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys

GUARDED_MODULE = "megatron.bridge.peft.lora_layers"
_BARE_IMPORT = "import transformer_engine.pytorch as te\n"
_GUARDED_IMPORT = (
    "try:\n"
    "    import transformer_engine.pytorch as te\n"
    "except (ImportError, RuntimeError, OSError):\n"
    "    from nemo_viper.runtime.te_import_guard import MissingTransformerEngine\n"
    "    te = MissingTransformerEngine('transformer_engine.pytorch')\n"
)


class MissingTransformerEngine:
    """Stands in for ``transformer_engine.pytorch`` when it cannot be imported.

    Attribute access yields nested placeholders (``te.ops.Sequential``) so that annotations and
    ``isinstance`` checks work (they are simply never true); instantiating or calling one raises.
    """

    def __init__(self, path: str):
        self._path = path

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        path = f"{self._path}.{name}"
        if name[:1].isupper():
            return type(name, (), {"__init__": _raise_missing(path), "__module__": self._path})
        return MissingTransformerEngine(path)

    def __call__(self, *args, **kwargs):
        _raise_missing(self._path)()


def _raise_missing(path: str):
    def fail(*args, **kwargs):
        raise ImportError(f"{path} needs Transformer Engine, which is not installed (GPU-only feature)")

    return fail


class _GuardedSourceLoader(importlib.machinery.SourceFileLoader):
    def get_data(self, path):
        data = super().get_data(path)
        if path.endswith(".py"):
            data = data.decode("utf-8").replace(_BARE_IMPORT, _GUARDED_IMPORT, 1).encode("utf-8")
        return data

    def get_code(self, fullname):
        # Compile from the rewritten source; never read or write the bytecode cache for it.
        source = self.get_data(self.get_filename(fullname))
        return compile(source, self.get_filename(fullname), "exec", dont_inherit=True)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != GUARDED_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec
        loader = _GuardedSourceLoader(fullname, spec.origin)
        return importlib.util.spec_from_file_location(fullname, spec.origin, loader=loader)


def install() -> None:
    """Register the hook (idempotent). Must run before ``megatron.bridge`` is imported."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
