"""bitsandbytes for the tests that run 8-bit AdamW: the ``[adamw8bit]`` extra, beside the environment, not in it.

The environment ``make install`` builds has no bitsandbytes: installed, its import asks the Hub for a CPU kernel on
AVX512-bf16 CPUs (>= 0.49), and diffusers and peft import it whenever it is there (tests/test_quiet_offline.py).
``make test`` installs the extra in ``<venv>/extras/adamw8bit``; the tests that need it put that folder on their own
``sys.path`` (:func:`need_bitsandbytes`) or on a child's PYTHONPATH (:func:`bitsandbytes_path`). Other children, the
README snippet's among them, see the environment as ``make install`` built it.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

EXTRA = Path(sys.prefix) / "extras" / "adamw8bit"


def bitsandbytes_path() -> list[str]:
    """The folder holding the extra, for a child's PYTHONPATH (none when make test has not installed it)."""
    return [str(EXTRA)] if (EXTRA / "bitsandbytes").is_dir() else []


def need_bitsandbytes() -> None:
    """Make ``import bitsandbytes`` work in this process, or skip: installed, or the extra beside the environment."""
    if importlib.util.find_spec("bitsandbytes") is not None:
        return
    if not bitsandbytes_path():
        pytest.skip(f"bitsandbytes is not installed: `make test` installs the [adamw8bit] extra in {EXTRA} "
                    "(or pip install -e '.[adamw8bit]' -c constraints.txt)")
    sys.path.insert(0, str(EXTRA))
    importlib.invalidate_caches()
