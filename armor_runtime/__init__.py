"""ARMOR runtime: ArmorLinear, model conversion, checkpoints and the ``armor`` command.

Importing this package makes ``transformers.AutoModelForCausalLM.from_pretrained``
understand ARMOR checkpoints (quant_method "armor"). transformers is optional and
slow to import (~4 s), so registration is lazy: done now when transformers'
quantizer registry is already loaded, otherwise right after it gets imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_REGISTRY_MODULE = "transformers.quantizers.auto"


def register_with_transformers() -> bool:
    """Register the "armor" quantizer with transformers now; False when transformers is not installed."""
    if importlib.util.find_spec("transformers") is None:
        return False
    importlib.import_module(_REGISTRY_MODULE)  # first, so the hook below never meets a half-imported hf_quantizer
    from . import hf_quantizer

    hf_quantizer.register()
    return True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loading of transformers' quantizer registry so "armor" is added right after it runs."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from recursing
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            if f"{__name__}.hf_quantizer" not in sys.modules:  # else it is importing now and registers at its end
                register_with_transformers()

        spec.loader.exec_module = exec_module
        return spec


def _install() -> None:
    if _REGISTRY_MODULE in sys.modules:
        register_with_transformers()
    elif importlib.util.find_spec("transformers") is not None and not any(
        isinstance(f, _RegisterAfterImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _RegisterAfterImport())


_install()
