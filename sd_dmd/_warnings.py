"""Process-wide filters for log lines our dependencies print on every command and that say nothing to act on.

Warnings we can avoid at their source are fixed there (components load with ``dtype=``; peft's multi-adapter
and lpips' torchvision warnings are dropped around their one call). What is left are two library log records:
each filter drops one exact message from one logger, so every other record of those loggers still shows.
"""
from __future__ import annotations

import logging


class DropMessage(logging.Filter):
    """Drop the records whose message starts with ``prefix`` and contains ``contains``."""

    def __init__(self, prefix: str, contains: str = ""):
        super().__init__()
        self.prefix, self.contains = prefix, contains

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith(self.prefix) and self.contains in msg)


def _drop(logger: str, prefix: str, contains: str = "") -> None:
    log = logging.getLogger(logger)
    if not any(isinstance(f, DropMessage) and (f.prefix, f.contains) == (prefix, contains) for f in log.filters):
        log.addFilter(DropMessage(prefix, contains))


def install() -> None:
    # bitsandbytes tries, at import on AVX512-bf16 CPUs, to fetch a 4-bit CPU GEMM from the `kernels` package
    # (a hub download). sd_dmd/_offline.py blocks `kernels` for that import, and bitsandbytes then logs that it
    # could not load it. We never run 4-bit layers (only the optional 8-bit AdamW, on GPU), so that one message
    # is noise: only the record naming our block ("import of kernels halted; None in sys.modules", Python's
    # ImportError for a None sys.modules entry) is dropped, any other reason still shows.
    _drop("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: ",
          "import of kernels halted; None in sys.modules")
    # diffusers' ModelMixin.to(dtype) warns on every dtype cast, also when the model has no fp32-only modules
    # (its check is `fp32_modules is not None` on a list that defaults to []): the empty-list form is a false
    # alarm. A model that does have fp32-only modules still warns ("...float32: ['norm']...").
    _drop("diffusers.models.modeling_utils", "There are modules in ", "should be kept in float32: [].")
