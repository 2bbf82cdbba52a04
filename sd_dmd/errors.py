"""The errors that name a user's mistake (a file, row or key) and that several layers raise: one place, at the bottom.

Commands turn them into one ``error: ...`` line and exit 2 (:func:`sd_dmd.cli.guarded`). ``ConfigError`` (a bad config
key or value) lives with the config loader, :mod:`sd_dmd.config`.
"""
from __future__ import annotations


class ModelError(ValueError):
    """The model path or its configuration cannot be used (message names the path/key)."""


class PairsError(ValueError):
    """A pairs store cannot be created, extended or used; the message names the file/field."""


class LatentsError(PairsError):
    """A latents store cannot be created, resumed or used; the message names the file/field."""


class SourceError(PairsError):
    """A source cannot be listed (no such path, no images, a missing column); the message names the file."""


class PromptError(ValueError):
    """Bad prompt input; the message names the file (and row/column where it applies)."""


class TrainingError(RuntimeError):
    """The run cannot continue (message says why and what was kept)."""
