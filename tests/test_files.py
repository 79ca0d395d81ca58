"""The files a job reads and writes: each problem with them is one line naming the file, found
before the model loads; a disk that fills up mid-job leaves a file that --resume continues; a
damaged GGUF header is an InputError. Real files and real `spectrum-local` processes."""

import json
import os
import random
import resource
import signal
import subprocess
import sys

import pytest
from conftest import DICE

from spectrum_local.errors import InputError
from spectrum_local.ggufheader import read_header
from spectrum_local.source import DEFAULT_ADAPTER
from spectrum_local.textfile import open_results

MISSING_MODEL = "/nonexistent/model.gguf"  # reached only after the files are checked
TASK = {"type": "distribution", "messages": DICE, "candidates": ["7", "8"],
        "target_probs": [0.5, 0.5]}


def run(*args, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", "spectrum_local", *map(str, args)],
                          capture_output=True, timeout=300, preexec_fn=preexec_fn)


def one_line_error(proc, code: int = 2) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert err.startswith("Error: ") and err.count("\n") == 1, err
    return err


def commands(source, out):
    """The two commands that write results: a batch job and an eval run."""
    return {"batch": ["top", "--batch", source, "--out", out, "-m", MISSING_MODEL],
            "eval": ["eval", source, "--out", out, "-m", MISSING_MODEL]}


def bad_outputs(tmp_path):
    """(output path, --resume?, what the error says) for each kind of unusable output."""
    (tmp_path / "dangling").symlink_to(tmp_path / "gone" / "out.jsonl")
    (tmp_path / "null").symlink_to(os.devnull)
    (tmp_path / "a-file").write_text("")
    return {
        "missing folder": (tmp_path / "gone" / "out.jsonl", False, "does not exist"),
        "dangling symlink": (tmp_path / "dangling", False, "symbolic link"),
        "dangling symlink, resume": (tmp_path / "dangling", True, "symbolic link"),
        "a file as folder": (tmp_path / "a-file" / "out.jsonl", False, "Not a directory"),
        "device, resume": ("/dev/full", True, "not a regular file"),
        "symlink to a device, resume": (tmp_path / "null", True, "not a regular file"),
        "the input itself, resume": (tmp_path / "in.jsonl", True, "is the input file"),
    }


@pytest.mark.parametrize("command", ["batch", "eval"])
@pytest.mark.parametrize("case", ["missing folder", "dangling symlink",
                                  "dangling symlink, resume", "a file as folder",
                                  "device, resume", "symlink to a device, resume",
                                  "the input itself, resume"])
def test_an_unusable_output_is_one_line_before_the_model_loads(command, case, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({**TASK, "id": 1} if command == "eval"
                                 else {"id": 1, "messages": DICE}) + "\n")
    out, resume, message = bad_outputs(tmp_path)[case]
    before = source.read_bytes()
    proc = run(*commands(source, out)[command], *(["--resume"] if resume else []))
    err = one_line_error(proc)
    assert message in err and str(out) in err
    assert source.read_bytes() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("command", ["batch", "eval"])
def test_a_read_only_folder_is_one_line(command, tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({**TASK, "id": 1}) + "\n")
    err = one_line_error(run(*commands(source, folder / "out.jsonl")[command]))
    assert "Permission denied" in err


@pytest.mark.parametrize("command", ["batch", "eval"])
def test_an_output_being_written_stops_the_second_job(command, tmp_path):
    """The lock as another job holds it (here this test process, through the same code): the
    command exits 2 at once and leaves the file as it was."""
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({**TASK, "id": 1}) + "\n")
    with open_results(out, resume=False) as held:
        held.write({"id": 0, "tokens": []})
        before = out.read_bytes()
        err = one_line_error(run(*commands(source, out)[command], "--resume"))
        assert f"{out} is being written by another job" in err
        assert out.read_bytes() == before


def test_a_job_that_fails_before_writing_leaves_no_output(tmp_path):
    """Its output is created before the model loads; when the model fails to load, the empty
    file goes, so that running the job again needs no --resume."""
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"id": 1, "messages": DICE}) + "\n")
    err = one_line_error(run(*commands(source, out)["batch"]))
    assert "model file not found" in err and not out.exists()


def file_size_limit(limit: int):
    """A disk that fills up, in a child process: writes past ``limit`` bytes fail with EFBIG
    (SIGXFSZ ignored, or it would kill the process)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_mid_job_names_the_last_result_and_resume_finishes(tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = [f"line-{i}" for i in range(16)]
    source.write_text("".join(json.dumps({"id": i, "messages": DICE}) + "\n" for i in ids))
    args = ("top", "-k", "3", "--batch", source, "--out", out)
    proc = run(*args, preexec_fn=file_size_limit(2500))  # room for a few lines, not all
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    error = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "File too large" in error[0] and "--resume" in error[0]
    data = out.read_bytes()
    assert data.endswith(b"\n"), "a torn line was left"
    written = [json.loads(line)["id"] for line in data.splitlines()]
    assert 0 < len(written) < len(ids)
    assert f'the last result written is id "{written[-1]}", {len(written)} in this run' in error[0]
    proc = run(*args, "--resume")
    assert proc.returncode == 0, proc.stderr.decode()
    assert [json.loads(line)["id"] for line in out.read_bytes().splitlines()] == ids


def header_size(path) -> int:
    return read_header(path)[2]


def test_every_truncation_of_a_gguf_header_is_an_input_error(tmp_path):
    """Cut anywhere inside its header, the demo adapter is an InputError naming the file,
    never struct's error or any other."""
    data = DEFAULT_ADAPTER.read_bytes()
    end = header_size(DEFAULT_ADAPTER)
    path = tmp_path / "cut.gguf"
    parsed = 0
    for size in sorted({*range(0, 64), *range(64, end, 37), end - 1}):
        path.write_bytes(data[:size])
        try:
            read_header(path)
            parsed += 1
        except InputError as e:
            assert str(path) in str(e)
    assert parsed <= 32  # only cuts in the padding after the last tensor parse


def test_damaged_gguf_headers_parse_or_are_input_errors(tmp_path):
    """Random bytes changed in the header: it parses, or is an InputError naming the file."""
    data = DEFAULT_ADAPTER.read_bytes()
    end = header_size(DEFAULT_ADAPTER)
    rng = random.Random(21)
    path = tmp_path / "damaged.gguf"
    refused = 0
    for _ in range(500):
        damaged = bytearray(data[:end + 64])
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(end)] = rng.randrange(256)
        path.write_bytes(damaged)
        try:
            read_header(path)
        except InputError as e:
            assert str(path) in str(e)
            refused += 1
    assert refused > 100


@pytest.mark.parametrize("size", [0, 100, 5000])
def test_lora_with_a_damaged_file_is_one_line(size, tmp_path):
    adapter = tmp_path / "adapter.gguf"
    adapter.write_bytes(DEFAULT_ADAPTER.read_bytes()[:size])
    err = one_line_error(run("top", "-d", "x", "--no-lora", "--lora", adapter))
    assert str(adapter) in err and "GGUF" in err
