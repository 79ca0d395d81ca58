"""No request can disturb another: a model-based test of the scheduler and the engine.

A seeded random driver submits interleavings of score / top / sample / enumerate / output
log-prob requests, over-long prompts, raising callbacks and cancels from many threads to one
scheduler over an F32 model whose context is small (so live samples fill the room and reads
meet ``Busy``). The model of the system is simple: each request's answer is the answer it gets
alone on a fresh engine (exact on F32), or its own error; a cancelled request may stop early,
but whatever it finished is still its answer alone; nothing else is ever cancelled."""

import json
import random
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

import spectrum_local
from spectrum_local.backend import Path as ReadPath
from spectrum_local.backend import Busy, SamplerSettings
from spectrum_local.errors import Cancelled, InputError
from spectrum_local.scheduler import Scheduler

from conftest import EXACT, FEW_SHOT
from servers import running_server

CTX = 256  # small: a few samples reserve most of it
# Gemma 3's tiny model has a 12-token sliding window (llama.cpp reuses cells outside it) and a
# 600-token vocabulary (hundreds of requests stay quick); its F32 kernels still move a row by
# ~1e-5 with the batch layout, enough to flip a draw from its near-uniform rows, so its samples
# are greedy. Qwen3's tiny model moves rows by ~5e-7: its samples are seeded draws.
GREEDY = {"gemma3": True, "qwen3": False}
WORDS = ["red", "sweet", "tropical", "small", "green", "sour", "round", "dried"]


def _messages(rng: random.Random) -> list[dict]:
    messages = FEW_SHOT[:rng.randrange(1, len(FEW_SHOT) + 1)]
    return messages + [{"role": "input", "content": rng.choice(WORDS)}]


def _request(rng: random.Random, i: int, long_text: str, greedy: bool = False) -> dict:
    """One random request: what it asks, and how it may misbehave."""
    kind = rng.choice(["score", "top", "sample", "sample", "enumerate", "outputs"])
    request = {"kind": kind, "messages": _messages(rng), "fault": None, "id": i}
    roll = rng.random()
    if roll < 0.12:
        request["fault"] = "too long"  # every text fits the context, the prompt does not
        request["messages"] = [{"role": "description", "content": long_text},
                               {"role": "input", "content": long_text}]
    elif roll < 0.24:
        request["fault"] = "cancel"
    elif roll < 0.30 and kind == "sample":
        request["fault"] = "raises"
    if kind == "score":
        request["candidates"] = rng.sample(["apple", "kiwi", "fig", "lime", "pear", "plum"], 3)
    elif kind == "top":
        request["k"] = rng.randrange(1, 6)
        request["prefix"] = rng.choice(["", "", "b", "ch"])
    elif kind == "sample":
        request["n"] = rng.randrange(1, 5)
        request["max_tokens"] = rng.randrange(4, 48)
        request["seed"] = rng.randrange(1000)
        request["temperature"] = 0.0 if greedy else 1.0
    return request


class Boom(Exception):
    pass


def _run(model, request: dict, cancel: threading.Event | None = None):
    """The request's answer on ``model``, comparable across runs."""
    messages = request["messages"]
    kind = request["kind"]
    if kind == "score":
        return [c.logprob for c in model.score(messages, request["candidates"],
                                               cancel=cancel).candidates]
    if kind == "top":
        return [(t.id, t.logprob) for t in model.top(messages, request["k"],
                                                      prefix=request["prefix"], cancel=cancel)]
    if kind == "enumerate":
        found = model.enumerate(messages, max_outputs=3, max_tokens=3, max_decoded=60,
                                cancel=cancel)
        return [(o.text, o.logprob) for o in found.outputs]
    if kind == "outputs":
        messages = messages + [{"role": "output", "content": "kiwi"}]
        return model.output_logprobs(messages, cancel=cancel)

    def on_sample(index, sample):
        if request["fault"] == "raises" and index == 0:
            raise Boom("the caller's callback failed")

    samples = model.sample(messages, n=request["n"], max_tokens=request["max_tokens"],
                           seed=request["seed"], temperature=request["temperature"],
                           on_sample=on_sample, cancel=cancel)
    return [(s.text, s.n_tokens, s.finish_reason) for s in samples]


