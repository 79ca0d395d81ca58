"""Reading the user's text files (messages, batch lines, candidates): one place for stdin,
UTF-8, the byte-order mark and the error messages."""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import InputError


def read_text(path: str | Path, what: str) -> str:
    """The text of ``path`` (``-`` for stdin), UTF-8 with or without a byte-order mark (Windows
    editors write one; it is not part of the content). ``what`` names the file in errors."""
    name = "stdin" if str(path) == "-" else str(path)
    try:
        data = sys.stdin.buffer.read() if str(path) == "-" else Path(path).read_bytes()
        return data.decode("utf-8-sig")
    except OSError as e:
        raise InputError(f"cannot read {what} {name}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} {name} is not UTF-8 text") from None
