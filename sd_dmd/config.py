"""Nested-dataclass configs: defaults < YAML < dotted CLI overrides.

Every field carries ``metadata={"help": ...}`` (use :func:`field`). Unknown keys and values of the
wrong type raise :class:`ConfigError` naming the dotted key, as nanoGPT/TRL do.

Values given as text (the command line, and scalars of a YAML file) are read by the field's declared
type, never guessed from the text:

* ``str``: verbatim (``--output_dir "runs/exp #2"``, ``--train.mixed_precision no``, ``2024`` stay as written);
* ``int`` / ``float``: Python's ``int`` / ``float`` (``1e-4``, ``inf``; YAML's ``.inf``/``.nan`` too);
* ``bool``: ``true/false/yes/no/1/0`` in any case; on the command line a bare ``--flag`` means true;
* ``Optional[...]``: ``none`` or ``null`` (any case) mean None -- so an ``Optional[str]`` field cannot be set to
  the string "none" or "null" from the command line (in YAML, quote it: ``revision: 'none'``);
* ``Literal[...]``: the verbatim text must be one of the choices;
* ``list[T]``: one or more values, each read as ``T`` (``--data.prompts a.txt b.txt``); in YAML a single
  scalar means a one-element list. The YAML flow form ``--data.prompts "[a, b]"`` is not parsed on the
  command line (it would be ambiguous for strings): that is the one string ``[a, b]``.

On the command line ``--key=value`` passes any value, also one starting with ``--`` (but not ``--`` alone,
argparse's separator: an error); a value starting with a single ``-`` (``-1e-3``, ``-inf``) may follow a
single-valued key directly. YAML files are read the same way (scalars by the field's type; a quoted ``'null'``
is a string, a plain ``null``/``~``/empty value is None); :func:`save_config` quotes what needs it, so a saved
config reloads identically.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml


class ConfigError(ValueError):
    """A config key is unknown or its value has the wrong type; the message names the key."""


def field(default: Any = dataclasses.MISSING, help: str = "", default_factory: Any = dataclasses.MISSING,
          secret: bool = False):
    """A dataclass field with a help text (shown by ``--help``). A ``secret`` field (a token) is read like any other
    but never written out: :func:`to_dict`, :func:`dump_config` and so every saved or logged config hold null."""
    meta = {"help": help, "secret": secret}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


# ----- YAML: 1e-4 is a float (YAML 1.1 wants 1.0e-4), in the loader and in the dumper ----------------------
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X)


def _with_float_resolver(base):
    """``base`` (a PyYAML Loader/Dumper) whose float resolver also matches ``1e-4`` (as the fix in PyYAML #173)."""
    cls = type(f"Config{base.__name__}", (base,), {})
    cls.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
                                   for k, v in base.yaml_implicit_resolvers.items()}
    cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return cls


ConfigLoader = _with_float_resolver(yaml.SafeLoader)
ConfigDumper = _with_float_resolver(yaml.SafeDumper)
# a plain `none` means None in an Optional field (as on the command line), so the dumper quotes the string
ConfigDumper.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^(?i:none)$"), list("nN"))


class _Text(str):
    """A value still in text form (a CLI argument or a YAML scalar), read later by the field's type."""

    quoted = False  # a quoted YAML scalar is a string even when it reads "null"


def _quoted(s: str) -> _Text:
    t = _Text(s)
    t.quoted = True
    return t


def _yaml_tree(text: str, source: str) -> Any:
    """Parse YAML into dicts/lists whose scalars stay :class:`_Text` (``null``/``~``/empty become None)."""
    loader = ConfigLoader(text)
    try:
        return _from_node(loader, loader.get_single_node(), source)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({e})") from None
    finally:
        loader.dispose()


def _from_node(loader, node, source: str, prefix: str = "") -> Any:
    if node is None:
        return None
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # YAML merge keys (<<)
        out: dict = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                raise ConfigError(f"{source}: a key under '{prefix}' is not a name (line {k.start_mark.line + 1})")
            if k.value in out:
                raise ConfigError(f"{source}: duplicate key '{prefix}{k.value}' (line {k.start_mark.line + 1})")
            out[k.value] = _from_node(loader, v, source, f"{prefix}{k.value}.")
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_from_node(loader, v, source, prefix) for v in node.value]
    if node.style is None and node.tag == "tag:yaml.org,2002:null":
        return None
    return _quoted(node.value) if node.style is not None else _Text(node.value)


