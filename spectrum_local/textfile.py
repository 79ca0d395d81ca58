"""The user's text: reading their files (messages, batch lines, candidates) and checking that
every string is valid Unicode. One place for stdin, UTF-8, the byte-order mark, lone
surrogates and the error messages."""

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


def check_unicode(value, what: str) -> None:
    """Refuse text that cannot be encoded as UTF-8, anywhere in ``value`` (a string, or JSON's
    lists and objects): a lone surrogate such as JSON's ``"\\ud800"``, or an undecodable byte
    that Python smuggled into a command-line argument (``-d $'a\\xffb'``). Such text would
    fail later, half-way through a job, in the tokenizer or in a result line."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            char = ord(value[e.start])
            found = (f"the byte 0x{char - 0xDC00:02X}, which is not UTF-8"
                     if 0xDC80 <= char <= 0xDCFF else f"a lone surrogate U+{char:04X}")
            raise InputError(f"{what} is not valid Unicode text: it holds {found} (character "
                             f"{e.start + 1})") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key, what)
            check_unicode(item, what)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_unicode(item, what)
