"""MaxText-style YAML configuration: files with `base_config:` chains plus `key=value` overrides.

A config is assembled from layers, lowest precedence first: the `base_config` chain of the
file (deepest base first; a list of bases is applied in its order), the file itself, then each
command-line override in order. Every layer is flattened to dotted keys so that a later layer
replaces single leaves without disturbing their siblings (a deep merge), and each leaf remembers
which file or override set it, so that every error can say where the bad value came from.

The merged tree is then turned into the frozen dataclasses of `schema.py`, driven only by their
type hints, so new sections (new dataclass fields) need no change here. Finally the dataclasses'
own `validate()` checks cross-field invariants.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from dreamr_jax.config.schema import Config, is_config_class

COMMAND_LINE = "command line"
"""Source label of values that came from `overrides`."""

BASE_CONFIG_KEY = "base_config"

# PyYAML follows YAML 1.1, where a float needs a dot: `1e-6` loads as the *string* "1e-6". Float
# fields accept such strings so that `rms_norm_eps: 1e-6` means what everyone expects.
_FLOAT_STRING = re.compile(r"[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?")

_SAVED_HEADER = "# Resolved dreamr_jax config; load it with dreamr_jax.config.load_config(path).\n"

# Leaves of the merged config: dotted key -> (value, source label), in the order they were set.
_Flat = dict[str, tuple[Any, str]]


class ConfigError(ValueError):
    """A config file or override is malformed, mistyped, unknown or violates an invariant."""


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: Sequence[str] = (),
    cls: type[Any] = Config,
) -> Any:
    """Load `path` (following its `base_config` chain), apply `overrides`, build and validate.

    Args:
      path: a YAML file, or None for the dataclass defaults.
      overrides: `dotted.key=value` strings; values are parsed as YAML (ints, floats, bools,
        lists). Later overrides beat earlier ones, and all beat the files.
      cls: the root dataclass to build (normally `Config`).

    Raises:
      ConfigError: naming the dotted key and the file (or "command line") at fault.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    label = os.fspath(path) if path is not None else None
    flat: _Flat = {}
    if label is not None:
        for tree, source in _read_chain(label):
            _apply_tree(flat, tree, source)
    for text in overrides:
        key, value = _parse_override(text)
        _apply_tree(flat, {key: value}, COMMAND_LINE)
    sources = {key: source for key, (_, source) in flat.items()}
    cfg = _build(cls, _unflatten(flat), "", sources)
    _validate(cfg, label, sources)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists), ready for YAML or JSON."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a config dataclass instance, got {type(cfg).__name__}")
    return {f.name: _to_plain(getattr(cfg, f.name)) for f in _init_fields(type(cfg))}


