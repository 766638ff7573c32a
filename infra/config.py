"""One config system: dataclasses with a help text per field, filled from YAML and CLI flags.

Every operator and job has a config dataclass. Each field carries ``metadata={"help": ...}``
and a default chosen for the embedded demo; ``__post_init__`` checks values. A YAML file and
``--section.field value`` flags parse into the same dataclasses (flags override the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and what is allowed."""


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field with a help text (mutable defaults go through default_factory)."""
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds (for use in __post_init__)."""
    if not condition:
        raise ConfigError(message)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise ConfigError."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    if isinstance(value, str) and optional and value.lower() in ("none", "null"):
        return None
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not one of {[m.value for m in tp]}") from None
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str):
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if tp is str and not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported config type {tp}")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _over(default: Any, data: dict[str, Any], where: str) -> dict[str, Any]:
    """``data`` laid over a default section instance: fields not given keep the parent's defaults.

    A parent may default a section to something other than the section class's own defaults
    (``demo`` sizes DPS for a CPU); setting one field of it must not reset the others.
    """
    names = {g.name for g in dataclasses.fields(default)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    out = {}
    for name in names:
        base = getattr(default, name)
        if name not in data:
            out[name] = base
        elif isinstance(data[name], dict) and dataclasses.is_dataclass(base):
            out[name] = _over(base, data[name], f"{where}.{name}")
        else:
            out[name] = data[name]
    return out


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build ``cls`` from a nested dict, rejecting unknown keys with the list of known ones.

    A nested section given in part starts from the parent's default for that section.
    """
    data = dict(data or {})
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or cls.__name__
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            where = f"{prefix + '.' if prefix else ''}{f.name}"
            value, default = data[f.name], _field_default(f)
            if isinstance(value, dict) and dataclasses.is_dataclass(default) and not isinstance(default, type):
                value = _over(default, value, where)
            kwargs[f.name] = _coerce(value, hints[f.name], where)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix + ': ' if prefix else ''}{exc}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """The config as plain data (for manifests and YAML): enums become their values."""
    def plain(pairs):
        return {k: (v.value if isinstance(v, enum.Enum) else
                    [x.value if isinstance(x, enum.Enum) else x for x in v] if isinstance(v, list) else v)
                for k, v in pairs}
    return dataclasses.asdict(obj, dict_factory=plain)


def flatten_fields(cls: type, prefix: str = "", instance: Any = None):
    """(dotted name, field, type, effective default) per leaf field; nested defaults come from the parent's."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[f.name])
        name = f"{prefix}{f.name}"
        default = getattr(instance, f.name) if instance is not None else _field_default(f)
        if _is_dataclass_type(tp):
            yield from flatten_fields(tp, name + ".", default if isinstance(default, tp) else None)
        else:
            yield name, f, hints[f.name], (None if default is dataclasses.MISSING else default)


def add_arguments(parser: argparse.ArgumentParser, cls: type, full: bool = True) -> None:
    """Add a ``--a.b.c`` flag per leaf field of ``cls`` (and nested configs), with its help.

    ``full=False``: the help lists the top-level options and one line per section (``--caa.*``);
    every flag still parses (``--help-all`` shows them all).
    """
    sections: dict[str, list[str]] = {}
    hints = _hints(cls)
    for name, f, tp, default in flatten_fields(cls):
        if isinstance(default, enum.Enum):
            default = default.value
        switch = _strip_optional(tp)[0] is bool
        section = name.split(".", 1)[0] if "." in name else None
        if section is not None:
            sections.setdefault(section, []).append(name)
        text = f.metadata.get("help", "")
        if "default" not in text.lower():  # a help text that already says its default keeps it once
            text = f"{text} (default: {default!r})"
        parser.add_argument(
            f"--{name}", dest=f"cfg::{name}", default=argparse.SUPPRESS,
            metavar="true|false" if switch else _metavar(tp),
            # a boolean is a switch: --flag alone means true (--flag false still turns it off)
            **({"nargs": "?", "const": "true"} if switch else {}),
            # argparse %-formats help texts: escape literal percent signs
            help=text.replace("%", "%%") if full or section is None else argparse.SUPPRESS,
        )
    if sections and not full:
        described = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name in hints}
        lines = [f"  --{sec}.*  {described.get(sec, '')} ({len(names)} option{'s' * (len(names) > 1)})"
                 for sec, names in sections.items()]
        parser.epilog = ("option sections (every option: --help-all):\n" + "\n".join(lines)).replace("%", "%%")
        parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _metavar(tp: Any) -> str:
    tp, _ = _strip_optional(tp)
    if get_origin(tp) is Literal:
        return "{" + ",".join(map(str, get_args(tp))) + "}"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "{" + ",".join(str(m.value) for m in tp) + "}"
    if get_origin(tp) in (list, tuple):
        return "A,B,..."
    return getattr(tp, "__name__", "VALUE").upper()


def load(cls: type[T], path: str | None = None, args: argparse.Namespace | None = None,
         overrides: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from an optional YAML file, then CLI flags, then dotted ``overrides``."""
    data: dict[str, Any] = {}
    if path:
        import yaml

        from steerstore.infra.storage import read_text  # configs may live on object storage

        loaded = yaml.safe_load(read_text(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the config file must be a YAML mapping")
        data = loaded
    dotted = dict(overrides or {})
    if args is not None:
        for key, value in vars(args).items():
            if key.startswith("cfg::"):
                dotted[key[5:]] = value
    for key, value in dotted.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is not a section")
        node[leaf] = value
    return from_dict(cls, data)
