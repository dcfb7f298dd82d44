"""Frozen records that are also JSON files: one definition gives the fields, the JSON and its schema.

A `Record` is a frozen, keyword-only dataclass whose fields are declared with `doc(meaning)`.
`to_json()` writes it as nested dicts (a field that is None and defaults to None is left out;
a `flatten` field's keys join its parent's); `from_json()` reads such a dict back and refuses
keys no field declares, so a file and its reader cannot drift apart silently; `schema_rows()`
lists every key with its type and meaning, for the docs that describe the files.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from lynx_export.errors import DataError

__all__ = ["Record", "record", "doc", "schema_rows", "schema_markdown"]

_NO_DEFAULT: Any = dataclasses.MISSING
R = typing.TypeVar("R", bound="Record")


def record(cls):
    """The decorator of every record: frozen and keyword-only, so optional keys may sit anywhere
    in a file's key order."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


def doc(meaning: str, default: Any = _NO_DEFAULT, *, flatten: bool = False) -> Any:
    """A record field: what it means (the schema's text); `default=None` makes the key optional;
    `flatten`: its keys are written into the parent's object (a nested record's, or, for a
    mapping, every key the other fields do not name)."""
    return dataclasses.field(default=default, metadata={"doc": meaning, "flatten": flatten})


class Record:
    """Base of the records; see the module docstring."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field]]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            if f.metadata.get("flatten"):
                out.update(_encode(value))
            else:
                out[f.name] = _encode(value)
        return out

    @classmethod
    def from_json(cls: type[R], data: Any, where: str = "") -> R:
        """The record `data` holds; DataError (naming `where` and the key) for a missing or unknown key."""
        where = where or cls.__name__
        if not isinstance(data, Mapping):
            raise DataError(f"{where}: expected an object, got {type(data).__name__}")
        unknown = set(data) - _keys(cls)
        rest = _rest_field(cls)
        if unknown and rest is None:
            raise DataError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f is rest:
                values[f.name] = {k: data[k] for k in unknown}
            elif f.metadata.get("flatten"):
                nested = _record_type(hints[f.name])
                values[f.name] = nested.from_json({k: data[k] for k in _keys(nested) if k in data}, where)
            elif f.name in data:
                values[f.name] = _decode(hints[f.name], data[f.name], f"{where}.{f.name}")
            elif f.default is _NO_DEFAULT and f.default_factory is _NO_DEFAULT:
                raise DataError(f"{where}: missing key {f.name}")
        return cls(**values)


def _rest_field(cls) -> dataclasses.Field | None:
    """The flattened mapping field that takes the keys no other field names, if any."""
    return next((f for f in dataclasses.fields(cls) if f.metadata.get("flatten") and _record_type(typing.get_type_hints(cls)[f.name]) is None),
                None)


def _keys(cls) -> set[str]:
    """The keys `cls` writes at its own level (a flattened record's included)."""
    hints = typing.get_type_hints(cls)
    keys = set()
    for f in dataclasses.fields(cls):
        if not f.metadata.get("flatten"):
            keys.add(f.name)
        elif (nested := _record_type(hints[f.name])) is not None:
            keys |= _keys(nested)
    return keys


def _record_type(tp: Any) -> type[Record] | None:
    tp = _optional_of(tp)
    return tp if isinstance(tp, type) and issubclass(tp, Record) else None


def _optional_of(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _encode(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(tp: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    tp = _optional_of(tp)
    nested = _record_type(tp)
    if nested is not None:
        return nested.from_json(value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if not isinstance(value, list):
            raise DataError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping, typing.Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise DataError(f"{where}: expected an object, got {type(value).__name__}")
        inner = args[1] if args else Any
        return {k: _decode(inner, v, f"{where}.{k}") for k, v in value.items()}
    return value


# -- schema ----------------------------------------------------------------------------------------

_TYPE_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean"}


def _type_name(tp: Any) -> str:
    tp = _optional_of(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _record_type(tp) is not None:
        name = "object"
    elif origin is tuple:
        name = f"list of {_type_name(args[0])}"
    elif origin in (dict, Mapping, typing.Mapping) or tp in (dict, Mapping):
        name = "object"
    else:
        name = _TYPE_NAMES.get(tp, "any")
    return name


def schema_rows(cls: type[Record], prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(key, type, meaning) for every key `cls` writes, nested keys as `a.b`, list items as
    `a[].b`, mapping values as `a.*.b`; an optional key's meaning starts with "(optional)"."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, meaning = hints[f.name], f.metadata.get("doc", "")
        if f.default is None:
            meaning = f"(optional) {meaning}"
        inner = _optional_of(tp)
        nested = _record_type(inner)
        if f.metadata.get("flatten"):
            if nested is not None:
                yield from schema_rows(nested, prefix)
            else:
                yield f"{prefix}*", _type_name(typing.get_args(inner)[1] if typing.get_args(inner) else Any), meaning
            continue
        key = f"{prefix}{f.name}"
        yield key, _type_name(tp), meaning
        origin, args = typing.get_origin(inner), typing.get_args(inner)
        if nested is not None:
            yield from schema_rows(nested, f"{key}.")
        elif origin is tuple and _record_type(args[0]) is not None:
            yield from schema_rows(_record_type(args[0]), f"{key}[].")
        elif origin in (dict, Mapping, typing.Mapping) and args and _record_type(args[1]) is not None:
            yield from schema_rows(_record_type(args[1]), f"{key}.*.")


def schema_markdown(cls: type[Record]) -> str:
    """`schema_rows` as a Markdown table."""
    lines = ["| key | type | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | {kind} | {meaning} |" for key, kind, meaning in schema_rows(cls)]
    return "\n".join(lines)