# ----- reading a value by its declared type ------------------------------------------------------------------
def _read_bool(text: str) -> bool:
    word = text.strip().lower()
    if word not in ("true", "yes", "1", "false", "no", "0"):
        raise ValueError(text)
    return word in ("true", "yes", "1")


def _read_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return int(text.strip(), 0)  # 0x1F, 0o17, 0b1 (YAML 1.1 ints)


def _read_float(text: str) -> float:
    yaml_spelling = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
    word = text.strip().lower()
    return yaml_spelling[word] if word in yaml_spelling else float(text)


_READERS = {str: str, Any: str, bool: _read_bool, int: _read_int, float: _read_float}
_NONE_WORDS = ("none", "null")


def type_name(tp: Any) -> str:
    """How ``--help`` and the errors name a type: ``float``, ``{no,fp16,bf16}``, ``str|none``, ``int...``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return "|".join(names + (["none"] if type(None) in args else []))
    if origin is typing.Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (list, tuple):
        return f"{type_name(args[0]) if args else 'value'}..."
    if tp is bool:
        return "{true,false}"
    return getattr(tp, "__name__", str(tp))


def _bad(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {type_name(tp)}, got {_show(value)}")


def _show(value: Any) -> str:
    return repr(str(value)) if isinstance(value, _Text) else repr(value)


def _from_text(key: str, tp: Any, text: _Text) -> Any:
    """Read ``text`` as ``tp`` (see the module docstring); raise ConfigError naming key, value and type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and not text.quoted and text.strip().lower() in _NONE_WORDS:
            return None
        return _first_fit(key, tp, text)
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise _bad(key, tp, text)
    if origin in (list, tuple):  # one value given for a list key: a one-element list
        return _coerce(key, tp, [text])
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{key}: expected a mapping, got {_show(text)}")
    if tp not in _READERS:
        raise ConfigError(f"{key}: unsupported type {tp}")
    try:
        return _READERS[tp](str(text))
    except ValueError:
        raise _bad(key, tp, text) from None


def _first_fit(key: str, tp: Any, value: Any) -> Any:
    """``value`` read as the first non-None member of the Union ``tp`` that accepts it."""
    for arg in typing.get_args(tp):
        if arg is not type(None):
            try:
                return _coerce(key, arg, value)
            except ConfigError:
                continue
    raise _bad(key, tp, value)


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check/convert ``value`` to ``tp``; raise ConfigError naming ``key`` on mismatch.

    Text (:class:`_Text`, from the CLI or YAML) is read by type; Python values (:func:`from_dict`) are checked.
    """
    if isinstance(value, _Text):
        return _from_text(key, tp, value)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _first_fit(key, tp, value)
    if origin is typing.Literal:
        if value not in args:
            raise _bad(key, tp, value)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _bad(key, tp, value)
        inner = args[0] if args else Any
        try:
            return [_coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
        except ConfigError as e:
            if any(isinstance(v, _Text) and (v.startswith("[") or v.endswith("]")) for v in value):
                raise ConfigError(f"{e} (give list items as separate values: --{key} a b)") from None
            raise
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    if tp in (bool, int, float, str):
        raise _bad(key, tp, value)
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
    """The config as nested dicts, with every secret field (:func:`field`) set to None."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = (None if f.metadata.get("secret") else to_dict(value) if dataclasses.is_dataclass(value)
                       else copy.deepcopy(value))
    return out


def _leaf_fields(obj, prefix=""):
    """Yield (dotted_key, type, help, default) for every leaf field of a nested dataclass instance."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        tp, value = hints[f.name], getattr(obj, f.name)
        if dataclasses.is_dataclass(tp):
            yield from _leaf_fields(value, prefix=f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f.metadata.get("help", ""), value


def _show_default(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_show_default(v) for v in value) if value else "[]"
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{p}' is not a group")
    node[parts[-1]] = value


def _glue_dash_values(argv: list[str], single: set[str]) -> list[str]:
    """``--key -1e-3`` -> ``--key=-1e-3`` for single-valued keys: argparse takes ``-1e-3`` for an option."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in single and i + 1 < len(argv) and argv[i + 1][:1] == "-" and argv[i + 1][:2] != "--":
            out.append(f"{a}={argv[i + 1]}")
            i += 2
        else:
            out.append(a)
            i += 1
    return out


