"""Configuration sections: frozen dataclasses built strictly from plain data, checked, and turned back.

A section is a frozen dataclass whose fields are settings. This module is the one place that

* builds a (nested) section from YAML-typed plain data (:func:`from_dict`), refusing unknown keys
  (with a suggestion), wrong types, values outside a ``Literal`` and missing required keys;
* checks a section's values: a section derives from :class:`Section` and writes its rules in
  ``validate()`` with :meth:`Section.require`, which raises :class:`FieldError` naming the field
  *relative to the section* (``max_scaling``, or ``data.num_adj_slices`` from the stage root).
  A :class:`Section` checks its field types and runs ``validate()`` whenever it is constructed, so a
  section made in code is held to the same rules as one read from a file;
* reports a failed rule once, as one line: :func:`from_dict` knows where the section sits in the
  tree and where every leaf value came from, and writes
  ``mraugment.brain.max_scaling = 1.5 (from --set): must be < 1``;
* gives a section tree back as plain data (:func:`to_dict`) and as flat stable names (:func:`flatten`).

Supported field types: ``int``, ``float`` (ints accepted), ``bool`` (never 0/1), ``str``,
``pathlib.Path`` (from a string), ``Optional[X]`` / ``X | None``, other unions (first arm that
fits), ``Literal[...]``, ``tuple[X, ...]``, fixed ``tuple[X, Y]``, ``list[X]``, ``dict[str, X]``,
nested dataclasses and ``Any``. Annotations are resolved with :func:`typing.get_type_hints`, so
``from __future__ import annotations`` works (sections must be defined at module level).

A plain dataclass (not a :class:`Section`) may still define ``validate(self) -> None``;
:func:`from_dict` runs it after construction, and a plain ``ValueError`` from it is reported with
the section's key path.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

from recon.errors import InputError

__all__ = ["DEFAULT_SOURCE", "FieldError", "Section", "deep_merge", "from_dict", "to_dict", "flatten"]

T = TypeVar("T")

DEFAULT_SOURCE = "default"
_NO_VALUE = object()


class FieldError(InputError):
    """A section's value breaks one of its rules.

    Args:
        field: the field's dotted name relative to the section that checks it.
        message: what the value must be, e.g. ``"must be < 1"``.
        value: the offending value (shown in the message).
    """

    def __init__(self, field: str, message: str, value: Any = _NO_VALUE) -> None:
        self.field = field
        self.message = message
        self.value = value
        shown = "" if value is _NO_VALUE else f", got {_show(value)}"
        super().__init__(f"{field} {message}{shown}")


class Section:
    """Base of configuration sections (frozen dataclasses).

    Construction converts and checks every field against its annotation (lists become tuples,
    ints become floats where a float is declared), then runs :meth:`validate`.
    ``RENAMED`` maps a retired key of the section to ``(new key, note)``, which :func:`from_dict`
    names when the old key is given.
    """

    RENAMED: ClassVar[dict[str, tuple[str, str]]] = {}

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.init:
                continue
            value = getattr(self, f.name)
            converted = _convert(value, hints[f.name], f.name, None)
            if converted is not value:
                object.__setattr__(self, f.name, converted)
        self.validate()

    def validate(self) -> None:
        """Check the values together; sections override this and call :meth:`require`.

        Raises:
            FieldError: a value breaks a rule.
        """

    def require(self, condition: bool, field: str, message: str) -> None:
        """Raise :class:`FieldError` for ``field`` unless ``condition`` holds.

        Args:
            condition: the rule, evaluated by the caller.
            field: dotted field name relative to this section (``"brain.max_scaling"``).
            message: what the value must be (``"must be < 1"``).

        Raises:
            FieldError: the condition is false.
        """
        if not condition:
            raise FieldError(field, message, _lookup(self, field))


def _lookup(instance: Any, dotted: str) -> Any:
    value = instance
    for part in dotted.split("."):
        value = getattr(value, part, _NO_VALUE)
        if value is _NO_VALUE:
            return _NO_VALUE
    return value


def _show(value: Any) -> str:
    """A value as the user wrote it (lists, not tuples), shortened."""
    text = repr(to_dict(value))
    return text if len(text) <= 60 else text[:57] + "..."


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


def _field_failure(path: str, exc: FieldError, sources: Mapping[str, str] | None) -> InputError:
    """``<full.key> = <value> (from <file>): <message>`` for a broken section rule."""
    key = _join(path, exc.field)
    text = key if exc.value is _NO_VALUE else f"{key} = {_show(exc.value)}"
    if sources is not None:
        origin = sources.get(key)
        text += f" (from {origin})" if origin is not None else f" ({DEFAULT_SOURCE})"
    return InputError(f"{text}: {exc.message}")


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
        if isinstance(value, tp):
            return value
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


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: Any, path: str = "", *, sources: Mapping[str, str] | None = None) -> T:
    """Build a (nested) dataclass instance from plain data, strictly.

    Keys given for a section override that field's *default instance* (e.g. a preset such as
    ``p_aug: RampScheduleConfig = P_AUG``), not the section class's defaults.

    Args:
        cls: a dataclass type (usually a frozen :class:`Section`).
        data: a mapping of field names to values (YAML-typed).
        path: dotted key path of this section, used in messages (``""`` for the root).
        sources: optional ``dotted.key -> file`` provenance (see ``recon.config.load_yaml_layers``);
            when given, a broken rule names the file (or ``--set``) that set the value, or says
            ``(default)`` for a value no file set.

    Returns:
        An instance of ``cls``; fields absent from ``data`` keep their defaults.

    Raises:
        InputError: unknown key (with a close-match suggestion), wrong type, value outside a
            ``Literal``, missing required key, or a broken section rule (one line, see the module
            docstring).
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
            renamed = getattr(cls, "RENAMED", {}).get(key)
            if renamed:
                hint = f" (renamed: use '{_join(path, renamed[0])}'; {renamed[1]})"
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
        instance = cls(**kwargs)  # a Section converts and validates itself here
        validate = getattr(instance, "validate", None)
        if not isinstance(instance, Section) and callable(validate):
            validate()
    except FieldError as exc:
        raise _field_failure(path, exc, sources) from None
    except (ValueError, TypeError) as exc:
        # A plain dataclass's own check failed without naming a field: name the section's path.
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
