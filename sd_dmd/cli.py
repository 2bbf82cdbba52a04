"""Shared entry-point behaviour: resolve the config, print it, turn known errors into one line + exit 2."""
from __future__ import annotations

import sys

import yaml

from sd_dmd.config import ConfigDumper, ConfigError, load_config, to_dict
from sd_dmd.errors import ModelError, PairsError, PromptError, TrainingError

DRY_RUN = ("dry_run", "print the resolved config, run the start checks (paths, precision, output_dir, resume) and exit without loading models or writing anything")


# what a command turns into one `error: ...` line and exit 2 (LatentsError and SourceError are PairsErrors)
USER_ERRORS = (ConfigError, ModelError, PairsError, PromptError, TrainingError, FileNotFoundError)


def fail(msg: str) -> None:
    for line in str(msg).splitlines() or [""]:  # one "error: ..." line per problem
        print(f"error: {line}", file=sys.stderr)
    raise SystemExit(2)


def run_cli(cls, argv, description: str, extra_flags=()):
    """Parse ``cls`` from argv (defaults < --config YAML < --key value), print it, honour --dry-run.

    ``extra_flags``: boolean flags, as names or ``(name, help)`` pairs; their values come back in ``flags``.
    """
    try:
        cfg, flags = load_config(cls, argv, description=description, extra_flags=(DRY_RUN, *extra_flags))
    except ConfigError as e:
        fail(str(e))
    from sd_dmd.dist import partial_state

    if partial_state().is_main_process:
        print(yaml.dump({"config": to_dict(cfg)}, Dumper=ConfigDumper, sort_keys=False).rstrip())
    return cfg, flags


def guarded(fn, *args, **kwargs):
    """Call ``fn``; user-input errors become ``error: ...`` on stderr and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        fail(str(e))
