"""Typed YAML configs for the jobs that are not one Lightning fit (``wsi``, ``mil``, ``seg compare``).

:func:`load_config` turns a YAML file (plus command-line overrides) into a dataclass through jsonargparse, the
parser LightningCLI uses for ``seg fit``: unknown keys, wrong types and missing values are one
:class:`ConfigError` naming the file and the key. Input paths (``path_fields``) are resolved against the
config file's folder, after ``$VAR``/``${VAR}`` expansion (``${PATHOPEFT_SHARED}/weights/...``), so a config
means the same from any working directory; output folders stay relative to where the command runs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pathopeft.errors import UserError

C = TypeVar("C")


class ConfigError(UserError, ValueError):
    """A config file that is missing, not YAML, or does not fit its settings; names the file and the key."""


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a YAML file, or one :class:`ConfigError` saying why not."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{p}: not valid YAML ({where}{e.problem or e.context})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of settings (key: value), got a YAML {type(data).__name__}")
    return data


def resolve_path(value: str | None, base: Path | None) -> str | None:
    """``$VAR``-expanded, ``~``-expanded and, if still relative, joined to ``base`` (the config's folder)."""
    if value is None or value == "":
        return value
    expanded = os.path.expanduser(os.path.expandvars(str(value)))
    if "$" in expanded:
        raise ConfigError(f"path {value!r}: environment variable not set ({expanded!r})")
    if base is None or os.path.isabs(expanded):
        return expanded
    return os.path.normpath(os.path.join(base, expanded))


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: {k!r} is not a section")
    node[keys[-1]] = value


def _unknown_keys(cls: Any, data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Keys of ``data`` that are not fields of dataclass ``cls`` (nested dataclasses checked too): jsonargparse
    does not see an unknown key whose value is an empty mapping."""
    import typing

    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = []
    for key, value in data.items():
        if key not in names:
            out.append(prefix + key)
        elif isinstance(value, dict) and dataclasses.is_dataclass(hints.get(key)):
            out += _unknown_keys(hints[key], value, f"{prefix}{key}.")
    return out


def load_config(
    cls: type[C],
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    path_fields: Iterable[str] = (),
) -> C:
    """Build dataclass ``cls`` from a YAML file and ``overrides`` (dotted keys; ``None`` values are ignored).

    Types are checked by jsonargparse against the dataclass's annotations; the fields named in
    ``path_fields`` (dotted for nested ones) are resolved against the YAML's folder (values given as overrides:
    against the working directory, like any command-line path).
    """
    from jsonargparse import ArgumentParser

    data = read_yaml(path) if path is not None else {}
    base = Path(path).resolve().parent if path is not None else None
    where = str(path) if path is not None else "settings"
    for dotted in path_fields:
        node: Any = data
        *parents, leaf = dotted.split(".")
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str):
            try:
                node[leaf] = resolve_path(node[leaf], base)
            except ConfigError as e:
                raise ConfigError(f"{where}: {dotted}: {e}") from None
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, resolve_path(value, None) if key in set(path_fields) else value)
    if dataclasses.is_dataclass(cls) and (unknown := _unknown_keys(cls, data)):
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {known})")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "cfg", fail_untyped=False)
    try:
        ns = parser.parse_object({"cfg": data})
        built = parser.instantiate_classes(ns)
    except Exception as e:  # noqa: BLE001 - jsonargparse's ArgumentError, or a dataclass __post_init__ check
        text = " ".join(str(e).split()).replace("Group 'cfg' does not accept option", "unknown key")
        text = text.replace('"cfg.', '"').replace("'cfg.", "'").replace("cfg.", "")
        raise ConfigError(f"{where}: {text}") from None
    cfg = built.cfg
    if not dataclasses.is_dataclass(cfg):  # jsonargparse returns a Namespace for some dataclass layouts
        cfg = cls(**vars(cfg))
    return cfg
