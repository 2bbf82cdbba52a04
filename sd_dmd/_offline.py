"""Nothing this package imports may fetch or run code from the Hub.

bitsandbytes (>= 0.50), when its package is imported on a CPU with AVX512-bf16, asks the `kernels` package for a
4-bit CPU GEMM published on the Hugging Face Hub (``get_kernel("kernels-community/quantization-bitsandbytes")`` in
``bitsandbytes/backends/cpu/ops.py``). Online that opens a connection to the Hub and ends in a request to set
``trust_remote_code``; offline it prints two lines. bitsandbytes has no switch for it, and peft imports bitsandbytes
whenever it is installed, so every command would do this. We never run 4-bit layers (bitsandbytes is here for the
optional 8-bit AdamW), and bitsandbytes falls back to its own kernels when `kernels` cannot be imported.

So, while (and only while) bitsandbytes' package executes, ``kernels`` is made unimportable; it is restored at once
for everyone else. The finder adds nothing at import time: it acts when something first imports bitsandbytes.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_ABSENT = object()


class _WithoutHubKernels(importlib.abc.Loader):
    """Wraps bitsandbytes' loader: ``kernels`` is blocked (``sys.modules`` entry None) while the package runs."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        saved = sys.modules.get("kernels", _ABSENT)
        sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError, which bitsandbytes catches
        try:
            self.inner.exec_module(module)
        finally:
            if saved is _ABSENT:
                sys.modules.pop("kernels", None)
            else:
                sys.modules["kernels"] = saved

    def __getattr__(self, name):  # resource readers, get_filename, ...: the real loader's
        return getattr(self.inner, name)


class BitsandbytesFinder(importlib.abc.MetaPathFinder):
    """Finds bitsandbytes where the normal path finder does, with its loader wrapped in :class:`_WithoutHubKernels`."""

    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _WithoutHubKernels(spec.loader)
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once). A no-op for what was imported before it."""
    if not any(isinstance(f, BitsandbytesFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, BitsandbytesFinder())