def _same(kind: str, got, want) -> bool:
    if kind == "sample":
        return got == want
    if kind == "enumerate":
        return [t for t, _ in got] == [t for t, _ in want] and \
            all(abs(a - b) <= EXACT for (_, a), (_, b) in zip(got, want))
    if kind == "top":
        return [t for t, _ in got] == [t for t, _ in want] and \
            all(abs(a - b) <= EXACT for (_, a), (_, b) in zip(got, want))
    return len(got) == len(want) and bool(np.allclose(got, want, rtol=0, atol=EXACT))


@pytest.fixture(scope="module", params=sorted(GREEDY))
def engines(f32, request):
    """Two engines on the same F32 file and context: one shared by the driver's threads, one
    answering each request alone; and the family."""
    shared = spectrum_local.load(str(f32[request.param]), ctx=CTX)
    alone = spectrum_local.load(str(f32[request.param]), ctx=CTX)
    yield shared, alone, request.param
    shared.close()
    alone.close()


@pytest.fixture(scope="module")
def long_text(engines) -> str:
    """A text of about 60% of the context: it fits alone, two of them in a prompt do not."""
    word = "banana split "
    per_word = len(engines[0].engine.tokenize(word * 10)) / 10
    return (word * int(0.6 * CTX / per_word)).strip()


def _alone(alone, request: dict):
    """The answer (or the error's type) of ``request`` alone, on a cleared engine."""
    alone.engine.clear()
    try:
        return _run(alone, request)
    except (InputError, Boom) as e:
        return type(e)


@pytest.mark.parametrize("seed", [1, 2])
def test_every_answer_is_the_answer_alone_and_no_fault_spreads(engines, long_text, seed):
    shared, alone, family = engines
    rng = random.Random(seed)
    requests = [_request(rng, i, long_text, GREEDY[family]) for i in range(40)]
    answers: dict[int, object] = {}
    samples_left = [sum(r["kind"] == "sample" for r in requests)]
    faults_beside_samples = []  # faulty requests sent while samples were live
    lock = threading.Lock()

    with Scheduler(shared.engine, chunk=8) as scheduler:
        model = shared.using(scheduler)

        def client(request: dict):
            cancel = threading.Event() if request["fault"] == "cancel" else None
            done = threading.Event()
            if cancel is not None:
                threading.Thread(target=_cancel_after_progress, daemon=True,
                                 args=(scheduler, done, cancel)).start()
            if request["fault"] == "too long":  # the case that matters: beside live samples
                while not scheduler.load()["live_samples"] and samples_left[0]:
                    done.wait(0.001)
                if scheduler.load()["live_samples"]:
                    faults_beside_samples.append(request["id"])
            try:
                answers[request["id"]] = _run(model, request, cancel)
            except (InputError, Boom, Cancelled) as e:
                answers[request["id"]] = type(e)
            done.set()
            if request["kind"] == "sample":
                with lock:
                    samples_left[0] -= 1

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(client, requests))

    problems = []
    for request in requests:
        got, want = answers[request["id"]], _alone(alone, request)
        fault, kind = request["fault"], request["kind"]
        if fault == "too long":
            ok = got is InputError
        elif fault == "raises":
            ok = got is Boom
        elif fault == "cancel" and got is Cancelled:
            ok = kind != "sample"  # samples end "abort" instead
        elif fault == "cancel" and kind == "sample":
            # What finished before the cancel is the sample alone; the rest ended "abort".
            ok = len(got) == len(want) and all(g == w for g, w in zip(got, want)
                                               if g[2] != "abort")
        else:
            ok = not isinstance(got, type) and _same(kind, got, want)
            if kind == "sample" and ok:
                ok = all(s[2] != "abort" for s in got)  # nothing else is cancelled
        if not ok:
            problems.append((request, got, want))
    assert not problems, problems[:3]
    assert faults_beside_samples  # the driver did send faults beside live samples


