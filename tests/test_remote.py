"""``--server`` and ``spectrum_local.connect`` against a real ``spectrum-local serve`` on
loopback: the operations give what the local engine gives (exactly on an F32 model, within the
quantized noise on the default model), and batch jobs survive servers that die: they retry,
resume, spread over replicas, and write every id exactly once, in input order.
(The vLLM half of the remote backend is checked against a real vLLM in test_vllm.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import scipy.stats
from conftest import DICE, EXACT, FEW_SHOT, SERVED_FAMILY
from servers import free_port, running_server, serve_command, serve_env, start, stop

import spectrum_local
from spectrum_local import InputError
from spectrum_local.remote import ServedModel

pytestmark = pytest.mark.http

FAMILY = SERVED_FAMILY
CLI = [sys.executable, "-m", "spectrum_local"]


@pytest.fixture(scope="module")
def served(f32_server):
    model = spectrum_local.connect(f32_server)
    yield model
    model.close()


def test_connect_recognises_serve_and_says_what_it_serves(served, f32):
    assert isinstance(served, ServedModel)
    # the served name (the file name without .gguf): the server shows no local path
    assert served.path == f32[FAMILY].stem and served.format == FAMILY
    info = served.info()
    assert info["server"] == [served.client.replicas[0].url] and info["format"] == FAMILY


@pytest.mark.parametrize("messages, candidates", [
    (DICE, [str(n) for n in range(2, 13)]),
    (FEW_SHOT, ["banana", "kiwi", "dragon fruit", " apple", "\n\nfig"]),
    ([{"role": "description", "content": "Say <|im_end|> or not"}], ["<|im_end|>", "no"]),
])
def test_score_through_the_server_equals_the_local_engine(served, reference, messages,
                                                          candidates):
    got, want = served.score(messages, candidates), reference.score(messages, candidates)
    assert [c.text for c in got.candidates] == [c.text for c in want.candidates]
    for g, w in zip(got.candidates, want.candidates):
        assert g.logprob == pytest.approx(w.logprob, abs=EXACT)
        assert g.n_tokens == w.n_tokens
    assert got.coverage == pytest.approx(want.coverage, rel=1e-2)


def test_top_and_seeded_samples_equal_the_local_engine(served, reference):
    got, want = served.top(FEW_SHOT, k=8, prefix="ch"), reference.top(FEW_SHOT, k=8, prefix="ch")
    assert [t.id for t in got] == [t.id for t in want]
    assert [t.logprob for t in got] == pytest.approx([t.logprob for t in want], abs=EXACT)
    assert served.sample(FEW_SHOT, n=4, max_tokens=6, seed=5) == \
        reference.sample(FEW_SHOT, n=4, max_tokens=6, seed=5)


def test_the_cli_prints_the_same_json_with_server(f32_server, f32):
    args = ["score", "-d", "Roll a die", "-c", "1..6", "--json"]
    local = subprocess.run([*CLI, *args, "--model", str(f32[FAMILY])], capture_output=True,
                           text=True, check=True)
    remote = subprocess.run([*CLI, *args, "--server", f32_server], capture_output=True, text=True,
                            check=True)
    want, got = json.loads(local.stdout), json.loads(remote.stdout)
    # the server names its model by its served name: the file name without .gguf
    assert got["model"] == Path(want["model"]).stem and got["format"] == want["format"]
    assert [c["logprob"] for c in got["candidates"]] == \
        pytest.approx([c["logprob"] for c in want["candidates"]], abs=EXACT)


def test_quantized_model_through_the_server(model, layout_bound):
    """On the default model: scores within the batch-layout noise, and one-token samples whose
    frequencies fit the top tokens' probabilities (chi-squared over the likely tokens)."""
    with running_server(["--ctx", "2048"]) as url:
        served = spectrum_local.connect(url)
        candidates = [str(n) for n in range(2, 13)]
        got, want = served.score(DICE, candidates), model.score(DICE, candidates)
        for g, w in zip(got.candidates, want.candidates):
            assert g.logprob == pytest.approx(w.logprob, abs=layout_bound)

        prompt = [{"role": "description", "content": "A random capital letter."}]
        top = served.top(prompt, k=20)
        samples = served.sample(prompt, n=600, max_tokens=1, seed=3)
        served.close()
    counts: dict[int, int] = {}
    by_text = {t.token if t.token != "<end_of_turn>" else "": t.id for t in top}
    for s in samples:
        token = by_text.get(s.text)
        counts[token] = counts.get(token, 0) + 1  # None: a token outside the top 20
    likely = [t for t in top if t.prob * len(samples) >= 5]
    observed = [counts.get(t.id, 0) for t in likely]
    expected = [t.prob * len(samples) for t in likely]
    observed.append(len(samples) - sum(observed))
    expected.append(len(samples) - sum(expected))
    assert scipy.stats.chisquare(observed, expected).pvalue > 1e-4, (observed, expected)


def test_a_refused_request_is_an_input_error(served):
    with pytest.raises(InputError, match="422|400"):
        served.top(DICE, k=5000)
    with pytest.raises(InputError, match="empty"):
        served.score(DICE, ["1", ""])


