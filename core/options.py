"""Typed option definitions: one dataclass field is one command-line flag, one YAML key and one
form input of the app, with its default, help text, range or choices and form group.

`opt(default, help, range=..., choices=..., group=...)` declares a field; `validate(cfg)` refuses
values outside their range or choices with a message that names the option. The rest turns a
config class into argparse options, reads YAML files, coerces form values and writes a config
back as the command line that reproduces it. Steps (train/config.py) and the server
(serving/config.py) declare their options with these; torch-free.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import field
from pathlib import Path

import yaml

from core.errors import UserError


class ConfigError(UserError, ValueError):
    """A user-supplied option is invalid; the message names the option and the fix."""


def opt(default, help: str, *, range=None, choices=None, flags=None, group: str | None = None):
    """A config field with its help text, validation rules and form group in one place."""
    meta = {"help": help}
    if range is not None:
        meta["range"] = range
    if choices is not None:
        meta["choices"] = tuple(choices)
    if flags is not None:
        meta["flags"] = flags  # extra spellings, e.g. {"--bf16": "bf16"} for a choice field
    if group is not None:
        meta["group"] = group
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(cfg) -> None:
    """Every field within its range and choices; list values never look like options."""
    types = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        lo_hi = f.metadata.get("range")
        if lo_hi is not None and not (lo_hi[0] <= value <= lo_hi[1]):
            raise ConfigError(f"{flag_name(f.name)} {value} is out of range: allowed "
                              f"{lo_hi[0]} to {lo_hi[1]}.")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{flag_name(f.name)} {value!r} is not one of {', '.join(choices)}.")
        if types[f.name] == list[str]:
            for item in value:
                if item.startswith("-"):
                    raise ConfigError(f"{flag_name(f.name)} {item!r} looks like an option, not a "
                                      "value: give a path or name (write ./-name for a file whose "
                                      "name starts with a dash).")


# ---- command line and YAML ------------------------------------------------------------------

def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one option per config field; defaults stay in the dataclass (SUPPRESS here)."""
    types = _field_types(cls)
    parser.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file; "
                        "options given on the command line win")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        kind = types[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default})"
        if kind is bool:
            parser.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif kind == list[str]:  # --data a b, or --data=a --data=b (how to_argv writes it)
            parser.add_argument(flag_name(f.name), nargs="+", action="extend",
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag_name(f.name), type=kind, default=argparse.SUPPRESS,
                                metavar=f.name.upper(), help=help_text)
        for spelling, value in f.metadata.get("flags", {}).items():
            parser.add_argument(spelling, dest=f.name, action="store_const", const=value,
                                default=argparse.SUPPRESS, help=f"same as {flag_name(f.name)} {value}")
    for old, (kind, _) in getattr(cls, "RENAMED", {}).items():  # still accepted, not listed
        action = argparse.BooleanOptionalAction if kind is bool else "store"
        parser.add_argument(flag_name(old), action=action, type=None if kind is bool else kind,
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def load_yaml(path: str | Path, cls) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist: pass the path of a YAML file.")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise ConfigError(f"config file {path} is not a regular file: pass the path of a YAML file.")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} "
                          f"at offset {err.start}): pass the path of a YAML file.") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror or err}): pass the "
                          "path of a readable YAML file.") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML ({err.__class__.__name__}): "
                          "fix its syntax.") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value.")
    known = {f.name for f in dataclasses.fields(cls)} | set(getattr(cls, "RENAMED", {}))
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"config file {path} has unknown option(s) {', '.join(unknown)}: "
                          "see --help for the options of this step.")
    return values


def from_namespace(cls, namespace: argparse.Namespace):
    """Build a config from parsed args: dataclass defaults < YAML file < explicit flags."""
    explicit = {k: v for k, v in vars(namespace).items()
                if k not in ("config", "local_rank", "stage")}
    values = load_yaml(namespace.config, cls) if getattr(namespace, "config", None) else {}
    values.update(explicit)
    return build(cls, values)


def build(cls, values: dict):
    """Construct a config from plain values, coercing YAML/form types and naming bad ones."""
    types = _field_types(cls)
    values = dict(values)
    for old, (kind, translate) in getattr(cls, "RENAMED", {}).items():
        if old in values:
            value = _coerce(old, kind, values.pop(old))
            new = translate(value)
            print(f"warning: {flag_name(old)} is deprecated and will be removed: use "
                  + (" ".join(f"{flag_name(k)} {v}" for k, v in new.items()) or "the default"),
                  file=sys.stderr)
            for key, new_value in new.items():
                values.setdefault(key, new_value)
    coerced = {}
    for name, value in values.items():
        kind = types.get(name)
        if kind is None:
            raise ConfigError(f"unknown option {flag_name(name)}.")
        coerced[name] = _coerce(name, kind, value)
    return cls(**coerced)


def _coerce(name, kind, value):
    # a YAML list or mapping is never read as one value (str() of it made a folder "['a']",
    # bool() of [false] said true)
    items = value if kind == list[str] and isinstance(value, (list, tuple)) else [value]
    if any(isinstance(item, (list, tuple, dict, set)) for item in items):
        what = "a list of single values" if kind == list[str] else f"one value ({kind.__name__})"
        raise ConfigError(f"{flag_name(name)} ({name} in a config file) must be {what}, not "
                          f"{value!r}.")
    try:
        if kind == list[str]:
            return [str(v) for v in items]
        if kind is bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag_name(name)} {value!r} is not a valid {kind.__name__}.") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def to_argv(cfg) -> list[str]:
    """The command-line arguments that reproduce `cfg` (options left at default are omitted).
    Every value rides in its flag (`--data=VALUE`), so no value can be read as an option."""
    defaults = type(cfg)()
    argv = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == getattr(defaults, f.name):
            continue
        if isinstance(value, bool):
            argv.append(flag_name(f.name) if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, list):
            argv += [f"{flag_name(f.name)}={item}" for item in value]
        else:
            argv.append(f"{flag_name(f.name)}={value}")
    return argv
