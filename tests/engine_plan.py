"""Reading the LynxMoE plugin fields that TensorRT serialised into an engine plan, with no GPU.

Deserialising a plan needs a GPU, so the tests read the plugin records out of the plan's bytes.
TensorRT writes each plugin field as: its name, the element count, the type's name, then the
data as a length-prefixed byte string (CHAR fields as a string record).
"""

from __future__ import annotations

import re
import struct

import numpy as np

_STRING = rb"\x13\x80\x01\x00(.{8})\x01\x80\x0c\x80\x01\x00.{8}"
_DATA = rb"\x01\x80\x03\x80\x01\x00(.{8})"
_TYPES = {b"INT32": np.int32, b"FP32": np.float32}


def plugin_fields(plan: bytes, names: tuple[str, ...]) -> list[dict[str, object]]:
    """One dict per serialised plugin instance: field name -> value (int, float or str)."""
    found: dict[str, list[object]] = {}
    for name in names:
        # The name's own length prefix keeps "alpha" from matching inside "activation_alpha".
        pattern = re.escape(b"\x01\x80\x0c\x80\x01\x00" + struct.pack("<q", len(name)) + name.encode()) + rb"\x07\x80\x01\x00(.{4})" + _STRING
        values = []
        for match in re.finditer(pattern, plan, re.DOTALL):
            type_len = struct.unpack("<q", match.group(2))[0]
            type_name = plan[match.end(): match.end() + type_len]
            rest = match.end() + type_len
            if type_name == b"CHAR":
                string = re.compile(_STRING, re.DOTALL).match(plan, rest)
                length = struct.unpack("<q", string.group(1))[0]
                values.append(plan[string.end(): string.end() + length].split(b"\0", 1)[0].decode())
            else:
                data = re.compile(_DATA, re.DOTALL).match(plan, rest)
                nbytes = struct.unpack("<q", data.group(1))[0]
                values.append(np.frombuffer(plan[data.end(): data.end() + nbytes], _TYPES[type_name])[0].item())
        found[name] = values
    count = len(found[names[0]])
    assert all(len(v) == count for v in found.values()), {k: len(v) for k, v in found.items()}
    return [{name: found[name][i] for name in names} for i in range(count)]