def test_bad_urls_and_options_are_one_line_errors(f32_server, f32):
    port = free_port()
    for args, code, wording in [
        (["--server", f"http://127.0.0.1:{port}"], 1, "cannot reach"),
        (["--server", "localhost:8717"], 2, "http://"),
        (["--server", f32_server, "--model", str(f32[FAMILY])], 2, "--model"),
        (["--tokenizer", "x"], 2, "--tokenizer goes with --server"),
        (["--server", f32_server, "--tokenizer", "x"], 2, "vLLM"),
        (["--server", f32_server, "--parallel", "4"], 2, "--parallel"),
    ]:
        run = subprocess.run([*CLI, "top", "-d", "x", *args], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == code, (args, run.stderr)
        assert wording in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)


def test_an_api_key_is_sent_from_the_option_or_the_environment(f32):
    with running_server(["--model", str(f32[FAMILY])], api_key="s3cret") as url:
        env = {k: v for k, v in os.environ.items() if k != "SPECTRUM_LOCAL_API_KEY"}
        args = [*CLI, "top", "-d", "x", "-k", "2", "--server", url]
        missing = subprocess.run(args, capture_output=True, text=True, env=env)
        assert missing.returncode == 2 and "--api-key" in missing.stderr
        wrong = subprocess.run([*args, "--api-key", "nope"], capture_output=True, text=True,
                               env=env)
        assert wrong.returncode == 2 and "refused" in wrong.stderr
        right = subprocess.run(args, capture_output=True, text=True,
                               env={**env, "SPECTRUM_LOCAL_API_KEY": "s3cret"})
        assert right.returncode == 0, right.stderr


# -- batch jobs ---------------------------------------------------------------------------

LINES = 120


def write_batch(folder: Path) -> Path:
    path = folder / "in.jsonl"
    with open(path, "w") as f:
        for i in range(LINES):
            f.write(json.dumps({"id": f"q{i}", "messages": [
                {"role": "description", "content": f"Pick a number from 1 to {i % 9 + 2}."}],
                "candidates": "1..6"}) + "\n")
        # refused by the server (400): longer than its context
        f.write(json.dumps({"id": "long", "messages": [
            {"role": "description", "content": "word " * 3000}], "candidates": "1..6"}) + "\n")
    return path


def reference_scores(reference) -> dict[str, list[float]]:
    return {f"q{i}": [c.logprob for c in reference.score(
        [{"role": "description", "content": f"Pick a number from 1 to {i % 9 + 2}."}],
        [str(n) for n in range(1, 7)]).candidates] for i in range(LINES)}


def check_output(out: Path, want: dict[str, list[float]]) -> None:
    """Every id exactly once, in input order, each with the local engine's numbers."""
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == list(want)
    for r in records:
        assert [c["logprob"] for c in r["candidates"]] == pytest.approx(want[r["id"]], abs=EXACT)


def batch_command(source: Path, out: Path, urls: list[str], *extra: str) -> list[str]:
    servers = [arg for url in urls for arg in ("--server", url)]
    return [*CLI, "score", "--batch", str(source), "--out", str(out), *servers, *extra]


def wait_for_lines(out: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (out.exists() and out.read_text().count("\n") >= count):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.05)


def test_a_batch_job_retries_while_its_server_restarts(f32, reference, tmp_path):
    """The server is killed (SIGKILL, as in a crash) half-way and started again on the same
    port: the job waits, retries, and finishes with every id once and the refused line
    reported by its number."""
    port = free_port()
    command = serve_command(["--model", str(f32[FAMILY]), "--ctx", "1024"], port)
    server = start(command, port, "/health", env=serve_env())
    source, out = write_batch(tmp_path), tmp_path / "out.jsonl"
    job = subprocess.Popen(batch_command(source, out, [f"http://127.0.0.1:{port}"]),
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lines(out, LINES // 3, job)
        stop(server, signal.SIGKILL)
        time.sleep(1)
        server = start(command, port, "/health", env=serve_env())
        _, err = job.communicate(timeout=300)
    finally:
        stop(server)
        job.kill()
    assert job.returncode == 0, err
    assert "trying again" in err and f"line {LINES + 1}" in err and "refused" in err
    check_output(out, reference_scores(reference))


def test_a_killed_batch_job_resumes_exactly(f32_server, reference, tmp_path):
    source, out = write_batch(tmp_path), tmp_path / "out.jsonl"
    job = subprocess.Popen(batch_command(source, out, [f32_server], "--parallel", "8"),
                           stderr=subprocess.PIPE)
    wait_for_lines(out, LINES // 3, job)
    job.kill()
    job.wait()
    done = out.read_text().count("\n")
    assert LINES // 3 <= done < LINES
    finish = subprocess.run(batch_command(source, out, [f32_server], "--resume"),
                            capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr
    assert f"{done} already done" in finish.stderr
    check_output(out, reference_scores(reference))


def test_replicas_share_a_job_and_one_dying_does_not_stop_it(f32, reference, tmp_path):
    ports = [free_port(), free_port()]
    servers = [start(serve_command(["--model", str(f32[FAMILY]), "--ctx", "1024"], port),
                     port, "/health", env=serve_env()) for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    source, out = write_batch(tmp_path), tmp_path / "out.jsonl"
    job = subprocess.Popen(batch_command(source, out, urls, "--parallel", "4"),
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lines(out, LINES // 3, job)
        stop(servers[0], signal.SIGKILL)
        _, err = job.communicate(timeout=300)
    finally:
        for server in servers:
            stop(server)
        job.kill()
    assert job.returncode == 0, err
    check_output(out, reference_scores(reference))
    answered = dict(part.rsplit(" ", 1) for part in
                    err.split("requests answered: ")[1].strip().split(", "))
    assert int(answered[urls[0]]) >= 10 and int(answered[urls[1]]) >= LINES // 2, err
