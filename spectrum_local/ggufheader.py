"""Reading a GGUF file's header (metadata and tensor list) without its data, in plain Python:
the runtime needs it before handing a file to llama.cpp (to refuse what would make llama.cpp
abort), the converter to check what it wrote. The format: GGUF v3, little-endian
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Any

from .errors import InputError

STRING, ARRAY = 8, 9
# The fixed-size value types and their struct formats, by GGUF type number.
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}
DEFAULT_ALIGNMENT = 32
_U64 = struct.Struct("<Q")


def read_header(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple[int, tuple[int, ...], int]], int]:
    """A GGUF's metadata (scalars and strings; arrays as their length), its tensors (ggml type
    number, numpy-order shape, offset in the data section) and where the data section starts.
    Token strings are skipped, not decoded (gguf.GGUFReader builds an object for every one of
    them: seconds on a 150k-token vocabulary). A file that cannot be read, or whose header is
    not a GGUF v3 header, is an InputError naming the file (an InputError is a ValueError)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ValueError("the file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, struct.error, OverflowError) as e:
        # struct.error and OverflowError: a value past the end of the file (or past any file);
        # ValueError: what _parse refused.
        reason = ("the file ends inside its header (truncated?)"
                  if isinstance(e, (struct.error, OverflowError)) else str(e))
        raise InputError(f"{path} is not a valid GGUF file: {reason}") from None


def _parse(buf: mmap.mmap) -> tuple[dict, dict, int]:
    pos = 0

    def unpack(fmt: str) -> tuple:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def string() -> str:
        nonlocal pos
        (n,) = unpack("Q")
        pos += n
        if pos > len(buf):
            raise ValueError("the file ends inside its header (truncated?)")
        try:
            return buf[pos - n:pos].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"a string at byte {pos - n} is not UTF-8") from None

    magic, version, n_tensors, n_kv = unpack("4sIQQ")
    if magic != b"GGUF" or version != 3:
        raise ValueError(f"not a GGUF v3 file (starts with {magic!r}, version {version})")
    fields: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        (vtype,) = unpack("I")
        if vtype == STRING:
            fields[key] = string()
        elif vtype == ARRAY:
            item, count = unpack("IQ")
            if item == STRING:
                for _ in range(count):  # skipped, not decoded
                    pos += 8 + _U64.unpack_from(buf, pos)[0]
            elif item in SCALARS:
                pos += count * struct.calcsize(SCALARS[item])
            else:
                raise ValueError(f"unknown array item type {item} in {key}")
            fields[key] = count
        elif vtype in SCALARS:
            fields[key] = unpack(SCALARS[vtype])[0]
        else:
            raise ValueError(f"unknown value type {vtype} in {key}")
    tensors = {}
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = unpack("I")
        dims = unpack(f"{n_dims}Q")
        ggml_type, offset = unpack("IQ")
        tensors[name] = (ggml_type, tuple(reversed(dims)), offset)
    if len(tensors) != n_tensors:
        raise ValueError("two tensors have the same name")
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment < 1:
        raise ValueError(f"invalid general.alignment {alignment!r}")
    return fields, tensors, -(-pos // alignment) * alignment
