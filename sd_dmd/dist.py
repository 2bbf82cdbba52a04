"""accelerate process state; honours ACCELERATE_USE_CPU (CPU multi-process runs use gloo)."""
from __future__ import annotations

from accelerate.utils import parse_flag_from_env


def partial_state():
    """accelerate's PartialState. PartialState alone ignores ACCELERATE_USE_CPU (only Accelerator reads it),
    so ``accelerate launch --multi_gpu`` on CPU would give N single-process runs."""
    from accelerate import PartialState

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
