"""Nested-dataclass configs: defaults < YAML < dotted CLI overrides.

Every field carries ``metadata={"help": ...}`` (use :func:`field`). Unknown keys and values of the
wrong type raise :class:`ConfigError` naming the dotted key, as nanoGPT/TRL do.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml


class ConfigError(ValueError):
    """A config key is unknown or its value has the wrong type; the message names the key."""


def field(default: Any = dataclasses.MISSING, help: str = "", default_factory: Any = dataclasses.MISSING):
    """A dataclass field with a help text (shown by ``--help``)."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check/convert ``value`` to ``tp``; raise ConfigError naming ``key`` on mismatch."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, arg, value)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls, data: dict, prefix: str = "", base=None):
    """Instantiate ``cls`` from ``data`` on top of ``base`` (or the defaults)."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}' (known: {', '.join(sorted(names))})")
    obj = base if base is not None else cls()
    for k, v in data.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = _build(tp, v, prefix=f"{prefix}{k}.", base=getattr(obj, k))
        else:
            v = _coerce(f"{prefix}{k}", tp, v)
        setattr(obj, k, v)
    return obj


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _leaf_fields(cls, prefix=""):
    """Yield (dotted_key, type, help) for every leaf field of a nested dataclass."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_fields(tp, prefix=f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f.metadata.get("help", "")


def _parse_cli_value(raw: str) -> Any:
    """CLI values are parsed as YAML scalars/flow lists (``3`` -> int, ``[a, b]`` -> list)."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{p}' is not a group")
    node[parts[-1]] = value


def load_config(cls, argv: Sequence[str] | None = None, description: str = "", extra_flags: Sequence[str] = ()):
    """Resolve ``cls`` from defaults < ``--config FILE.yaml`` < ``--group.key value`` overrides.

    ``extra_flags`` are boolean flags (e.g. ``dry_run``) returned in the second result.
    Returns ``(cfg, flags)``.
    """
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML file with (nested) config values")
    for flag in extra_flags:
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, action="store_true")
    leaves = {}
    for key, tp, help_text in _leaf_fields(cls):
        leaves[key] = tp
        # every leaf is settable by its full dotted name and, when unique, by its short name
        is_list = typing.get_origin(tp) in (list, tuple)
        parser.add_argument(f"--{key}", dest=f"cfg:{key}", default=argparse.SUPPRESS, metavar="V",
                            nargs="+" if is_list else None, help=f"{help_text} [{getattr(tp, '__name__', tp)}]")
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        bad = next((u for u in unknown if u.startswith("--")), unknown[0])
        raise ConfigError(f"unknown config key '{bad.lstrip('-')}'")
    tree: dict = {}
    if ns.config:
        path = Path(ns.config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for name, value in vars(ns).items():
        if name.startswith("cfg:"):
            if isinstance(value, list):  # nargs="+": each item is a value, or one YAML flow list
                value = _parse_cli_value(value[0]) if len(value) == 1 and value[0].startswith("[") else [
                    _parse_cli_value(v) for v in value]
            else:
                value = _parse_cli_value(value)
            _set_dotted(tree, name[4:], value)
    cfg = _build(cls, tree)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    flags = {f: getattr(ns, f) for f in extra_flags}
    return cfg, flags


def from_dict(cls, data: dict):
    """Build ``cls`` from a (possibly partial) nested dict, with the same checks as the CLI."""
    cfg = _build(cls, data)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config as YAML (and it round-trips through :func:`from_dict`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False))
    tmp.replace(path)
