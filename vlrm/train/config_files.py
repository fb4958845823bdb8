"""Reading a config: a YAML or JSON file of keys, then ``--key value`` overrides from the command line, both checked.

    config = load_config(TrainConfig, "training_configs/tiny_demo.yaml", ["--learning_rate", "5e-4"])

An unknown key, in the file or on the command line, is an error that names the key and suggests the closest valid
one. Every file value is checked against its key's declared type (argparse checks the command line's and names the
flag): bool is not a number, a fraction is not an int, a list is not a scalar, and YAML's own surprises (unquoted
``no`` read as false, ``1e-5`` read as a string) get a hint. Works for any config dataclass
(``vlrm.train.config``'s ``TrainConfig`` and ``EvalConfig``).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml
from transformers import HfArgumentParser

from vlrm.errors import ConfigError

ConfigT = TypeVar("ConfigT")


def _read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(values).__name__}")
    return values


def _unknown_key_error(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return ConfigError(f"unknown config key `{key}` in {where}.{hint}")


_NOT_ALLOWED = object()


def _conform(value: Any, hint: Any) -> Any:
    """``value`` as the declared type ``hint`` accepts it (an integral float becomes an int, a single value of a list
    field a one-item list, a mapping for a list of strings ``name=value`` entries), or ``_NOT_ALLOWED``. bool is not a
    number, a fraction is not an int, a list is not a scalar. Types this does not know (a class of transformers', say)
    are left to the dataclass."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in sorted(args, key=lambda option: get_origin(option) is list):  # scalars first
            conformed = _conform(value, option)
            if conformed is not _NOT_ALLOWED:
                return conformed
        return _NOT_ALLOWED
    if hint is type(None):
        return value if value is None else _NOT_ALLOWED
    if origin is Literal:
        return value if value in args else _NOT_ALLOWED
    if hint is bool:
        return value if isinstance(value, bool) else _NOT_ALLOWED
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value if isinstance(value, int) and not isinstance(value, bool) else _NOT_ALLOWED
    if hint is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _NOT_ALLOWED
    if hint is str:
        return value if isinstance(value, str) else _NOT_ALLOWED
    if origin is list:
        if value is None:  # an empty list; a required list says so in the config's own check
            return []
        if isinstance(value, dict) and args and args[0] is str:  # a YAML mapping name: path -> ["name=path", ...]
            value = [f"{name}={path}" for name, path in value.items()]
        items = value if isinstance(value, list) else [value]
        conformed = [_conform(item, args[0]) if args else item for item in items]
        return _NOT_ALLOWED if any(item is _NOT_ALLOWED for item in conformed) else conformed
    if hint is dict or origin is dict:
        return value if isinstance(value, dict) else _NOT_ALLOWED
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value if isinstance(value, (str, hint)) else _NOT_ALLOWED
    return value


def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(option) for option in args))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is list:
        return f"{_describe(args[0]) if args else 'a value'} or a list of them"
    if hint is dict or origin is dict:
        return "a mapping"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    return (
        "a string" if isinstance(hint, type) and issubclass(hint, enum.Enum) else getattr(hint, "__name__", str(hint))
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_file_values(config_class: type, values: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Every file value against its key's declared type: argparse checks command-line values (and names the flag),
    but the file's values reach the dataclass as defaults, unchecked."""
    hints = get_type_hints(config_class)
    checked = {}
    for key, value in values.items():
        conformed = _conform(value, hints[key])
        if conformed is _NOT_ALLOWED:
            hint = ""
            if isinstance(value, bool) and _conform("no", hints[key]) is not _NOT_ALLOWED:
                hint = " (YAML reads unquoted yes/no/on/off as true/false: quote the word, e.g. 'no')"
            elif isinstance(value, str) and _conform(1.0, hints[key]) is not _NOT_ALLOWED and _is_number(value):
                hint = " (YAML reads a number like 1e-5 without a dot as a string: write 1.0e-5)"
            raise ConfigError(
                f"{path}: `{key}` must be {_describe(hints[key])}, got {value!r} ({type(value).__name__}){hint}."
            )
        checked[key] = conformed
    return checked


def load_config(config_class: type[ConfigT], path: str | Path | None, overrides: list[str] | None = None) -> ConfigT:
    """Build ``config_class`` from a YAML/JSON file, then apply ``--key value`` overrides; validate both."""
    valid = sorted(f.name for f in dataclasses.fields(config_class) if f.init)
    file_values = _read_config_file(path) if path is not None else {}
    for key in file_values:
        if key not in valid:
            raise _unknown_key_error(key, valid, str(path))
    file_values = _check_file_values(config_class, file_values, path)
    parser = HfArgumentParser(config_class)
    # The file's values become argparse defaults, so the command line wins and types are checked once.
    for action in parser._actions:
        if action.dest in file_values:
            action.required = False
    parser.set_defaults(**file_values)
    overrides = list(overrides or [])
    for token in overrides:
        if token.startswith("--"):
            key = token[2:].split("=", 1)[0].replace("-", "_")
            if key not in valid:
                raise _unknown_key_error(key, valid, "the command line")
    (config,) = parser.parse_args_into_dataclasses(args=overrides)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config, for logs and result files."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
