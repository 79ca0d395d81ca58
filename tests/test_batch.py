"""Batch jobs (--batch/--out/--resume/--strict) and sharing one model between threads."""

import json
import signal
import subprocess
import sys
import threading
import time
from io import StringIO
from pathlib import Path

import pytest
from conftest import DICE
from conftest import EXACT, FEW_SHOT

from spectrum_local.batch import RESULT_FIELDS, run_batch
from spectrum_local.display import Progress

SHARED = "A random fruit, as one lowercase word."
INPUTS = ["red", "yellow", "green", "small", "sour", "tropical", "round", "purple"]


def cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "spectrum_local", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def read_results(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("parallel", [None, 3])
def test_batch_results_equal_single_calls(f32_models, tmp_path, parallel):
    """One line at a time, or three at once through the scheduler (merged decodes): the same
    numbers, in input order."""
    model = f32_models["qwen3"]  # F32: exact on any CPU
    lines = [{"id": f"q{i}", "messages": [{"role": "input", "content": text}]}
             for i, text in enumerate(INPUTS)]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(src, lines)
    shared = [{"role": "description", "content": SHARED}]
    summary = run_batch(model, "score", str(src), str(out), defaults={"candidates": ["apple", "lime"]},
                        shared_messages=shared, resume=False, strict=False, report=print,
                        parallel=parallel, progress=False)
    assert summary.done == len(lines) and not summary.failed
    results = read_results(out)
    assert [r["id"] for r in results] == [line["id"] for line in lines]
    for line, result in zip(lines, results):
        single = model.score(shared + line["messages"], ["apple", "lime"])
        for got, want in zip(result["candidates"], single.candidates):
            assert got["text"] == want.text
            assert got["logprob"] == pytest.approx(want.logprob, abs=EXACT)


def test_malformed_lines_are_reported_and_skipped_or_stop_the_job(model, tmp_path):
    src = tmp_path / "in.jsonl"
    write_lines(src, [{"id": 1, "messages": DICE}, "{oops", {"id": 3, "messages": DICE, "k": 2},
                      {"id": 4, "messages": [{"role": "system", "content": "x"}]},
                      {"id": 1, "messages": DICE}, {"id": 6, "messages": DICE, "k": "3"},
                      {"messages": DICE, "k": 1}])
    reports = []
    summary = run_batch(model, "top", str(src), str(tmp_path / "out.jsonl"), defaults={"k": 5},
                        shared_messages=[], resume=False, strict=False, report=reports.append,
                        progress=False)
    assert sorted(n for n, _ in summary.failed) == [2, 4, 5, 6]
    assert all(f"line {n}:" in " ".join(reports) for n in (2, 4, 5, 6))
    results = read_results(tmp_path / "out.jsonl")
    assert [r["id"] for r in results] == [1, 3, 7]  # a line without id gets its line number
    assert [len(r["tokens"]) for r in results] == [5, 2, 1]
    # --strict: the first bad line stops the job, with its number, through the CLI.
    proc = cli("top", "--batch", str(src), "--out", str(tmp_path / "strict.jsonl"), "--strict")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and b"line 2:" in err and b"Traceback" not in err


def test_byte_order_mark_keeps_the_first_line(model, tmp_path):
    # Windows editors start UTF-8 files with a BOM; it must not cost the first line.
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"id": i, "messages": DICE}) + "\n"
                                                 for i in (1, 2)).encode())
    summary = run_batch(model, "top", str(src), str(tmp_path / "out.jsonl"), defaults={"k": 2},
                        shared_messages=[], resume=False, strict=True, report=print,
                        progress=False)
    assert summary.done == 2 and not summary.failed
    assert [r["id"] for r in read_results(tmp_path / "out.jsonl")] == [1, 2]


