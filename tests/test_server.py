"""``spectrum-local serve``: a real server in a subprocess on loopback, real models, real HTTP
clients. The native endpoints must give what the Python API gives (exactly, up to float noise,
on an F32 model; within the batch-layout noise measured in this run on the quantized one),
under concurrency, and bad requests must get 4xx JSON errors, never a 5xx or a dead server."""

from __future__ import annotations

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

import httpx
import pytest
from conftest import DICE, EXACT, FEW_SHOT, PROMPTS, SERVED_FAMILY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import free_port, running_server

import spectrum_local

pytestmark = pytest.mark.http  # the HTTP layer: run once by `make test`, not per CPU setting

FAMILY = SERVED_FAMILY
STRESS_SECONDS = float(os.environ.get("SPECTRUM_LOCAL_STRESS_SECONDS", 60))


def post(url: str, route: str, body, **kwargs) -> httpx.Response:
    return httpx.post(url + route, json=body, **{"timeout": 120, **kwargs})


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
    assert body["model"] == reference.path and body["format"] == FAMILY
    want = reference.score(messages, candidates)
    assert_same_score(body, want, EXACT)
    assert body["coverage"] == pytest.approx(want.coverage, rel=1e-2)


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
    assert body["model"] == reference.path and body["stopped"] == want.stopped
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
    info = httpx.get(f32_server + "/spectrum/v1/info").json()
    cli = subprocess.run([sys.executable, "-m", "spectrum_local", "info", "--json", "--model",
                          str(f32[FAMILY]), "--ctx", "1024"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert {k: v for k, v in info.items() if k not in ("prompt_format", "load")} \
        == json.loads(cli.stdout)
    assert info["prompt_format"]["end_of_output"] == "<|im_end|>"
    assert info["prompt_format"]["generation_prompt"] == "<|im_start|>output\n"


def test_streamed_samples_are_the_same_samples(f32_server):
    body = {"messages": FEW_SHOT, "n": 5, "max_tokens": 10, "seed": 21}
    whole = post(f32_server, "/spectrum/v1/sample", body).json()["samples"]
    with httpx.stream("POST", f32_server + "/spectrum/v1/sample", json={**body, "stream": True},
                      timeout=60) as response:
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
        with httpx.Client(base_url=f32_server, timeout=120) as http:
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
        def load():
            return httpx.get(url + "/spectrum/v1/info").json()["load"]["live_samples"]

        body = {"messages": FEW_SHOT, "n": 8, "max_tokens": 1000, "temperature": 1.0}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
            post(url, "/spectrum/v1/sample", body, timeout=httpx.Timeout(60, read=3))
        deadline = time.monotonic() + 10
        while load() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert load() == 0  # 8 x 1000 tokens would take minutes on a CPU
        ok = post(url, "/spectrum/v1/score", {"messages": DICE, "candidates": "2..4"})
        assert ok.status_code == 200


def test_sigterm_lets_requests_in_flight_finish_then_exits_0(f32):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "spectrum_local", "serve", "--port", str(port),
                             "--model", str(f32["llama3"]), "--grace", "60"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        result = {}
        body = {"messages": FEW_SHOT, "n": 16, "max_tokens": 200, "seed": 1}
        request = threading.Thread(target=lambda: result.update(
            response=post(url, "/spectrum/v1/sample", body), finished=time.monotonic()))
        request.start()
        while not httpx.get(url + "/spectrum/v1/info").json()["load"]["live_samples"]:
            time.sleep(0.05)  # until the samples run
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        request.join(60)
        assert result["finished"] > signalled  # it was in flight
        assert result["response"].status_code == 200
        assert len(result["response"].json()["samples"]) == 16
        assert proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _wait_healthy(url: str, proc: subprocess.Popen) -> None:
    for _ in range(600):
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("no /health")


# --- safe by default ----------------------------------------------------------------------------

def test_api_key_is_required_on_the_api_but_not_on_health_or_the_page(f32):
    with running_server(["--model", str(f32[FAMILY])], api_key="s3cret") as url:
        body = {"messages": DICE, "candidates": "2..3"}
        assert_error(post(url, "/spectrum/v1/score", body), 401, "API key")
        assert_error(post(url, "/spectrum/v1/score", body,
                          headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(post(url, "/spectrum/v1/score", body,
                          headers={"Authorization": "s3cret"}), 401)
        assert_error(httpx.get(url + "/spectrum/v1/info"), 401)
        assert_error(httpx.get(url + "/v1/models"), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert post(url, "/spectrum/v1/score", body, headers=good).status_code == 200
        assert httpx.get(url + "/v1/models", headers=good).status_code == 200
        assert httpx.get(url + "/health").json()["status"] == "ok"
        assert "<html" in httpx.get(url + "/").text.lower()


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
        output = proc.communicate(timeout=30)[0]
    assert "warning: binding 0.0.0.0 without --api-key" in output
    assert proc.returncode == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "999.1.1.1"])
def test_an_address_it_cannot_listen_on_is_one_line(f32_server, host):
    port = int(f32_server.rsplit(":", 1)[1])  # in use by the module's server
    done = subprocess.run([sys.executable, "-m", "spectrum_local", "serve", "--host", host,
                           "--port", str(port)], capture_output=True, text=True, timeout=60)
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
    ("/spectrum/v1/score", {"messages": DICE, "candidates": "2..3", "temprature": 1}, 422,
     "temprature: Extra inputs are not permitted"),
    ("/spectrum/v1/score", {"messages": [{"role": "system", "content": "x"}], "candidates": ["a"]},
     422, "messages.0.role"),
    ("/spectrum/v1/score", {"messages": DICE, "candidates": ["1", ""]}, 400, "empty string"),
    ("/spectrum/v1/score", {"messages": DICE, "candidates": [str(i) for i in range(10_001)]}, 422,
     "candidates"),
    ("/spectrum/v1/score", {"messages": DICE, "candidates": "1..20000"}, 400, "limit is 10000"),
    ("/spectrum/v1/score", {"messages": [{"role": "description", "content": "dice " * 3000}],
                            "candidates": ["2"]}, 400, "context holds 1024"),
    ("/spectrum/v1/sample", {"messages": DICE, "n": "5"}, 422, "n: Input should be a valid integer"),
    ("/spectrum/v1/sample", {"messages": DICE, "n": 257}, 422, "n: Input should be less than"),
    ("/spectrum/v1/sample", {"messages": DICE, "max_tokens": 5000}, 400, "more than the context"),
    ("/spectrum/v1/sample", {"messages": DICE, "top_p": 0}, 400, "0 < top_p <= 1"),
    ("/spectrum/v1/top", {"messages": DICE, "k": 0}, 422, "k: Input should be greater than"),
    ("/spectrum/v1/top", {"messages": []}, 400, "no messages"),
    ("/spectrum/v1/top", [1, 2], 422, "valid dictionary"),
    ("/spectrum/v1/enumerate", {"messages": DICE, "coverage": 0}, 422, "coverage"),
    ("/spectrum/v1/enumerate", {"messages": DICE, "max_decoded": 10**6}, 422, "max_decoded"),
    ("/spectrum/v1/enumerate", {"messages": DICE, "max_outputs": "5"}, 422, "max_outputs"),
    ("/spectrum/v1/enumerate", {"messages": []}, 400, "no messages"),
])
def test_bad_requests_get_a_4xx_json_error(f32_server, route, body, status, match):
    assert_error(post(f32_server, route, body), status, match)


def test_malformed_and_oversized_bodies(f32_server):
    bad_json = httpx.post(f32_server + "/spectrum/v1/score", content=b'{"messages": [',
                          headers={"content-type": "application/json"})
    assert_error(bad_json, 400, "not valid JSON")
    huge = b'{"messages": [{"role": "description", "content": "' + b"x" * (5 * 2**20) + b'"}]}'
    assert_error(httpx.post(f32_server + "/spectrum/v1/score", content=huge,
                            headers={"content-type": "application/json"}), 413, "larger than")
    assert_error(httpx.get(f32_server + "/spectrum/v1/nothing"), 404)
    assert_error(httpx.get(f32_server + "/spectrum/v1/score"), 405)


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
    response = httpx.post(f32_server + route, json=body, timeout=60)
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert "message" in response.json()["error"]
    assert httpx.get(f32_server + "/health").status_code == 200
