import pytest
from hypothesis import given
from hypothesis import strategies as st

from spectrum_local import InputError
from spectrum_local.candidates import MAX_RANGE, collect, parse_range, parse_spec


def test_ranges_and_lists():
    assert parse_spec("2..12") == [str(n) for n in range(2, 13)]
    assert parse_spec("0..100..10") == [str(n) for n in range(0, 101, 10)]
    assert parse_spec("-2..1") == ["-2", "-1", "0", "1"]
    assert parse_spec("Fred,John") == ["Fred", "John"]
    assert parse_spec(" a b ") == [" a b "]
    assert collect(["1..2", "x,y"]) == ["1", "2", "x", "y"]


@pytest.mark.parametrize("spec,match", [
    ("12..2", "smaller than the start"), ("a..b", "whole numbers"), ("1..", "whole numbers"),
    ("1..5..0", "whole numbers|positive"), (f"0..{MAX_RANGE}", "limit"),
])
def test_bad_ranges(spec, match):
    with pytest.raises(InputError, match=match):
        parse_spec(spec)


@given(st.integers(-1000, 1000), st.integers(0, 2000), st.integers(1, 50))
def test_range_property(start, length, step):
    end = start + length
    values = [int(v) for v in parse_range(f"{start}..{end}..{step}")]
    assert values[0] == start and values[-1] <= end < values[-1] + step
    assert all(b - a == step for a, b in zip(values, values[1:]))


def test_file_keeps_lines_exactly(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text(" leading\ntrailing \n\nwith, comma\r\nlast", encoding="utf-8")
    assert collect(files=[f]) == [" leading", "trailing ", "with, comma", "last"]
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeff7\n8\n".encode())  # a Windows editor's byte-order mark is not content
    assert collect(files=[bom]) == ["7", "8"]
    with pytest.raises(InputError, match="cannot read"):
        collect(files=[tmp_path / "missing.txt"])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(InputError, match="UTF-8"):
        collect(files=[bad])