VALUES_HELP = """\
values are read by the key's type: strings verbatim ("a cat #1", no, 2024 stay as written); numbers as Python
reads them (1e-4); booleans true/false/yes/no/1/0, and a bare --flag means true; none or null for an optional
value; lists as separate values (--data.prompts a.txt b.txt). --key=VALUE passes a value starting with '--'."""


def _flag(spec) -> tuple[str, str]:
    return (spec, "") if isinstance(spec, str) else tuple(spec)


def build_parser(cls, description: str = "", extra_flags: Sequence = ()) -> argparse.ArgumentParser:
    """The parser of ``cls``: ``--config``, the extra flags, and one ``--dotted.key`` per leaf field.

    ``extra_flags`` are names (``"resume"``) or ``(name, help)`` pairs of boolean flags.
    """
    flags = "".join(f" [--{_flag(f)[0].replace('_', '-')}]" for f in extra_flags)
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     usage=f"%(prog)s [-h] [--config FILE.yaml]{flags} [--group.key VALUE ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=VALUES_HELP)
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="YAML file with (nested) config values; the command line overrides it")
    for spec in extra_flags:
        name, help_text = _flag(spec)
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, action="store_true", help=help_text or None)
    for key, tp, help_text, default in _leaf_fields(cls()):
        # every leaf is settable by its full dotted name; values are read by type in load_config
        kwargs = {"nargs": "+"} if typing.get_origin(tp) in (list, tuple) else {}
        if tp is bool:  # a bare --flag means true; --flag false still works
            kwargs = {"nargs": "?", "const": "true"}
        text = f"{help_text} (default: {_show_default(default)})".replace("%", "%%")
        parser.add_argument(f"--{key}", dest=f"cfg:{key}", default=argparse.SUPPRESS,
                            metavar=type_name(tp).removesuffix("..."), help=text, **kwargs)
    return parser


def load_config(cls, argv: Sequence[str] | None = None, description: str = "", extra_flags: Sequence = ()):
    """Resolve ``cls`` from defaults < ``--config FILE.yaml`` < ``--group.key value`` overrides.

    ``extra_flags`` are boolean flags (e.g. ``dry_run``, or ``("dry_run", "help text")``) returned in the
    second result. Returns ``(cfg, flags)``.
    """
    parser = build_parser(cls, description, extra_flags)
    leaves = {key: tp for key, tp, _, _ in _leaf_fields(cls())}
    single = {"--config"} | {f"--{k}" for k, tp in leaves.items()
                             if tp is not bool and typing.get_origin(tp) not in (list, tuple)}
    argv = _glue_dash_values(list(sys.argv[1:] if argv is None else argv), single)
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        bad = next((u for u in unknown if u.startswith("--")), unknown[0])
        raise ConfigError(f"unknown config key '{bad.lstrip('-').split('=', 1)[0]}'")
    tree: dict = {}
    if ns.config:
        path = Path(ns.config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        tree = _yaml_tree(path.read_text(encoding="utf-8"), str(path)) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for name, value in vars(ns).items():
        if name.startswith("cfg:"):
            if value == [] or (isinstance(value, list) and typing.get_origin(leaves[name[4:]]) not in (list, tuple)):
                # argparse drops a value that is exactly '--' (its separator), even in --key=--
                raise ConfigError(f"{name[4:]}: no value given ('--' alone cannot be a command-line value; "
                                  "set it in the YAML file)")
            value = [_Text(v) for v in value] if isinstance(value, list) else _Text(value)
            _set_dotted(tree, name[4:], value)
    cfg = _build(cls, tree)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    flags = {_flag(f)[0]: getattr(ns, _flag(f)[0]) for f in extra_flags}
    return cfg, flags


def from_dict(cls, data: dict):
    """Build ``cls`` from a (possibly partial) nested dict, with the same checks as the CLI."""
    cfg = _build(cls, data)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def dump_config(cfg) -> str:
    """The config as YAML that :func:`load_config` reads back to an equal config."""
    return yaml.dump(json.loads(json.dumps(to_dict(cfg))), Dumper=ConfigDumper, sort_keys=False)


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config as YAML (and it round-trips through ``--config``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dump_config(cfg), encoding="utf-8")
    tmp.replace(path)
