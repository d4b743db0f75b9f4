"""Typed, layered configuration: YAML files and ``--set`` overrides into frozen dataclasses.

The machinery here knows no particular schema. A stage configuration is a tree of frozen
dataclasses (sections) composed by the engine; this module turns YAML into such a tree and back:

1. :func:`load_yaml_layers` reads a YAML file whose optional top-level key ``inherit`` names one or
   more base files (relative to the file). Each base is resolved completely, the bases are
   deep-merged in list order, then the file itself goes on top. Mappings merge key by key; every
   other value (lists included) is replaced.
2. :func:`parse_overrides` / :func:`apply_overrides` apply ``dotted.key=value`` items from the
   command line, the value typed by YAML (``lr=2e-4`` is a float, ``dims=[24, 32, 40]`` a list).
3. :func:`from_dict` builds the dataclass tree, refusing unknown keys (with a suggestion), wrong
   types, values outside a ``Literal`` and missing required keys, then runs each section's optional
   ``validate()`` method. Keys given for a section override that field's *default instance* (e.g.
   a preset such as ``p_aug: RampScheduleConfig = P_AUG``), not the section class's defaults.
   Every refusal is a one-line :class:`~recon.errors.InputError` that names the dotted key and,
   when known, the file the value came from.
4. :func:`to_dict` / :func:`flatten` / :func:`dump_yaml` give the resolved configuration back as
   plain data (saved with every checkpoint), as flat stable names (tracking params) and as a file.

Supported field types: ``int``, ``float`` (ints accepted), ``bool`` (never 0/1), ``str``,
``pathlib.Path`` (from a string), ``Optional[X]`` / ``X | None``, other unions (first arm that
fits), ``Literal[...]``, ``tuple[X, ...]``, fixed ``tuple[X, Y]``, ``list[X]``, ``dict[str, X]``,
nested dataclasses and ``Any``. A section may define ``validate(self) -> None`` raising
``ValueError`` with a plain message; it is reported with the section's key path. Annotations
are resolved with :func:`typing.get_type_hints`, so ``from __future__ import annotations`` works
(sections must be defined at module level).

YAML note: PyYAML follows YAML 1.1, where ``2e-4`` (no dot) is a *string*. The loader here also
reads such exponent forms as floats, because learning rates are written that way.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from recon.errors import InputError
from recon.io import write_text_atomic

__all__ = [
    "INHERIT_KEY",
    "OVERRIDE_SOURCE",
    "load_yaml_layers",
    "deep_merge",
    "parse_overrides",
    "apply_overrides",
    "from_dict",
    "to_dict",
    "flatten",
    "dump_yaml",
    "load_config",
]

INHERIT_KEY = "inherit"
OVERRIDE_SOURCE = "--set"

T = TypeVar("T")

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_][A-Za-z0-9_-]*)*")
# Exponent floats without a dot ("2e-4", "1E5"), which YAML 1.1 leaves as strings.
_EXP_FLOAT_RE = re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``2e-4`` style numbers as floats."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT_RE, list("-+0123456789"))


def _yaml_load(text: str, origin: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{origin}: invalid YAML{where}: {problem}") from None


# --------------------------------------------------------------------------------------------
# Layered YAML files
# --------------------------------------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``top`` over ``base``: mappings recursively, every other value replaced.

    Args:
        base: lower layer (not modified).
        top: upper layer (not modified).

    Returns:
        A new nested dict.
    """
    out = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _record_sources(data: Mapping[str, Any], origin: str, sources: dict[str, str], prefix: str = "") -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        sources[dotted] = origin
        if isinstance(value, Mapping):
            _record_sources(value, origin, sources, dotted + ".")


