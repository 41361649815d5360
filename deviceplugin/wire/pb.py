"""Protocol buffers (proto3) wire format for small, declared message schemas.

A :class:`Schema` lists a message's fields (number, name, kind); ``encode`` takes a plain dict,
``decode`` returns one with every declared field present (proto3 defaults for absent ones:
``""``, ``0``, ``False``, ``[]``, ``{}``, ``None`` for a sub-message or an ``optional`` field).
Unknown fields are skipped, as proto3 readers must; repeated scalars are read packed or not.
Only the kinds the kubelet APIs use exist: string, bytes, bool, (u)int32/64, enum, message and
maps of string to string or to a message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STRING, BYTES, BOOL, INT, MESSAGE, MAP = "string", "bytes", "bool", "int", "message", "map"
_SCALARS = (STRING, BYTES, BOOL, INT)
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MASK64 = (1 << 64) - 1


class DecodeError(ValueError):
    """Bytes that are not a valid encoding of the expected message."""


def varint(value: int) -> bytes:
    """``value`` as a base-128 varint (negative integers as their 64-bit two's complement)."""
    if value < 0:
        value &= _MASK64
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    result = shift = 0
    end = len(data)
    while True:
        if pos >= end:
            raise DecodeError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint longer than 10 bytes")


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class Field:
    __slots__ = ("default", "key_tag", "kind", "message", "name", "number", "optional", "repeated")

    def __init__(
        self,
        number: int,
        name: str,
        kind: str,
        message: Schema | None = None,
        *,
        repeated: bool = False,
        optional: bool = False,
    ) -> None:
        self.number, self.name, self.kind = number, name, kind
        self.message, self.repeated, self.optional = message, repeated, optional
        wire = _VARINT if kind in (BOOL, INT) else _LEN
        self.key_tag = varint(number << 3 | wire)
        self.default: Any = {
            STRING: "",
            BYTES: b"",
            BOOL: False,
            INT: 0,
            MESSAGE: None,
            MAP: None,
        }[kind]
        if optional:
            self.default = None


def string(number: int, name: str, *, repeated: bool = False, optional: bool = False) -> Field:
    return Field(number, name, STRING, repeated=repeated, optional=optional)


def boolean(number: int, name: str) -> Field:
    return Field(number, name, BOOL)


def integer(number: int, name: str, *, repeated: bool = False) -> Field:
    """int32, int64, uint32, uint64 and enums: all varints (signed ones read back signed)."""
    return Field(number, name, INT, repeated=repeated)


def message(number: int, name: str, schema: Schema, *, repeated: bool = False) -> Field:
    return Field(number, name, MESSAGE, schema, repeated=repeated)


def string_map(number: int, name: str, value: Schema | None = None) -> Field:
    """``map<string, string>`` (``value`` None) or ``map<string, value>``."""
    return Field(number, name, MAP, value)


class Schema:
    """One message type: ``Schema("Device", string(1, "ID"), ...)``."""

    def __init__(self, name: str, *fields: Field) -> None:
        self.name = name
        self.fields = tuple(sorted(fields, key=lambda f: f.number))
        self.by_number = {f.number: f for f in self.fields}
        self.by_name = {f.name: f for f in self.fields}
        if len(self.by_number) != len(fields) or len(self.by_name) != len(fields):
            raise ValueError(f"{name}: duplicate field number or name")

    def __repr__(self) -> str:
        return f"Schema({self.name})"

    # ---- encoding -----------------------------------------------------------------------
    def encode(self, values: Mapping[str, Any]) -> bytes:
        out = bytearray()
        for f in self.fields:
            v = values.get(f.name)
            if v is None:
                continue
            if f.kind == MAP:
                for k, item in v.items():
                    entry = _len_field(b"\x0a", k.encode())
                    if f.message is None:
                        entry += _len_field(b"\x12", item.encode())
                    else:
                        entry += _len_field(b"\x12", f.message.encode(item))
                    out += f.key_tag
                    out += varint(len(entry))
                    out += entry
            elif f.repeated:
                for item in v:
                    _put(out, f, item, always=True)
            else:
                _put(out, f, v, always=f.optional)
        return bytes(out)

    # ---- decoding -----------------------------------------------------------------------
    def decode(self, data: bytes | memoryview) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for each in self.fields:
            out[each.name] = [] if each.repeated else {} if each.kind == MAP else each.default
        pos, end = 0, len(data)
        by_number = self.by_number
        while pos < end:
            key, pos = read_varint(data, pos)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise DecodeError(f"{self.name}: field number 0")
            f = by_number.get(number)
            if wire == _VARINT:
                value, pos = read_varint(data, pos)
                if f is None:
                    continue
                if f.kind == BOOL:
                    scalar: Any = value != 0
                elif f.kind == INT:
                    scalar = _signed(value)
                else:
                    raise DecodeError(f"{self.name}.{f.name}: varint for a {f.kind} field")
                if f.repeated:
                    out[f.name].append(scalar)
                else:
                    out[f.name] = scalar
            elif wire == _LEN:
                size, pos = read_varint(data, pos)
                stop = pos + size
                if stop > end:
                    raise DecodeError(f"{self.name}: field {number} runs past the message")
                if f is not None:
                    chunk = data[pos:stop]
                    if f.kind == STRING:
                        _set(out, f, _text(chunk, self.name, f.name))
                    elif f.kind == MESSAGE:
                        assert f.message is not None
                        _set(out, f, f.message.decode(chunk))
                    elif f.kind == MAP:
                        k, v = _map_entry(chunk, f.message)
                        out[f.name][k] = v
                    elif f.kind == BYTES:
                        _set(out, f, bytes(chunk))
                    elif f.repeated:  # packed varints
                        items, p = out[f.name], 0
                        while p < size:
                            value, p = read_varint(chunk, p)
                            items.append(value != 0 if f.kind == BOOL else _signed(value))
                    else:
                        raise DecodeError(f"{self.name}.{f.name}: length-delimited scalar")
                pos = stop
            elif wire == _I64:
                pos += 8
            elif wire == _I32:
                pos += 4
            else:
                raise DecodeError(f"{self.name}: unsupported wire type {wire}")
            if pos > end:
                raise DecodeError(f"{self.name}: truncated")
        return out


def _len_field(tag: bytes, payload: bytes) -> bytes:
    return tag + varint(len(payload)) + payload


def _put(out: bytearray, f: Field, v: Any, *, always: bool) -> None:
    kind = f.kind
    if kind == STRING:
        if v or always:
            b = v.encode()
            out += f.key_tag
            out += varint(len(b))
            out += b
    elif kind in (INT, BOOL):
        if v or always:
            out += f.key_tag
            out += varint(int(v))
    elif kind == MESSAGE:
        assert f.message is not None
        b = v if isinstance(v, bytes | bytearray) else f.message.encode(v)
        out += f.key_tag
        out += varint(len(b))
        out += b
    elif kind == BYTES and (v or always):
        out += f.key_tag
        out += varint(len(v))
        out += v


def _set(out: dict[str, Any], f: Field, value: Any) -> None:
    if f.repeated:
        out[f.name].append(value)
    else:
        out[f.name] = value


def _text(chunk: bytes | memoryview, message: str, field: str) -> str:
    try:
        return bytes(chunk).decode()
    except UnicodeDecodeError:
        raise DecodeError(f"{message}.{field}: not UTF-8") from None


def _map_entry(chunk: bytes | memoryview, value_schema: Schema | None) -> tuple[str, Any]:
    key, value = "", None
    pos, end = 0, len(chunk)
    while pos < end:
        tag, pos = read_varint(chunk, pos)
        if tag & 7 != _LEN:
            raise DecodeError("map entry: unexpected wire type")
        size, pos = read_varint(chunk, pos)
        part = chunk[pos : pos + size]
        pos += size
        if tag >> 3 == 1:
            key = _text(part, "map", "key")
        elif tag >> 3 == 2:
            value = (
                _text(part, "map", "value") if value_schema is None else value_schema.decode(part)
            )
    if value is None:
        value = "" if value_schema is None else value_schema.decode(b"")
    return key, value