def save_config(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write the fully resolved `cfg` as YAML; `load_config(path)` gives back an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    path.write_text(_SAVED_HEADER + text)


def _to_plain(value: Any) -> Any:
    """YAML-friendly copy of a field value: dataclasses as dicts, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# Reading layers
# --------------------------------------------------------------------------------------------


def _read_chain(path: str, chain: tuple[str, ...] = ()) -> list[tuple[dict[str, Any], str]]:
    """The (tree, file) layers of `path` and its bases, deepest base first.

    `chain` holds the files that (transitively) named `path` as their base, to detect cycles.
    """
    real = os.path.realpath(path)
    if real in (os.path.realpath(p) for p in chain):
        cycle = " -> ".join((*chain, path))
        raise ConfigError(f"{chain[-1]}: {BASE_CONFIG_KEY}: cycle in base configs: {cycle}")
    tree = _read_yaml(path, referrer=chain[-1] if chain else None)
    base = tree.pop(BASE_CONFIG_KEY, None)
    # One base, or a list of them applied in order (a model preset, then a judge format, ...).
    bases = base if isinstance(base, list) else [] if base is None else [base]
    layers: list[tuple[dict[str, Any], str]] = []
    for one in bases:
        if not isinstance(one, str) or not one.strip():
            raise ConfigError(
                f"{path}: {BASE_CONFIG_KEY}: expected a path relative to this file (or a list "
                f"of them), got {base!r}"
            )
        # Relative to the file that names it, not the working directory, so presets can be
        # loaded from anywhere.
        base_path = os.path.normpath(os.path.join(os.path.dirname(path), one))
        layers += _read_chain(base_path, (*chain, path))
    layers.append((tree, path))
    return layers


def _read_yaml(path: str, referrer: str | None) -> dict[str, Any]:
    """The top-level mapping of one YAML file (empty for an empty file)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        via = f" (the {BASE_CONFIG_KEY} of {referrer})" if referrer else ""
        raise ConfigError(f"{path}: config file not found{via}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a YAML config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _parse_override(text: str) -> tuple[str, Any]:
    """Split `dotted.key=value` and parse the value as YAML."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"{COMMAND_LINE}: override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{COMMAND_LINE}: override {text!r} has an empty key or key part")
    if key == BASE_CONFIG_KEY:
        raise ConfigError(f"{COMMAND_LINE}: {BASE_CONFIG_KEY} can only be set in a YAML file")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{COMMAND_LINE}: {key}: cannot parse value {raw!r}: {e}") from None
    return key, value


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------


def _flatten(tree: Mapping[Any, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf) pairs; non-mapping values are leaves, empty mappings add nothing."""
    for name, value in tree.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, Mapping):
            yield from _flatten(value, key)
        else:
            yield key, value


def _apply_tree(flat: _Flat, tree: Mapping[str, Any], source: str) -> None:
    """Lay `tree` over `flat`: each leaf replaces that key and anything above or below it."""
    for key, value in _flatten(tree):
        stale = [k for k in flat if k == key or k.startswith(key + ".") or key.startswith(k + ".")]
        for k in stale:
            del flat[k]
        flat[key] = (value, source)


def _unflatten(flat: _Flat) -> dict[str, Any]:
    """Nested dict from dotted leaves (no key is a prefix of another, so this never clashes)."""
    tree: dict[str, Any] = {}
    for key, (value, _) in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _source_of(key: str, sources: Mapping[str, str]) -> str | None:
    """Where `key` (or, for a section, the last value set under it) came from."""
    key = key.split("[", 1)[0]  # list elements share their list's source
    if key in sources:
        return sources[key]
    below = [s for k, s in sources.items() if not key or k.startswith(key + ".")]
    return below[-1] if below else None


# --------------------------------------------------------------------------------------------
# Building dataclasses
# --------------------------------------------------------------------------------------------


def _init_fields(cls: type[Any]) -> list[dataclasses.Field[Any]]:
    """The fields a config file may set (those the constructor takes)."""
    return [f for f in dataclasses.fields(cls) if f.init]


def _build(cls: type[Any], data: Mapping[str, Any], prefix: str, sources: Mapping[str, str]) -> Any:
    """Instantiate dataclass `cls` from `data`, converting each value by the field's type hint."""
    fields = {f.name: f for f in _init_fields(cls)}
    # get_type_hints resolves the string annotations left by `from __future__ import annotations`.
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in fields:
            raise ConfigError(_unknown_key_message(key, name, list(fields), sources))
        kwargs[name] = _convert(value, hints[name], key, sources)
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and name not in kwargs:
            key = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{_where(prefix, sources)}: {key}: required key is missing")
    return cls(**kwargs)


def _convert(value: Any, tp: Any, key: str, sources: Mapping[str, str]) -> Any:
    """`value` checked against (and where harmless, converted to) type `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if is_config_class(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            _type_error(value, tp, key, sources)
        return _build(tp, value, key, sources)
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, key, sources)
    if origin is Literal:
        if value not in args:
            _type_error(value, tp, key, sources)
        return value
    if origin in (tuple, list):
        return _convert_sequence(value, tp, key, sources)
    if origin is dict:
        if not isinstance(value, Mapping):
            _type_error(value, tp, key, sources)
        key_tp, value_tp = args or (str, Any)
        return {
            _convert(k, key_tp, f"{key}.{k}", sources): _convert(v, value_tp, f"{key}.{k}", sources)
            for k, v in value.items()
        }
    return _convert_scalar(value, tp, key, sources)


def _convert_union(value: Any, tp: Any, key: str, sources: Mapping[str, str]) -> Any:
    """First member of `X | Y | None` that accepts `value`."""
    args = typing.get_args(tp)
    members = [a for a in args if a is not type(None)]
    if value is None:
        if len(members) < len(args):
            return None
        _type_error(value, tp, key, sources)
    if len(members) == 1:
        # Plain optional: keep the member's own, more precise error (e.g. an unknown nested key).
        return _convert(value, members[0], key, sources)
    for member in members:
        try:
            return _convert(value, member, key, sources)
        except ConfigError:
            continue
    _type_error(value, tp, key, sources)


def _convert_sequence(value: Any, tp: Any, key: str, sources: Mapping[str, str]) -> Any:
    """tuple[X, ...], tuple[X, Y] or list[X] from a YAML list, element by element."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if not isinstance(value, list | tuple):
        _type_error(value, tp, key, sources)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            _type_error(value, tp, key, sources, f"expected {len(args)} elements")
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(value)
    items = [
        _convert(v, t, f"{key}[{i}]", sources)
        for i, (v, t) in enumerate(zip(value, item_types, strict=True))
    ]
    return origin(items)


def _convert_scalar(value: Any, tp: Any, key: str, sources: Mapping[str, str]) -> Any:
    """int, float, bool, str (or Any) with no silent truthiness or truncation."""
    if tp is Any:
        return value
    if tp is bool:
        # bool is checked strictly: `1` or "yes" (quoted) is more likely a mistake than intent.
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str) and _FLOAT_STRING.fullmatch(value.strip()):
            return float(value)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok:
            return float(value)
    elif tp is str:
        ok = isinstance(value, str)
    elif isinstance(tp, type):
        ok = isinstance(value, tp)
    else:
        raise TypeError(f"{key}: config fields of type {tp!r} are not supported by the loader")
    if not ok:
        _type_error(value, tp, key, sources)
    return value