def _inherit_list(value: Any, origin: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise InputError(f"{origin}: '{INHERIT_KEY}' must be a file path or a list of file paths, got {value!r}")


def _load_layer(path: Path, stack: list[Path], sources: dict[str, str] | None) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(str(p) for p in [*stack[stack.index(resolved):], resolved])
        raise InputError(f"configuration inheritance cycle: {chain}")
    if not resolved.is_file():
        hint = f" (inherited by {stack[-1]})" if stack else ""
        raise InputError(f"configuration file not found: {path}{hint}")
    origin = str(path)
    data = _yaml_load(resolved.read_text(encoding="utf-8"), origin)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    merged: dict[str, Any] = {}
    if INHERIT_KEY in data:
        for rel in _inherit_list(data.pop(INHERIT_KEY), origin):
            base_path = Path(rel).expanduser()
            if not base_path.is_absolute():
                base_path = path.parent / base_path
            merged = deep_merge(merged, _load_layer(base_path, [*stack, resolved], sources))
    if sources is not None:
        _record_sources(data, origin, sources)
    return deep_merge(merged, data)


def load_yaml_layers(path: str | os.PathLike[str], sources: dict[str, str] | None = None) -> dict[str, Any]:
    """Read a YAML configuration file together with the base files it inherits.

    A top-level ``inherit: base.yaml`` (or a list of files) names base files relative to the
    file's folder; bases may inherit in turn. Each base is resolved completely (with its own bases)
    and the results are merged in list order, then the file itself on top; so a later base
    overrides an earlier one, including values the later one merely inherited.

    Args:
        path: the YAML file.
        sources: optional dict filled with ``dotted.key -> file`` for every key set by a file (the
            last file that set it wins); used to name the file in error messages.

    Returns:
        The merged nested dict, without ``inherit`` keys.

    Raises:
        InputError: a file is missing or not valid YAML, its top level is not a mapping,
            ``inherit`` is malformed, or the inheritance forms a cycle.
    """
    return _load_layer(Path(path), [], sources)


# --------------------------------------------------------------------------------------------
# Command-line overrides
# --------------------------------------------------------------------------------------------


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """Parse ``dotted.key=value`` items; each value is typed by YAML.

    ``a.b=1`` gives ``("a.b", 1)``; ``c=[1,2]`` gives a list; ``d=2e-4`` a float; ``e=null`` None;
    ``f=`` (empty) None; quote to force a string: ``g='123'``.

    Args:
        items: the raw ``--set`` strings.

    Returns:
        ``(dotted_key, value)`` pairs in the given order.

    Raises:
        InputError: an item has no ``=``, an invalid key, or a value that is not valid YAML.
    """
    out: list[tuple[str, Any]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise InputError(f"{OVERRIDE_SOURCE} {item!r}: expected dotted.key=value")
        if not _KEY_RE.fullmatch(key):
            raise InputError(f"{OVERRIDE_SOURCE} {item!r}: invalid key {key!r} (expected names joined by dots)")
        out.append((key, _yaml_load(raw, f"{OVERRIDE_SOURCE} {key}")))
    return out


def apply_overrides(
    data: Mapping[str, Any],
    overrides: Iterable[tuple[str, Any]],
    sources: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Apply parsed overrides to a nested dict (a copy is returned).

    Missing intermediate sections are created; whether a key exists in the schema is checked
    later by :func:`from_dict`. A mapping value is merged into an existing section.

    Args:
        data: the configuration loaded from files (not modified).
        overrides: ``(dotted_key, value)`` pairs from :func:`parse_overrides`.
        sources: optional provenance dict (see :func:`load_yaml_layers`); overridden keys are
            recorded as coming from ``--set``.

    Returns:
        A new nested dict.

    Raises:
        InputError: a key walks through a value that is not a section.
    """
    out = copy.deepcopy(dict(data))
    for key, value in overrides:
        parts = key.split(".")
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                parent = ".".join(parts[: depth + 1])
                raise InputError(
                    f"{OVERRIDE_SOURCE} {key}: '{parent}' is a value ({type(child).__name__}), not a section"
                )
            node = child
        last = parts[-1]
        if isinstance(value, Mapping) and isinstance(node.get(last), dict):
            node[last] = deep_merge(node[last], value)
        else:
            node[last] = copy.deepcopy(value)
        if sources is not None:
            sources[key] = OVERRIDE_SOURCE
            if isinstance(value, Mapping):
                _record_sources(value, OVERRIDE_SOURCE, sources, key + ".")
    return out


# --------------------------------------------------------------------------------------------
# Dict -> dataclass
# --------------------------------------------------------------------------------------------


def _source_of(key: str, sources: Mapping[str, str] | None) -> str | None:
    if not sources:
        return None
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        origin = sources.get(".".join(parts[:n]))
        if origin is not None:
            return origin
    return None


def _fail(key: str, message: str, sources: Mapping[str, str] | None, *, keyed: bool = True) -> InputError:
    """One-line error: ``<file>: <key>: <message>`` (parts omitted when unknown)."""
    text = f"{key}: {message}" if keyed and key else message
    origin = _source_of(key, sources)
    return InputError(f"{origin}: {text}" if origin else text)


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _convert(value: Any, tp: Any, key: str, sources: Mapping[str, str] | None) -> Any:
    """Check ``value`` against annotation ``tp`` and convert it (lists to tuples, dicts to sections)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        arms = [a for a in args if a is not type(None)]
        if value is None:
            if len(arms) < len(args):
                return None
            raise _fail(key, f"expected {_type_name(tp)}, got None", sources)
        if len(arms) == 1:
            return _convert(value, arms[0], key, sources)
        for arm in arms:
            try:
                return _convert(value, arm, key, sources)
            except InputError:
                continue
        raise _fail(key, f"expected {' or '.join(_type_name(a) for a in arms)}, got {_describe(value)}", sources)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        allowed = ", ".join(repr(a) for a in args)
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [a for a in args if isinstance(a, str)], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _fail(key, f"expected one of {allowed}, got {value!r}{hint}", sources)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_dict(tp, value, key, sources=sources)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(key, f"expected bool (true/false), got {_describe(value)}", sources)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(key, f"expected int, got {_describe(value)}", sources)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _fail(key, f"expected float, got {_describe(value)}", sources)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(key, f"expected str, got {_describe(value)}", sources)
    if isinstance(tp, type) and issubclass(tp, os.PathLike):
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise _fail(key, f"expected a path (str), got {_describe(value)}", sources)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _fail(key, f"expected a list, got {_describe(value)}", sources)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _fail(key, f"expected a list of {len(args)} items, got {len(value)}", sources)
            return tuple(_convert(v, a, f"{key}[{i}]", sources) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]", sources) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _fail(key, f"expected a mapping, got {_describe(value)}", sources)
        key_tp, value_tp = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            if key_tp is str and not isinstance(k, str):
                raise _fail(key, f"expected string keys, got {_describe(k)}", sources)
            out[k] = _convert(v, value_tp, _join(key, str(k)), sources)
        return out
    raise TypeError(f"recon.config: unsupported field type {tp!r} at '{key}'")


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: Any, path: str = "", *, sources: Mapping[str, str] | None = None) -> T:
    """Build a (nested) dataclass instance from plain data, strictly.

    Args:
        cls: a dataclass type (usually frozen).
        data: a mapping of field names to values (YAML-typed).
        path: dotted key path of this section, used in messages (``""`` for the root).
        sources: optional ``dotted.key -> file`` provenance (see :func:`load_yaml_layers`).

    Returns:
        An instance of ``cls``; fields absent from ``data`` keep their defaults.

    Raises:
        InputError: unknown key (with a close-match suggestion), wrong type, value outside a
            ``Literal``, missing required key, or a failed construction / ``validate()`` check.
        TypeError: ``cls`` is not a dataclass or uses an unsupported annotation (a schema bug).
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        where = path or "configuration"
        raise _fail(path, f"{where}: expected a mapping (section), got {_describe(data)}", sources, keyed=False)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise _fail(path, f"expected string keys, got {_describe(key)}", sources)
        dotted = _join(path, key)
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{_join(path, close[0])}'?)" if close else ""
            raise _fail(dotted, f"unknown key '{dotted}'{hint}", sources, keyed=False)
        default = _default_of(fields[key])
        if isinstance(value, Mapping) and dataclasses.is_dataclass(default) and not isinstance(default, type):
            # A partial section overrides the field's default instance, not the section class defaults.
            value = deep_merge(to_dict(default), value)
        kwargs[key] = _convert(value, hints[key], dotted, sources)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            dotted = _join(path, name)
            raise _fail(path, f"missing required key '{dotted}'", sources, keyed=False)
    try:
        instance = cls(**kwargs)
        validate = getattr(instance, "validate", None)
        if callable(validate):
            validate()
    except (ValueError, TypeError) as exc:
        # A section's own check (``__post_init__`` or ``validate()``) failed: name its key path.
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _fail(path, message, sources) from None
    return instance


# --------------------------------------------------------------------------------------------
# Dataclass -> plain data
# --------------------------------------------------------------------------------------------


def to_dict(instance: Any) -> Any:
    """Plain nested data from a dataclass tree: tuples become lists, paths strings.

    Args:
        instance: a dataclass instance (or any nesting of dicts, lists and scalars).

    Returns:
        Data that ``yaml.safe_dump`` and ``torch.load(weights_only=True)`` accept and that
        :func:`from_dict` reads back into an equal instance.
    """
    if dataclasses.is_dataclass(instance) and not isinstance(instance, type):
        return {f.name: to_dict(getattr(instance, f.name)) for f in dataclasses.fields(instance)}
    if isinstance(instance, Mapping):
        return {k: to_dict(v) for k, v in instance.items()}
    if isinstance(instance, (list, tuple)):
        return [to_dict(v) for v in instance]
    if isinstance(instance, os.PathLike):
        return os.fspath(instance)
    return instance


def flatten(data: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """Flatten nested plain data into ``{"a.b.c": scalar}`` with stable names.

    Lists become a compact JSON string (``"[24, 32, 40]"``) and empty mappings ``"{}"``, so every
    value is a scalar (str, int, float, bool or None) fit for a tracking parameter.

    Args:
        data: nested dicts (e.g. the output of :func:`to_dict`).
        sep: separator between key parts.

    Returns:
        A flat dict in the order of ``data`` (depth first).
    """
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{sep}{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                if value:
                    walk(value, name)
                else:
                    out[name] = "{}"
            elif isinstance(value, (list, tuple)):
                out[name] = json.dumps(to_dict(value))
            elif isinstance(value, os.PathLike):
                out[name] = os.fspath(value)
            else:
                out[name] = value

    walk(data, "")
    return out


def dump_yaml(data: Mapping[str, Any], path: str | os.PathLike[str], header: str = "") -> Path:
    """Write plain data as YAML atomically (see :func:`recon.io.write_text_atomic`).

    Args:
        data: nested plain data (tuples and paths are converted).
        path: destination file; its folder is created if needed.
        header: text put before the YAML (e.g. ``#`` comment lines).

    Returns:
        The destination path.
    """
    text = yaml.safe_dump(to_dict(data), sort_keys=False, default_flow_style=False, allow_unicode=True)
    return write_text_atomic(path, header + text)


def load_config(
    cls: type[T],
    path: str | os.PathLike[str],
    overrides: Sequence[str] | Sequence[tuple[str, Any]] = (),
) -> tuple[T, dict[str, Any]]:
    """Load a stage configuration: YAML layers, then ``--set`` overrides, then the typed check.

    Args:
        cls: the root dataclass of the schema.
        path: the stage YAML file.
        overrides: ``"dotted.key=value"`` strings, or already parsed ``(key, value)`` pairs.

    Returns:
        ``(instance, resolved)`` where ``resolved`` is :func:`to_dict` of the instance: the
        complete configuration including defaults, to save with every checkpoint.

    Raises:
        InputError: any problem in the files, the overrides or the values.
    """
    sources: dict[str, str] = {}
    data = load_yaml_layers(path, sources)
    items = list(overrides)
    pairs = parse_overrides(items) if items and isinstance(items[0], str) else items
    if any(isinstance(p, str) for p in pairs):
        raise TypeError("overrides must be all strings or all (key, value) pairs")
    data = apply_overrides(data, pairs, sources)  # type: ignore[arg-type]
    instance = from_dict(cls, data, sources=sources)
    return instance, to_dict(instance)
