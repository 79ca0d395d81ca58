"""``spectrum-local serve``: a real server in a subprocess on loopback, real models, real HTTP
clients. The native endpoints must give what the Python API gives (exactly, up to float noise,
on an F32 model; within the batch-layout noise measured in this run on the quantized one),
under concurrency, and bad requests must get 4xx JSON errors, never a 5xx or a dead server."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import DICE, EXACT, FEW_SHOT, PROMPTS, SERVED_FAMILY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import free_port, running_server, serve_command, serve_env, start, stop

import spectrum_local

pytestmark = pytest.mark.http  # the HTTP layer: run once by `make test`, not per CPU setting

FAMILY = SERVED_FAMILY
STRESS_SECONDS = float(os.environ.get("SPECTRUM_LOCAL_STRESS_SECONDS", 60))


def post(url: str, route: str, body, **kwargs) -> httpx.Response:
    """The answer, however long a loaded machine takes to give it (no timeout: a test that
    waits for an answer has nothing else to do; a server that never answers fails the run)."""
    return httpx.post(url + route, json=body, **{"timeout": None, **kwargs})


def get(url: str, **kwargs) -> httpx.Response:
    return httpx.get(url, **{"timeout": None, **kwargs})


def load(url: str) -> dict:
    """What the server's engine is doing: live_samples, queued_reads, tokens_evaluated."""
    return httpx.get(url + "/spectrum/v1/info", timeout=None).json()["load"]


def wait_for(condition, what: str, cap: float = 600):
    """Poll ``condition()`` until it is true (returned); ``cap`` seconds only bound a server
    that never gets there, whatever the machine's load."""
    deadline = time.monotonic() + cap
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what}: not after {cap:g} s"
        time.sleep(0.1)
    return result


def wait_idle(url: str) -> int:
    """The engine's tokens_evaluated once it has stopped: nothing queued or live, and no token
    evaluated between two looks a second apart (a read in progress decodes many per second)."""
    seen = {}

    def idle() -> bool:
        before = load(url)
        time.sleep(1)
        seen.update(load(url))
        quiet = not (seen["live_samples"] or seen["queued_reads"] or seen["queued_jobs"])
        return quiet and seen["tokens_evaluated"] == before["tokens_evaluated"]

    wait_for(idle, "the engine idle")
    return seen["tokens_evaluated"]