# --------------------------------------------------------------------------------------------
# Errors and validation
# --------------------------------------------------------------------------------------------


def _where(key: str, sources: Mapping[str, str]) -> str:
    return _source_of(key, sources) or "defaults"


def _type_name(tp: Any) -> str:
    """Readable name of a type hint, e.g. `tuple[int, ...]` or `int | None`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if is_config_class(tp):
        return f"a mapping of {tp.__name__} keys"
    return getattr(tp, "__name__", repr(tp))


def _type_error(
    value: Any, tp: Any, key: str, sources: Mapping[str, str], detail: str = ""
) -> typing.NoReturn:
    detail = f" ({detail})" if detail else ""
    raise ConfigError(
        f"{_where(key, sources)}: {key}: expected {_type_name(tp)}, "
        f"got {value!r} ({type(value).__name__}){detail}"
    )


def _unknown_key_message(key: str, name: str, valid: list[str], sources: Mapping[str, str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    # An unknown section: also name the full keys that were set under it.
    below = [k for k in sources if k.startswith(key + ".")]
    setting = f" while setting {', '.join(below)}" if below else ""
    return (
        f"{_where(key, sources)}: {key}: unknown key{setting}{hint} "
        f"(valid keys here: {', '.join(valid)})"
    )


def _validate(cfg: Any, label: str | None, sources: Mapping[str, str]) -> None:
    """Run `cfg.validate()`, re-raising its ValueError with the file (and value source) named."""
    validate = getattr(cfg, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except ConfigError:
        raise
    except ValueError as e:
        message = str(e)
        source = _source_of(message.split(":", 1)[0].strip(), sources)
        if label is None:
            raise ConfigError(f"{source or 'defaults'}: {message}") from e
        origin = f" (value from {source})" if source and source != label else ""
        raise ConfigError(f"{label}: {message}{origin}") from e
