"""The user's files: reading their text (messages, batch lines, candidates) and checking that
every string is valid Unicode; writing the JSONL results of a job (``open_results``). One place
for stdin, UTF-8, the byte-order mark, lone surrogates, output files and their error messages."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import InputError, SpectrumError

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range locks would also block a resume's reads,
    fcntl = None  # so there a second job on the same output is not detected


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


def check_unicode(value, what: str, _where: str = "") -> None:
    """Refuse text that cannot be encoded as UTF-8, anywhere in ``value`` (a string, or JSON's
    lists and objects): a lone surrogate such as JSON's ``"\\ud800"``, or an undecodable byte
    that Python smuggled into a command-line argument (``-d $'a\\xffb'``). Such text would
    fail later, half-way through a job, in the tokenizer or in a result line. The error names
    the place in ``value``: ``the request body (at messages[0].content)``."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            char = ord(value[e.start])
            found = (f"the byte 0x{char - 0xDC00:02X}, which is not UTF-8"
                     if 0xDC80 <= char <= 0xDCFF else f"a lone surrogate U+{char:04X}")
            at = f" (at {_where.lstrip('.')})" if _where else ""
            raise InputError(f"{what}{at} is not valid Unicode text: it holds {found} "
                             f"(character {e.start + 1})") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key, what, _where)
            check_unicode(item, what, f"{_where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_unicode(item, what, f"{_where}[{index}]")


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text. Split at "\\n" only: ``str.splitlines`` also splits at
    U+2028, U+0085 and other characters that a JSON string may hold unescaped."""
    return text.split("\n")


def parse_json_line(text: str | bytes):
    """One JSONL line's value; anything that is not JSON (nested too deeply for the parser
    included) is an InputError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError):  # bytes that are not UTF-8; "[[[[..." too deep
        raise InputError("not valid JSON") from None


# -- results files ------------------------------------------------------------------------------

def open_results(path: str | os.PathLike, *, resume: bool, source: str | None = None,
                 check: Callable[[int, dict], Any] = lambda number, record: record
                 ) -> "ResultsFile":
    """Open the JSONL output of one job (a batch job, an eval run) for appending, before any
    model loads, and hold an exclusive lock on it until the job ends: a second job on the same
    file stops at once without touching it. Without ``resume`` the file must not exist; with
    it, ``check(line number, record)`` is called on each line already there (a torn last line,
    left by a killed job, is cut off) and ``earlier`` holds what it returns. ``source`` is the
    job's input file, which must not be the output. Each problem is one InputError naming the
    file."""
    name = os.fspath(path)
    if source not in (None, "-") and _same_file(source, name):
        raise InputError(f"--out {name} is the input file {source}; choose another --out")
    if os.path.islink(name) and not os.path.exists(name):
        raise InputError(f"{name} is a symbolic link to {os.readlink(name)}, which does not "
                         "exist")
    existed = os.path.lexists(name)
    if existed and not resume:
        raise InputError(f"{name} exists; pass --resume to continue that job, or choose another "
                         "--out")
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | (0 if resume else os.O_EXCL)
    try:
        fd = os.open(name, flags, 0o666)
    except OSError as e:
        folder = os.path.dirname(os.path.abspath(name))
        if e.errno == errno.ENOENT and not os.path.isdir(folder):
            raise InputError(f"cannot write {name}: the folder {folder} does not exist") \
                from None
        raise InputError(f"cannot write {name}: {e.strerror}") from None
    with contextlib.ExitStack() as cleanup:
        results = cleanup.enter_context(ResultsFile(name, fd, created=not existed))
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):  # a device or a pipe: reading it may never end
            raise InputError(f"{name} is not a regular file; results go to a file")
        _lock(fd, name)
        if not _same_inode(name, opened):
            # The job that held it removed it (it had written nothing) while this one waited.
            raise InputError(f"{name} was removed while this job opened it; run it again")
        if resume:
            results.earlier = _read_records(fd, name, check)
        cleanup.pop_all()
    return results


class ResultsFile:
    """An output open for one job: each ``write`` appends one JSON line and syncs it to disk, so a
    killed job loses at most the line in flight. Closing releases the lock; a job that fails
    before writing anything removes the file it created, so that running it again needs no
    --resume."""

    def __init__(self, name: str, fd: int, created: bool):
        self.name = name
        self.earlier: list = []  # what ``check`` made of the lines already there (resume)
        self.written = 0  # lines written by this job
        self._fd: int | None = fd
        self._created = created
        self._last_id = None

    def write(self, record: dict) -> None:
        data = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        end = os.fstat(self._fd).st_size
        try:
            while data:  # a write may be short (the disk filling up)
                data = data[os.write(self._fd, data):]
            os.fsync(self._fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, end)  # no torn line; resume would cut it off anyway
            done = (f"the last result written is id {json.dumps(self._last_id)}, "
                    f"{self.written} in this run" if self.written else
                    "no result written in this run")
            raise SpectrumError(f"cannot write {self.name}: {e.strerror} ({done}); --resume "
                                "continues the job") from None
        self.written += 1
        self._last_id = record.get("id")

    def close(self, failed: bool = False) -> None:
        if self._fd is None:
            return
        if failed and self._created and not self.written:
            with contextlib.suppress(OSError):
                os.unlink(self.name)  # under the lock: no other job has it open for writing
        os.close(self._fd)  # releases the lock
        self._fd = None

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failed=kind is not None)


def _lock(fd: int, name: str) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InputError(f"{name} is being written by another job; wait for it to end or "
                         "choose another --out") from None
    except OSError:  # a file system without locks (some network mounts): run unguarded
        pass


def _read_records(fd: int, name: str, check: Callable[[int, dict], Any]) -> list:
    """``check`` of each complete line, read one line at a time; a torn last line is cut off
    so that appending starts on a fresh line."""
    kept, complete = [], 0
    with open(fd, "rb", closefd=False) as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.endswith(b"\n"):
                break  # the torn last line
            complete += len(raw)
            try:
                record = parse_json_line(raw)
            except InputError:
                record = None
            if not isinstance(record, dict) or "id" not in record:
                raise InputError(f"{name} line {number} is not a result line; is it the output "
                                 "of an earlier run?")
            kept.append(check(number, record))
    if complete < os.fstat(fd).st_size:
        os.ftruncate(fd, complete)
    return kept


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (or cannot be looked at: the open will say)
        return False


def _same_inode(name: str, opened: os.stat_result) -> bool:
    try:
        here = os.stat(name)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (opened.st_dev, opened.st_ino)