def test_existing_output_is_never_overwritten(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(src, [{"messages": DICE, "candidates": "2..3"}])
    out.write_text("precious\n")
    proc = cli("score", "--batch", str(src), "--out", str(out))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and b"--resume" in err
    assert out.read_text() == "precious\n"
    proc = cli("score", "--batch", str(src), "--out", str(tmp_path / "missing" / "out.jsonl"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and b"does not exist" in err


def test_killed_job_resumes_with_no_duplicate_and_no_lost_line(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = [f"job-{i}" for i in range(24)]
    write_lines(src, [{"id": i, "messages": [{"role": "input", "content": f"{i} {t}"}]}
                      for i, t in zip(ids, INPUTS * 3)])
    args = ("sample", "-d", SHARED, "-n", "2", "--max-tokens", "12", "--seed", "1",
            "--batch", str(src), "--out", str(out))
    proc = cli(*args)
    deadline = time.monotonic() + 240
    while (not out.exists() or len(out.read_text().splitlines()) < 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(read_results(out))
    assert 3 <= done_before < len(ids), "the job should have been killed part-way"
    with open(out, "a") as f:
        f.write('{"id": "job-99", "samp')  # a torn line, as a kill in mid-write leaves
    proc = cli(*args, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert f"{done_before} already done" in err.decode()
    results = read_results(out)
    assert sorted(r["id"] for r in results) == sorted(ids)
    assert all(len(r["samples"]) == 2 for r in results)


@pytest.mark.parametrize("args", [
    ("score", "-d", "Count.", "-c", "0..3000"),  # 3001 candidates: longer than the sleep
    ("sample", "-d", "A long story.", "-n", "60", "--max-tokens", "400", "--no-lora"),  # base: never ends
])
def test_ctrl_c_exits_130_promptly(args):
    proc = cli(*args)
    # the note on the default model is printed once it is loaded: the work starts now (an
    # event to wait for, not a number of seconds)
    note = proc.stderr.readline()
    assert note.startswith(b"note: no --model given"), note
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # a process that ignored the Ctrl-C must not outlive its test
    assert proc.returncode == 130, err.decode()
    assert b"interrupted" in err and b"Traceback" not in err
    assert time.monotonic() - start < 10


def test_progress_shows_count_rates_and_eta():
    stream = StringIO()
    with Progress(4, stream=stream) as bar:
        for _ in range(4):
            time.sleep(0.01)
            bar.advance(tokens=12)
    text = stream.getvalue()
    assert "4/4" in text and "req/s" in text and "tok/s" in text and "ETA" in text
    assert bar.tokens == 48


def test_threads_share_one_model(f32_models):
    """8 threads at once on one model give the results of the same calls made one by one (on an
    F32 model, where the cache state each call finds cannot move its numbers)."""
    model = f32_models["llama3"]
    calls = [
        lambda: [c.logprob for c in model.score(DICE, ["3", "7", "11"]).candidates],
        lambda: [t.id for t in model.top(FEW_SHOT, k=5)],
        lambda: [s.text for s in model.sample(FEW_SHOT, n=3, max_tokens=6, seed=9)],
        lambda: [c.logprob for c in model.score(FEW_SHOT, ["kiwi", "fig"]).candidates],
    ]
    expected = [call() for call in calls]
    results, errors = {}, []

    def worker(t):
        try:
            for round_ in range(3):
                i = (t + round_) % len(calls)
                results[(t, round_)] = (i, calls[i]())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for i, got in results.values():
        if isinstance(got[0], float):
            assert got == pytest.approx(expected[i], abs=EXACT)
        else:
            assert got == expected[i]


# Lines whose text is not valid Unicode (JSON's "\ud800" escapes hold lone surrogates), anywhere.
NOT_UNICODE = [{"id": "\ud800", "messages": DICE},
               {"id": "content", "messages": [{"role": "description", "content": "a\udfffb"}]},
               {"id": "prefix", "messages": DICE, "prefix": "\ud800"},
               {"id": "name", "messages": DICE, "\ud800": 1}]


def test_text_that_is_not_unicode_is_a_bad_line(tmp_path):
    """Each such line is reported with its number and skipped (with --strict: the end of the
    job, before the model loads); every good line around them gets its result."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = [{"id": i, "messages": DICE, "k": 2} for i in range(6)]
    write_lines(src, good[:2] + NOT_UNICODE[:2] + good[2:4] + NOT_UNICODE[2:] + good[4:])
    proc = cli("top", "--batch", str(src), "--out", str(out))
    _, err = proc.communicate(timeout=300)
    err = err.decode()
    assert proc.returncode == 0, err
    assert [r["id"] for r in read_results(out)] == list(range(6))
    for number in (3, 4, 7, 8):
        assert f"line {number}: the line" in err and "not valid Unicode" in err
    assert "4 line(s) skipped: 3, 4, 7, 8" in err
    strict = cli("top", "--batch", str(src), "--out", str(tmp_path / "strict.jsonl"), "--strict",
                 "-m", str(tmp_path / "missing.gguf"))
    _, err = strict.communicate(timeout=300)
    assert strict.returncode == 2 and err.decode().count("\n") == 1
    assert "line 3: the line" in err.decode() and "not valid Unicode" in err.decode()
    assert not (tmp_path / "strict.jsonl").exists()  # a job that wrote nothing leaves no file


@pytest.mark.http
def test_text_that_is_not_unicode_is_a_bad_line_with_a_server(f32_server, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": "ok", "messages": DICE, "candidates": ["2", "7"]},
             {"id": "candidate", "messages": DICE, "candidates": ["2", "\udc80"]},
             *[{**line, "candidates": "2..3"} for line in NOT_UNICODE if "prefix" not in line],
             {"id": "ok too", "messages": DICE, "candidates": "7,8"}]
    write_lines(src, lines)
    proc = cli("score", "--batch", str(src), "--out", str(out), "--server", f32_server)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert [r["id"] for r in read_results(out)] == ["ok", "ok too"]
    assert "4 line(s) skipped: 2, 3, 4, 5" in err.decode()


def test_a_line_separator_inside_a_string_is_not_a_line_break(f32_models, tmp_path):
    """JSON strings may hold U+2028 and U+0085 unescaped (json.dumps(ensure_ascii=False) writes
    them so): lines are split at newlines only, in the input and in a resumed output."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": f"a\u2028{i}", "messages": DICE},
                                      ensure_ascii=False) + "\n" for i in range(2)))
    args = dict(defaults={"candidates": ["7\u0085"]}, shared_messages=[], strict=True,
                report=print, progress=False)
    run_batch(f32_models["qwen3"], "score", str(src), str(out), resume=False, **args)
    out.write_text(out.read_text().split("\n")[0] + "\n")  # as if killed after one line
    summary = run_batch(f32_models["qwen3"], "score", str(src), str(out), resume=True, **args)
    assert summary.already == 1 and summary.done == 1
    assert [r["id"] for r in map(json.loads, out.read_text().split("\n")[:-1])] == \
        ["a\u20280", "a\u20281"]


def holds_lock(pid: int, path) -> bool:
    """Whether process ``pid`` holds a flock on ``path``, read from /proc/locks: looking does
    not take the lock (trying to would race with the job)."""
    inode = path.stat().st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()  # "1: FLOCK ADVISORY WRITE <pid> <major:minor:inode> 0 EOF"
        if fields[1] == "FLOCK" and fields[4] == str(pid) and \
                fields[5].split(":")[-1] == str(inode):
            return True
    return False


def wait_for(event, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not event():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="reads Linux's /proc/locks")
def test_a_second_job_on_the_same_output_stops_at_once(tmp_path):
    """The first job locks its output before it reads its input (here stdin, kept open): a
    second job on the same output, with --resume or without, exits 2 at once with one line
    and leaves the file alone; the first then runs in full, each id once."""
    out = tmp_path / "out.jsonl"
    src = tmp_path / "in.jsonl"
    write_lines(src, [{"id": i, "messages": DICE} for i in range(3)])
    first = cli("top", "-k", "2", "--batch", "-", "--out", str(out), "--resume",
                stdin=subprocess.PIPE)
    wait_for(lambda: out.exists() and holds_lock(first.pid, out))
    for resume in (("--resume",), ()):
        second = cli("top", "-k", "2", "--batch", str(src), "--out", str(out), *resume)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2 and err.decode().count("\n") == 1, err.decode()
        assert ("is being written by another job" if resume else "exists") in err.decode()
        assert out.read_bytes() == b""
    _, err = first.communicate(src.read_bytes(), timeout=300)
    assert first.returncode == 0, err.decode()
    assert [r["id"] for r in read_results(out)] == [0, 1, 2]


def test_resume_refuses_the_output_of_another_operation(f32_models, tmp_path):
    """Result lines name neither the model nor the operation; their fields tell the operation
    (RESULT_FIELDS, checked here against real results of each)."""
    src = tmp_path / "in.jsonl"
    write_lines(src, [{"id": 1, "messages": DICE}])
    options = {"score": {"candidates": ["2", "3"]}, "sample": {"max_tokens": 2}, "top": {},
               "enumerate": {"max_tokens": 2, "max_outputs": 2}}
    for operation, fields in RESULT_FIELDS.items():
        out = tmp_path / f"{operation}.jsonl"
        run_batch(f32_models["qwen3"], operation, str(src), str(out),
                  defaults=options[operation], shared_messages=[], resume=False, strict=True,
                  report=print, progress=False)
        assert [set(r) - {"id"} for r in read_results(out)] == [fields]
    before = (tmp_path / "top.jsonl").read_bytes()
    proc = cli("score", "--batch", str(src), "--out", str(tmp_path / "top.jsonl"), "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.decode().count("\n") == 1
    assert "top.jsonl line 1 is a result of top, not of score" in err.decode()
    assert (tmp_path / "top.jsonl").read_bytes() == before
