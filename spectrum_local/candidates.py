"""Candidate sets from the command line: ranges, comma lists and files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from .errors import InputError
from .textfile import check_unicode, read_text

MAX_RANGE = 10_000  # a range larger than this is almost surely a typo
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?$")


def parse_range(spec: str) -> list[str]:
    """``"2..12"`` -> 2, 3, ..., 12 (inclusive); ``"0..100..10"`` -> 0, 10, ..., 100."""
    m = _RANGE.match(spec.strip())
    if not m:
        raise InputError(f"invalid range {spec!r}: write START..END or START..END..STEP "
                         "with whole numbers, e.g. 2..12 or 0..100..10")
    start, end = int(m[1]), int(m[2])
    step = int(m[3]) if m[3] else 1
    if step <= 0:
        raise InputError(f"invalid range {spec!r}: the step must be positive")
    if end < start:
        raise InputError(f"invalid range {spec!r}: the end is smaller than the start")
    count = (end - start) // step + 1
    if count > MAX_RANGE:
        raise InputError(f"range {spec!r} has {count} values; the limit is {MAX_RANGE}")
    return [str(v) for v in range(start, end + 1, step)]


def parse_spec(spec: str) -> list[str]:
    """One ``--candidates`` value: a range (anything holding ``..`` and no comma) or a comma
    list. Use a file for candidates that contain commas or ``..``."""
    if ".." in spec and "," not in spec:
        return parse_range(spec)
    return spec.split(",")


def resolve(value) -> list[str]:
    """Candidates as a JSON body gives them (a batch line, an HTTP request): a list of strings,
    or one spec string such as "2..12" or "a,b,c"."""
    if isinstance(value, str):
        value = parse_spec(value)
    if not isinstance(value, list) or not value:
        raise InputError('"candidates" must be a non-empty list of strings or a spec like "2..12"')
    check_unicode(value, "a candidate")
    return value


def read_file(path: str | Path) -> list[str]:
    """One candidate per line, kept exactly (spaces included); blank lines are skipped."""
    text = read_text(path, "candidates file")
    return [line for line in text.splitlines() if line != ""]


def collect(specs: Iterable[str] = (), files: Iterable[str | Path] = ()) -> list[str]:
    candidates = [c for spec in specs for c in parse_spec(spec)]
    candidates += [c for f in files for c in read_file(f)]
    check_unicode(candidates, "a candidate")
    return candidates