def assert_error(response: httpx.Response, status: int, match: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type"} and match in error["message"], error


def assert_same_score(got: dict, want, bound: float) -> None:
    assert [c["text"] for c in got["candidates"]] == [c.text for c in want.candidates]
    for c, w in zip(got["candidates"], want.candidates):
        assert c["logprob"] == pytest.approx(w.logprob, abs=bound)
        assert c["n_tokens"] == w.n_tokens


# --- the native endpoints are the Python API ------------------------------------------------

@pytest.mark.parametrize("prompt", PROMPTS)
def test_score_equals_the_api(f32_server, reference, prompt):
    messages, candidates = PROMPTS[prompt]
    got = post(f32_server, "/spectrum/v1/score", {"messages": messages, "candidates": candidates})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["model"] == Path(reference.path).stem and body["format"] == FAMILY
    want = reference.score(messages, candidates)
    assert_same_score(body, want, EXACT)
    assert body["coverage"] == pytest.approx(want.coverage, rel=1e-2)


def test_score_without_the_end_token_equals_the_api(f32_server, reference):
    body = {"messages": DICE, "candidates": ["7", "12"], "end_token": False}
    got = post(f32_server, "/spectrum/v1/score", body).json()
    assert_same_score(got, reference.score(DICE, ["7", "12"], end_token=False), EXACT)


def test_a_candidate_spec_is_expanded_as_on_the_command_line(f32_server, reference):
    got = post(f32_server, "/spectrum/v1/score", {"messages": DICE, "candidates": "2..12"}).json()
    assert [c["text"] for c in got["candidates"]] == [str(n) for n in range(2, 13)]


def test_top_and_sample_equal_the_api(f32_server, reference):
    got = post(f32_server, "/spectrum/v1/top", {"messages": FEW_SHOT, "k": 5}).json()["tokens"]
    want = reference.top(FEW_SHOT, 5)
    assert [t["id"] for t in got] == [t.id for t in want]
    assert [t["token"] for t in got] == [t.token for t in want]
    for t, w in zip(got, want):
        assert t["logprob"] == pytest.approx(w.logprob, abs=EXACT)
    body = {"messages": FEW_SHOT, "n": 4, "max_tokens": 12, "seed": 5}
    got = post(f32_server, "/spectrum/v1/sample", body).json()["samples"]
    want = reference.sample(FEW_SHOT, n=4, max_tokens=12, seed=5)
    assert got == [s.to_dict() for s in want]


def test_enumerate_equals_the_api_over_http_and_through_the_client(f32_server, reference):
    options = {"coverage": 0.5, "max_outputs": 20, "max_tokens": 3}
    got = post(f32_server, "/spectrum/v1/enumerate", {"messages": FEW_SHOT, **options})
    assert got.status_code == 200, got.text
    body = got.json()
    want = reference.enumerate(FEW_SHOT, **options)
    assert body["model"] == Path(reference.path).stem and body["stopped"] == want.stopped
    assert body["decoded"] == want.decoded
    served = spectrum_local.connect(f32_server)
    through = served.enumerate(FEW_SHOT, **options)
    served.close()
    for outputs in (body["outputs"], [o.to_dict() for o in through.outputs]):
        assert [o["text"] for o in outputs] == [o.text for o in want.outputs]
        for o, w in zip(outputs, want.outputs):
            assert o["logprob"] == pytest.approx(w.logprob, abs=EXACT)
            assert o["n_tokens"] == w.n_tokens


def test_info_is_the_cli_info_plus_the_prompt_format(f32_server, f32):
    info = get(f32_server + "/spectrum/v1/info").json()
    cli = subprocess.run([sys.executable, "-m", "spectrum_local", "info", "--json", "--model",
                          str(f32[FAMILY]), "--ctx", "1024"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    local = json.loads(cli.stdout)
    # the model by its served name, never a local path (that is for a server with a key)
    assert info["model"] == f32[FAMILY].stem and "path" not in info
    assert str(f32[FAMILY].parent) not in json.dumps(info)
    assert {k: v for k, v in info.items() if k not in ("prompt_format", "load", "model")} \
        == {k: v for k, v in local.items() if k != "model"}
    assert info["prompt_format"]["end_of_output"] == "<|im_end|>"
    assert info["prompt_format"]["generation_prompt"] == "<|im_start|>output\n"


def test_streamed_samples_are_the_same_samples(f32_server):
    body = {"messages": FEW_SHOT, "n": 5, "max_tokens": 10, "seed": 21}
    whole = post(f32_server, "/spectrum/v1/sample", body).json()["samples"]
    with httpx.stream("POST", f32_server + "/spectrum/v1/sample", json={**body, "stream": True},
                      timeout=None) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert sorted(e["index"] for e in events) == list(range(5))
    for e in events:
        assert {k: e[k] for k in ("text", "n_tokens", "finish_reason")} == whole[e["index"]]


def test_quantized_score_over_http_is_within_the_layout_noise(model, layout_bound):
    # The default model, in a server that merges this request with nothing: what differs from
    # the in-process call is the batch layout alone (measured in this run, see conftest).
    with running_server(["--ctx", "2048"]) as url:
        for messages, candidates in PROMPTS.values():
            got = post(url, "/spectrum/v1/score", {"messages": messages, "candidates": candidates})
            assert_same_score(got.json(), model.score(messages, candidates), layout_bound)
        # vLLM's prompt_logprobs of prompt + candidate + end-of-output, summed over the
        # candidate's tokens, is the score (one sequence instead of a trie: another layout).
        prompt = model.prompt_tokens(DICE)
        for c in model.score(DICE, ["2", "7", "12"]).candidates:
            tokens = prompt + model.engine.tokenize(c.text) + [model.end_of_output_id]
            body = {"prompt": tokens, "max_tokens": 1, "prompt_logprobs": 0}
            positions = post(url, "/v1/completions", body).json()["choices"][0]["prompt_logprobs"]
            summed = sum(positions[i][str(tokens[i])]["logprob"]
                         for i in range(len(prompt), len(tokens)))
            assert summed == pytest.approx(c.logprob, abs=layout_bound)


# --- many clients at once ---------------------------------------------------------------------

def test_32_concurrent_clients_get_their_own_answers(f32_server, reference, capsys):
    """Mixed score/top/sample requests from 32 clients for a minute: every one answered, no
    error, and every answer is the in-process answer to its own request (requests differ in
    prompt, candidates, k and seed, so a mix-up between merged requests shows)."""
    prompts = [FEW_SHOT + [{"role": "input", "content": word}]
               for word in ("red", "sweet", "tropical", "small", "green", "sour")] + [DICE]
    requests = []
    for i, messages in enumerate(prompts):
        requests += [
            ("/spectrum/v1/score", {"messages": messages, "candidates": ["apple", "kiwi", str(i)]}),
            ("/spectrum/v1/top", {"messages": messages, "k": 2 + i}),
            ("/spectrum/v1/sample", {"messages": messages, "n": 1 + i % 3, "max_tokens": 8,
                                     "seed": 100 + i}),
        ]
    expected = [_in_process(reference, route, body) for route, body in requests]
    latencies, failures, lock = [], [], threading.Lock()
    deadline = time.monotonic() + STRESS_SECONDS

    def client(seed: int) -> int:
        rng, done = random.Random(seed), 0
        with httpx.Client(base_url=f32_server, timeout=None) as http:
            while time.monotonic() < deadline:
                k = rng.randrange(len(requests))
                start = time.monotonic()
                try:
                    response = http.post(requests[k][0], json=requests[k][1])
                    problem = _mismatch(response, expected[k])
                except httpx.HTTPError as e:
                    problem = f"{type(e).__name__}: {e}"
                with lock:
                    latencies.append(time.monotonic() - start)
                    if problem:
                        failures.append((requests[k], problem))
                done += 1
        return done

    with ThreadPoolExecutor(32) as pool:
        answered = sum(pool.map(client, range(32)))
    assert not failures, failures[:3]
    assert answered == len(latencies) > 32
    cuts = statistics.quantiles(latencies, n=100)
    with capsys.disabled():
        print(f"\n32 clients, {STRESS_SECONDS:.0f} s: {answered} requests, 0 errors, "
              f"latency p50 {cuts[49] * 1000:.0f} ms, p99 {cuts[98] * 1000:.0f} ms")


def _in_process(model, route: str, body: dict):
    if route.endswith("score"):
        return model.score(body["messages"], body["candidates"])
    if route.endswith("top"):
        return model.top(body["messages"], body["k"])
    return model.sample(body["messages"], n=body["n"], max_tokens=body["max_tokens"],
                        seed=body["seed"])


def _mismatch(response: httpx.Response, want) -> str | None:
    if response.status_code != 200:
        return f"{response.status_code}: {response.text[:200]}"
    got = response.json()
    if "candidates" in got:
        same = [c["text"] for c in got["candidates"]] == [c.text for c in want.candidates] and \
            all(abs(c["logprob"] - w.logprob) <= EXACT for c, w in zip(got["candidates"],
                                                                       want.candidates))
    elif "tokens" in got:
        same = len(got["tokens"]) == len(want) and all(
            abs(t["logprob"] - w.logprob) <= EXACT for t, w in zip(got["tokens"], want))
    else:
        same = got["samples"] == [s.to_dict() for s in want]
    return None if same else f"different answer: {json.dumps(got)[:300]}"


def test_a_client_that_disconnects_frees_its_samples(model):
    with running_server(["--ctx", "2048", "--no-lora"]) as url:  # the base never ends
        body = {"messages": FEW_SHOT, "n": 8, "max_tokens": 1000, "temperature": 1.0}
        with hung_up(url, "/spectrum/v1/sample", body):
            wait_for(lambda: load(url)["live_samples"], "the samples running")
        # 8 x 1000 tokens would take minutes on a CPU: they stop at their next step instead
        wait_for(lambda: load(url)["live_samples"] == 0, "the samples freed")
        ok = post(url, "/spectrum/v1/score", {"messages": DICE, "candidates": "2..4"})
        assert ok.status_code == 200


# 10,000 candidates of about 10 tokens each: some 100,000 tokens to evaluate, as the budget
# of the enumerate (the search's trie on a random model is as wide).
MANY = [f"{i} apples, {i} pears" for i in range(10_000)]


@pytest.mark.parametrize("route, body", [
    ("/spectrum/v1/score", {"messages": FEW_SHOT, "candidates": MANY}),
    ("/spectrum/v1/enumerate", {"messages": FEW_SHOT, "coverage": 1, "max_outputs": 1000,
                                "max_tokens": 256, "max_decoded": 100_000}),
])
def test_a_read_whose_client_disconnects_stops(f32_server, route, body):
    """Reads stop too when their client goes away, between decodes: the engine goes idle
    having evaluated a small part of the 100,000 tokens the whole request needs (minutes on
    a CPU), and serves the next request."""
    before = wait_idle(f32_server)  # whatever an earlier test left running
    with hung_up(f32_server, route, body):
        wait_for(lambda: load(f32_server)["tokens_evaluated"] > before, "the read running")
    spent = wait_idle(f32_server) - before
    assert spent < 25_000, f"{spent} tokens evaluated: the read went on without its client"
    ok = post(f32_server, "/spectrum/v1/score", {"messages": DICE, "candidates": "2..4"})
    assert ok.status_code == 200


def test_finish_reasons(f32_server, reference):
    """max_tokens reached: "length"; a stop string (OpenAI route): "stop"; natively the
    end-of-output token: "stop" (what a cancel ends with, "abort", is tested with a shutdown
    below: a client that went away reads nothing)."""
    body = {"messages": FEW_SHOT, "n": 6, "max_tokens": 3, "seed": 8}
    samples = post(f32_server, "/spectrum/v1/sample", body).json()["samples"]
    for s in samples:
        assert s["finish_reason"] == ("length" if s["n_tokens"] == 3 else "stop"), s
    assert samples == [s.to_dict() for s in reference.sample(FEW_SHOT, n=6, max_tokens=3,
                                                             seed=8)]
    prompt = "One, two,"
    cut = post(f32_server, "/v1/completions", {"prompt": prompt, "max_tokens": 16, "seed": 2})
    choice = cut.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None, choice
    text = choice["text"]
    at = next(i for i in range(1, len(text) - 1) if text.find(text[i:i + 2]) == i)
    stop = text[at:at + 2]  # where it first occurs
    stopped = post(f32_server, "/v1/completions",
                   {"prompt": prompt, "max_tokens": 16, "seed": 2, "stop": [stop]})
    choice = stopped.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert choice["text"] == text[:at]


@pytest.mark.parametrize("option, value, message", [
    ("temperature", -1, "temperature must be at least 0, got -1"),
    ("top_p", 1.5, "top_p must be at most 1, got 1.5"),
    ("min_p", -0.5, "min_p must be at least 0, got -0.5"),
    ("n", 0, "n must be at least 1, got 0"),
    ("n", 257, "n must be at most 256, got 257"),
])
def test_a_bad_sampling_value_gets_one_message_everywhere(f32_server, reference, option, value,
                                                          message):
    """The native route, the vLLM-compatible route (its own field names) and the Python API
    refuse a bad value with one message (ops.SampleOptions), over HTTP always as a 400."""
    native = post(f32_server, "/spectrum/v1/sample", {"messages": DICE, option: value})
    assert_error(native, 400, message)
    vllm = post(f32_server, "/v1/completions", {"prompt": "One, two,", option: value})
    assert_error(vllm, 400, message)
    assert vllm.json()["error"]["param"] == option
    if option != "n" or value < 1:  # the API's own bound on n is higher (MAX_SAMPLES)
        with pytest.raises(spectrum_local.InputError, match=message):
            reference.sample(DICE, **{option: value})


def test_sigterm_lets_requests_in_flight_finish_then_exits_0(f32):
    # A grace far longer than the request takes on any machine: what is tested is that the
    # server waits for it, not how fast it is.
    with serving(f32["llama3"], "--grace", "600") as (url, proc):
        body = {"messages": FEW_SHOT, "n": 16, "max_tokens": 200, "seed": 1}
        with in_flight(url, "/spectrum/v1/sample", body) as result:
            wait_for(lambda: load(url)["live_samples"], "the samples running")
            proc.send_signal(signal.SIGTERM)
        assert result["response"].status_code == 200
        samples = result["response"].json()["samples"]
        assert len(samples) == 16 and "abort" not in {s["finish_reason"] for s in samples}
        assert proc.wait() == 0
        with pytest.raises(httpx.ConnectError):
            get(url + "/health")


def test_past_the_grace_requests_in_flight_answer_what_they_have(f32):
    """SIGTERM with --grace 0: the samples of both protocols stop at their next step and end
    "abort" (what a client that goes away gets too), and the answers still arrive."""
    # Room for the four samples at once (each is admitted with room for its max_tokens).
    with serving(f32[SERVED_FAMILY], "--grace", "0", "--ctx", "8192") as (url, proc):
        native = {"messages": FEW_SHOT, "n": 2, "max_tokens": 1800, "seed": 3}
        openai = {"prompt": "One, two,", "n": 2, "max_tokens": 1800, "seed": 3}
        with in_flight(url, "/spectrum/v1/sample", native) as first, \
                in_flight(url, "/v1/completions", openai) as second:
            # both admitted (one sample of four may have met its end token already)
            wait_for(lambda: (now := load(url))["live_samples"] >= 3
                     and not now["queued_jobs"], "both requests' samples running")
            proc.send_signal(signal.SIGTERM)
        assert first["response"].status_code == 200, first["response"].text
        assert second["response"].status_code == 200, second["response"].text
        reasons = [s["finish_reason"] for s in first["response"].json()["samples"]] + \
            [c["finish_reason"] for c in second["response"].json()["choices"]]
        assert "abort" in reasons and "length" not in reasons, reasons
        assert proc.wait() == 0


@contextlib.contextmanager
def serving(model_path, *args: str):
    """A server of our own (to signal): yields (url, process)."""
    port = free_port()
    proc = start(serve_command(["--model", str(model_path), *args], port), port, "/health",
                 env=serve_env())
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop(proc)


@contextlib.contextmanager
def in_flight(url: str, route: str, body: dict):
    """``body`` posted to ``route`` from another thread; the block runs while it is in flight
    and its end waits for the answer: ``result["response"]``."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(response=post(url, route, body)))
    thread.start()
    try:
        yield result
    finally:
        thread.join()


@contextlib.contextmanager
def hung_up(url: str, route: str, body: dict):
    """A client that posts ``body`` to ``route`` and, when the block ends, goes away without
    reading the answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST {route} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                     .encode() + data)
        yield


def _wait_healthy(url: str, proc: subprocess.Popen) -> None:
    wait_for(lambda: proc.poll() is not None or _healthy(url), "/health")
    assert proc.poll() is None, proc.stdout.read()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=None).status_code == 200
    except httpx.HTTPError:
        return False


# --- safe by default ----------------------------------------------------------------------------

def test_api_key_is_required_on_the_api_but_not_on_health_or_the_page(f32):
    with running_server(["--model", str(f32[FAMILY])], api_key="s3cret") as url:
        body = {"messages": DICE, "candidates": "2..3"}
        assert_error(post(url, "/spectrum/v1/score", body), 401, "API key")
        assert_error(post(url, "/spectrum/v1/score", body,
                          headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(post(url, "/spectrum/v1/score", body,
                          headers={"Authorization": "s3cret"}), 401)
        assert_error(get(url + "/spectrum/v1/info"), 401)
        assert_error(get(url + "/v1/models"), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert post(url, "/spectrum/v1/score", body, headers=good).status_code == 200
        assert get(url + "/v1/models", headers=good).status_code == 200
        assert get(url + "/health").json()["status"] == "ok"
        assert "<html" in get(url + "/").text.lower()


def test_it_binds_loopback_unless_told_otherwise(f32_server):
    address = _outward_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to try")
    port = int(f32_server.rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.create_connection((address, port), timeout=2):
        pass


def test_a_public_bind_without_a_key_warns(f32):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "spectrum_local", "serve", "--host", "0.0.0.0",
                             "--port", str(port), "--model", str(f32[FAMILY])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate()[0]
    assert "warning: binding 0.0.0.0 without --api-key" in output
    assert proc.returncode == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "999.1.1.1"])
def test_an_address_it_cannot_listen_on_is_one_line(f32_server, host):
    port = int(f32_server.rsplit(":", 1)[1])  # in use by the module's server
    done = subprocess.run([sys.executable, "-m", "spectrum_local", "serve", "--host", host,
                           "--port", str(port)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"Error: cannot listen on {host}:")
    assert "Traceback" not in done.stderr


def _outward_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this picks the interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.mark.parametrize("route, body, status, match", [
    ("/spectrum/v1/score", {"messages": DICE, "candidates": "2..3", "temprature": 1}, 400,
     "unknown field(s): temprature"),
    ("/spectrum/v1/score", {"messages": [{"role": "system", "content": "x"}], "candidates": ["a"]},
     400, "messages[0].role must be 'description', 'input' or 'output', got 'system'"),
    ("/spectrum/v1/score", {"messages": DICE, "candidates": ["1", ""]}, 400, "empty string"),
    ("/spectrum/v1/score", {"messages": DICE, "candidates": [str(i) for i in range(10_001)]}, 400,
     "candidates must hold at most 10000"),
    ("/spectrum/v1/score", {"messages": DICE, "candidates": "1..20000"}, 400, "limit is 10000"),
    ("/spectrum/v1/score", {"messages": [{"role": "description", "content": "dice " * 3000}],
                            "candidates": ["2"]}, 400, "context holds 1024"),
    ("/spectrum/v1/sample", {"messages": DICE, "n": "5"}, 400, "n must be a whole number, got '5'"),
    ("/spectrum/v1/sample", {"messages": DICE, "n": 257}, 400, "n must be at most 256, got 257"),
    ("/spectrum/v1/sample", {"messages": DICE, "max_tokens": 5000}, 400, "more than the context"),
    ("/spectrum/v1/sample", {"messages": DICE, "max_tokens": 0}, 400,
     "max_tokens must be at least 1, got 0"),
    ("/spectrum/v1/sample", {"messages": DICE, "top_p": 0}, 400, "top_p must be greater than 0"),
    ("/spectrum/v1/top", {"messages": DICE, "k": 0}, 400, "k must be at least 1, got 0"),
    ("/spectrum/v1/top", {"messages": []}, 400, "no messages"),
    ("/spectrum/v1/top", [1, 2], 400, "the body must be an object, got [1, 2]"),
    ("/spectrum/v1/enumerate", {"messages": DICE, "coverage": 0}, 400,
     "coverage must be greater than 0, got 0"),
    ("/spectrum/v1/enumerate", {"messages": DICE, "max_decoded": 10**6}, 400,
     "max_decoded must be at most 100000"),
    ("/spectrum/v1/enumerate", {"messages": DICE, "max_outputs": "5"}, 400,
     "max_outputs must be a whole number"),
    ("/spectrum/v1/enumerate", {"messages": []}, 400, "no messages"),
])
def test_bad_requests_get_a_4xx_json_error(f32_server, route, body, status, match):
    """Every refused value is a 400, in the words of the Python API and the command line."""
    assert_error(post(f32_server, route, body), status, match)


def test_malformed_and_oversized_bodies(f32_server):
    bad_json = httpx.post(f32_server + "/spectrum/v1/score", content=b'{"messages": [',
                          headers={"content-type": "application/json"}, timeout=None)
    assert_error(bad_json, 400, "not valid JSON")
    huge = b'{"messages": [{"role": "description", "content": "' + b"x" * (5 * 2**20) + b'"}]}'
    assert_error(httpx.post(f32_server + "/spectrum/v1/score", content=huge,
                            headers={"content-type": "application/json"}, timeout=None),
                 413, "larger than")
    assert_error(get(f32_server + "/spectrum/v1/nothing"), 404)
    assert_error(get(f32_server + "/spectrum/v1/score"), 405)


SCALAR = (st.none() | st.booleans() | st.integers() | st.text(max_size=20)
          | st.floats(allow_nan=False, allow_infinity=False))  # JSON has no NaN
JSON = st.recursive(SCALAR,
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
FIELDS = ["messages", "candidates", "n", "max_tokens", "seed", "temperature", "top_k", "top_p",
          "min_p", "repeat_penalty", "k", "prefix", "stream", "role", "content", "prompt",
          "logprobs", "echo", "prompt_logprobs", "stop", "tokens", "coverage", "min_prob",
          "max_outputs", "max_decoded"]
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["description", "input", "output", "x"]),
                                 "content": st.text(max_size=30)})
BODY = st.dictionaries(st.sampled_from(FIELDS), JSON | st.lists(MESSAGE, max_size=3), max_size=6)
ROUTES = ["/spectrum/v1/score", "/spectrum/v1/sample", "/spectrum/v1/top",
          "/spectrum/v1/enumerate", "/v1/completions", "/tokenize", "/detokenize"]


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(route=st.sampled_from(ROUTES), body=BODY | JSON)
def test_random_bodies_never_get_a_5xx(f32_server, route, body):
    if isinstance(body, dict) and body.get("n", 0) is not True and isinstance(body.get("n"), int):
        body["n"] = min(abs(body["n"]), 4)  # valid but huge values are slow, not wrong
    if route == "/spectrum/v1/enumerate" and isinstance(body, dict):
        body.setdefault("max_decoded", 200)  # the default budget is long on a random model
    for key, most in (("max_tokens", 8), ("max_decoded", 200), ("max_outputs", 50)):
        if isinstance(body, dict) and isinstance(body.get(key), int):
            body[key] = min(abs(body[key]), most)
    response = httpx.post(f32_server + route, json=body, timeout=None)
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert "message" in response.json()["error"]
    assert get(f32_server + "/health").status_code == 200