def _cancel_after_progress(scheduler, done: threading.Event, cancel: threading.Event) -> None:
    """Set ``cancel`` once the engine has decoded something since the request started (an
    event, not a wall-clock delay): somewhere in the middle of its work, or after it."""
    start = scheduler.tokens_evaluated
    while not done.is_set() and scheduler.tokens_evaluated == start:
        done.wait(0.001)
    cancel.set()


def test_an_over_long_read_beside_live_samples_changes_nothing(engines, long_text):
    """Item 1 of the issue, in-process: samples are running when a read whose prompt cannot
    fit arrives; the read gets its error, the samples go on and equal the samples alone."""
    shared, alone, family = engines
    temperature = 0.0 if GREEDY[family] else 1.0
    request = {"kind": "sample", "messages": FEW_SHOT, "n": 4, "max_tokens": 40, "seed": 1,
               "temperature": temperature, "fault": None}
    want = _alone(alone, request)
    with Scheduler(shared.engine) as scheduler:
        model = shared.using(scheduler)
        result = {}

        def sample():
            result["samples"] = model.sample(FEW_SHOT, n=4, max_tokens=40, seed=1,
                                             temperature=temperature)

        worker = threading.Thread(target=sample)
        worker.start()
        while scheduler.load()["live_samples"] == 0 and worker.is_alive():
            threading.Event().wait(0.001)
        with pytest.raises(InputError, match="context holds"):
            model.score([{"role": "description", "content": long_text},
                         {"role": "input", "content": long_text}], ["kiwi"])
        worker.join()
    assert [(s.text, s.n_tokens, s.finish_reason) for s in result["samples"]] == want


def test_a_read_refused_as_busy_keeps_no_row_of_another_prompt(engines):
    """Item 2: a read refused for room (``Busy``) must not leave sequence 0 holding a shorter
    prompt with the longer prompt's logits row. Live samples fill the room; a read diverging
    three tokens before the cached prompt's end is refused; then the logits after the shared
    prefix must be that prefix's own."""
    shared, alone, _ = engines
    engine = shared.engine
    engine.clear()
    prompt = shared.prompt_tokens(FEW_SHOT)
    # One sample (more would prefill the prompt again when the first ends, hiding the row).
    job = engine.new_job(prompt, 1, CTX, SamplerSettings(), 5, set())
    engine.advance([job])  # admitted: sequence 0 holds the prompt, the samples the room
    assert engine.live_samples and engine.cached_tokens == prompt
    with pytest.raises(Busy):
        engine.read([], keep=prompt[:-3] + [prompt[-1]] * 40)
    while not job.finished:  # the room is free again; the cache is what it was
        engine.advance([job])
    prefix = prompt[:-3]
    got = engine.read([ReadPath(prefix, len(prefix), final=True)], keep=None)[0].row
    engine.clear()
    alone.engine.clear()
    want = alone.engine.prompt_logits(prefix)
    assert np.abs(got - want).max() <= EXACT


ROUTES = {"score": "/spectrum/v1/score", "top": "/spectrum/v1/top",
          "sample": "/spectrum/v1/sample", "enumerate": "/spectrum/v1/enumerate"}


def _body(request: dict) -> dict:
    body = {"messages": request["messages"]}
    kind = request["kind"]
    if kind == "score":
        body["candidates"] = request["candidates"]
    elif kind == "top":
        body.update(k=request["k"], prefix=request["prefix"])
    elif kind == "enumerate":
        body.update(max_outputs=3, max_tokens=3, max_decoded=60)
    else:
        body.update(n=request["n"], max_tokens=request["max_tokens"], seed=request["seed"],
                    temperature=request["temperature"])
    return body


