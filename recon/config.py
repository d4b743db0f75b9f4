"""Typed, layered configuration: YAML files and ``--set`` overrides into frozen dataclasses.

The machinery here knows no particular schema. A stage configuration is a tree of frozen
dataclasses (sections, see :mod:`recon.sections`) composed by the engine; this module turns YAML
files and command-line items into the plain data such a tree is built from, and records for every
key where its value came from:

1. :func:`load_yaml_layers` reads a YAML file whose optional top-level key ``inherit`` names one or
   more base files (relative to the file). Each base is resolved completely, the bases are
   deep-merged in list order, then the file itself goes on top. Mappings merge key by key; every
   other value (lists included) is replaced.
2. :func:`parse_overrides` / :func:`apply_overrides` apply ``dotted.key=value`` items from the
   command line, the value typed by YAML (``lr=2e-4`` is a float, ``dims=[24, 32, 40]`` a list).
3. :func:`load_config` does both, then builds the typed tree with :func:`recon.sections.from_dict`,
   which refuses unknown keys, wrong types and broken section rules in one line that names the
   dotted key and the file (or ``--set``) that set the value.
4. :func:`dump_yaml` writes the resolved configuration back as a file; :func:`to_dict` and
   :func:`flatten` (re-exported from :mod:`recon.sections`) give it as plain data and flat names.

YAML note: PyYAML follows YAML 1.1, where ``2e-4`` (no dot) is a *string*. The loader here also
reads such exponent forms as floats, because learning rates are written that way.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from recon.errors import InputError
from recon.io import write_text_atomic
from recon.sections import deep_merge, flatten, from_dict, to_dict

__all__ = [
    "INHERIT_KEY",
    "OVERRIDE_SOURCE",
    "load_yaml_layers",
    "record_sources",
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


def record_sources(data: Mapping[str, Any], origin: str, sources: dict[str, str], prefix: str = "") -> None:
    """Record ``origin`` as the source of every key (sections and leaves) of ``data``.

    Args:
        data: nested plain data set by one origin.
        origin: a file name, ``--set`` or another label shown in messages.
        sources: the ``dotted.key -> origin`` dict to fill (existing entries are replaced).
        prefix: dotted path of ``data`` itself, ending with a dot (``""`` at the root).
    """
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        sources[dotted] = origin
        if isinstance(value, Mapping):
            record_sources(value, origin, sources, dotted + ".")


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
        record_sources(data, origin, sources)
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
                record_sources(value, OVERRIDE_SOURCE, sources, key + ".")
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