def _from_json(kind: str, got: dict):
    if kind == "score":
        return [c["logprob"] for c in got["candidates"]]
    if kind == "top":
        return [(t["id"], t["logprob"]) for t in got["tokens"]]
    if kind == "enumerate":
        return [(o["text"], o["logprob"]) for o in got["outputs"]]
    return [(s["text"], s["n_tokens"], s["finish_reason"]) for s in got["samples"]]


def _disconnect(url: str, route: str, body: dict) -> None:
    """Send the request, then go away without reading the answer."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST {route} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)


@pytest.mark.http
@pytest.mark.parametrize("engines", ["gemma3"], indirect=True)
def test_over_http_every_answer_is_the_answer_alone(f32, engines, long_text):
    """A few hundred requests from 8 clients against a real serve with a small context:
    over-long prompts get their 400, clients that disconnect get nothing, and every other
    answer is the answer alone; afterwards the engine is idle (nothing left running)."""
    _, alone, family = engines
    rng = random.Random(7)
    requests = [_request(rng, i, long_text, GREEDY[family]) for i in range(240)]
    for r in requests:
        if r["kind"] == "outputs":  # no route of its own
            r.update(kind="score", candidates=["kiwi", "fig"])
        r["fault"] = "disconnect" if r["fault"] in ("cancel", "raises") else r["fault"]
    problems, lock = [], threading.Lock()
    with running_server(["--model", str(f32[family]), "--ctx", str(CTX)]) as url:
        def client(request: dict) -> None:
            route, body = ROUTES[request["kind"]], _body(request)
            if request["fault"] == "disconnect":
                _disconnect(url, route, body)
                return
            with httpx.Client(base_url=url, timeout=None) as http:
                response = http.post(route, json=body)
            if request["fault"] == "too long":
                ok = response.status_code == 400 and "context holds" in response.text
                got = response.text
            else:
                ok = response.status_code == 200
                got = _from_json(request["kind"], response.json()) if ok else response.text
                ok = ok and _same(request["kind"], got, _alone_locked(alone, request, lock))
                if ok and request["kind"] == "sample":
                    ok = all(s[2] != "abort" for s in got)
            if not ok:
                with lock:
                    problems.append((request, got))

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(client, requests))
        assert not problems, problems[:3]
        with httpx.Client(base_url=url, timeout=None) as http:
            load = http.get("/spectrum/v1/info").json()["load"]
            while load["live_samples"] or load["queued_reads"] or load["queued_jobs"]:
                threading.Event().wait(0.05)  # the disconnected ones' work ending
                load = http.get("/spectrum/v1/info").json()["load"]


def _alone_locked(alone, request: dict, lock: threading.Lock):
    with lock:
        return _alone(alone, request)


@pytest.mark.parametrize("engines", ["gemma3"], indirect=True)
def test_a_long_read_yields_to_a_short_one_and_stops_when_cancelled(engines):
    """A score of 3,000 candidates is served a chunk per turn: a one-token top sent once the
    score is under way is answered while the score still runs; cancelling the score then stops
    it (Cancelled) before it decodes the rest."""
    shared, _, _ = engines
    candidates = [f"fruit {i}" for i in range(3000)]
    with Scheduler(shared.engine) as scheduler:
        model = shared.using(scheduler)
        cancel, outcome = threading.Event(), {}

        def long_score():
            try:
                outcome["score"] = model.score(FEW_SHOT, candidates, cancel=cancel)
            except Cancelled as e:
                outcome["score"] = e

        worker = threading.Thread(target=long_score)
        start = scheduler.tokens_evaluated
        worker.start()
        while scheduler.tokens_evaluated == start:  # the score is under way
            worker.join(0.001)
        model.top(FEW_SHOT, 3)
        assert worker.is_alive()  # the top did not wait for the whole score
        at_cancel = scheduler.tokens_evaluated
        cancel.set()
        worker.join()
        assert isinstance(outcome["score"], Cancelled)
        # At most the turn in progress and the next one ran after the cancel: far less than
        # the rest of the 3,000 candidates' tokens.
        assert scheduler.tokens_evaluated - at_cancel < 3 * scheduler.chunk * 8
