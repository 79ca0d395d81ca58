"""The Ollama API (/api/*) against a real ``spectrum-local serve`` on loopback, driven by the
official ``ollama`` Python client: list, show, ps, version, chat and generate (whole and
streamed), options, logprobs, and refusals in Ollama's error shape.

The server runs the tiny F32 Gemma 3; its numbers are compared with the native routes and
/v1/chat/completions on the same server, never with expected words.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import ollama
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from servers import free_port, running_server  # noqa: E402

pytestmark = pytest.mark.http

FAMILY = "gemma3"
CTX = 512
CHAT = [{"role": "system", "content": "Name a colour."},
        {"role": "user", "content": "a warm one"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "a cold one"}]
SPECTRUM = [{"role": "description", "content": "Name a colour."},
            {"role": "input", "content": "a warm one"},
            {"role": "output", "content": "red"},
            {"role": "input", "content": "a cold one"}]
CLOSE = 1e-4


@pytest.fixture(scope="module")
def base_url(f32):
    with running_server(["--model", str(f32[FAMILY]), "--ctx", str(CTX)]) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> ollama.Client:
    return ollama.Client(host=base_url)


@pytest.fixture(scope="module")
def name(f32) -> str:
    return f32[FAMILY].name.removesuffix(".gguf")


def post(base_url: str, path: str, body: dict) -> dict:
    r = httpx.post(f"{base_url}{path}", json=body, timeout=None)
    assert r.status_code == 200, r.text
    return r.json()


def test_list_show_ps_version(client, base_url, name, f32):
    models = client.list().models
    assert [m.model for m in models] == [f"{name}:latest"]
    assert models[0].size == f32[FAMILY].stat().st_size
    assert models[0].details.format == "gguf" and models[0].details.family == FAMILY
    shown = client.show(name)
    assert shown.details.family == FAMILY and "completion" in shown.capabilities
    assert shown.modelinfo["general.architecture"] == FAMILY
    assert "<start_of_turn>" in shown.template  # the spectrum template, as the GGUF holds it
    running = client.ps().models
    assert running[0].model == f"{name}:latest" and running[0].context_length == CTX
    assert httpx.get(f"{base_url}/api/version").json()["version"]


def test_a_seeded_chat_is_the_native_sample(client, base_url, name):
    native = post(base_url, "/spectrum/v1/sample",
                  {"messages": SPECTRUM, "seed": 4, "max_tokens": 10})["samples"][0]
    for model in (name, f"{name}:latest"):
        answer = client.chat(model=model, messages=CHAT, stream=False,
                             options={"seed": 4, "num_predict": 10})
        assert answer.message.role == "assistant"
        assert answer.message.content == native["text"]
        assert answer.done and answer.done_reason == ("length" if native["finish_reason"]
                                                      == "length" else "stop")
        assert answer.eval_count == native["n_tokens"] + (native["finish_reason"] == "stop")
        assert answer.prompt_eval_count > 0 and answer.total_duration >= answer.eval_duration


def test_the_stream_concatenates_to_the_same_answer(client, name):
    options = {"seed": 6, "num_predict": 12}
    whole = client.chat(model=name, messages=CHAT, options=options, stream=False)
    parts = list(client.chat(model=name, messages=CHAT, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == whole.eval_count
    generated = client.generate(model=name, system="Name a colour.", prompt="a cold one",
                                options=options, stream=False)
    streamed = client.generate(model=name, system="Name a colour.", prompt="a cold one",
                               options=options, stream=True)
    assert "".join(p.response for p in streamed) == generated.response


def test_generate_is_a_chat_of_system_and_prompt(client, name):
    options = {"seed": 2, "num_predict": 8}
    generated = client.generate(model=name, system="Name a colour.", prompt="a cold one",
                                options=options)
    chatted = client.chat(model=name, options=options, messages=[
        {"role": "system", "content": "Name a colour."},
        {"role": "user", "content": "a cold one"}])
    assert generated.response == chatted.message.content


def test_raw_generate_is_the_completion_of_the_same_text(client, base_url, name):
    raw = ("<start_of_turn>description\nName a colour.<end_of_turn>\n"
           "<start_of_turn>output\n")
    generated = client.generate(model=name, prompt=raw, raw=True,
                                options={"seed": 3, "num_predict": 6})
    completed = post(base_url, "/v1/completions", {"prompt": raw, "seed": 3, "max_tokens": 6})
    assert generated.response == completed["choices"][0]["text"]


def test_logprobs_are_chat_completions_logprobs(client, base_url, name):
    answer = client.chat(model=name, messages=CHAT, logprobs=True, top_logprobs=3,
                         options={"seed": 7, "num_predict": 8})
    same = post(base_url, "/v1/chat/completions", {
        "messages": CHAT, "seed": 7, "max_tokens": 8, "logprobs": True, "top_logprobs": 3})
    content = same["choices"][0]["logprobs"]["content"]
    assert [(e.token, e.logprob) for e in answer.logprobs] == \
        [(e["token"], e["logprob"]) for e in content]
    for entry in answer.logprobs:  # Ollama's top list: the 3 most likely, most likely first
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert top[0] >= entry.logprob
        if entry.logprob > top[-1]:  # a token among the most likely is listed
            assert entry.logprob in top
    streamed = [lp for part in client.chat(model=name, messages=CHAT, logprobs=True,
                                           top_logprobs=3, stream=True,
                                           options={"seed": 7, "num_predict": 8})
                for lp in part.logprobs or ()]
    assert [(e.token, e.logprob) for e in streamed] == \
        [(e.token, e.logprob) for e in answer.logprobs]


def test_options_map_to_the_sampler(client, name):
    greedy = [client.chat(model=name, messages=CHAT, options={"temperature": 0,
                                                             "num_predict": 6, "seed": s})
              for s in (1, 2)]
    assert greedy[0].message.content == greedy[1].message.content
    first = client.chat(model=name, messages=CHAT, options={"seed": 5, "num_predict": 12})
    text = first.message.content
    if len(text) < 3:
        pytest.skip("the tiny model ended at once")
    cut = client.chat(model=name, messages=CHAT, options={"seed": 5, "num_predict": 12,
                                                          "stop": [text[1:3]]})
    assert cut.message.content == text[:text.index(text[1:3])]
    assert cut.done_reason == "stop"


def test_an_empty_request_loads_the_model(client, name):
    assert client.generate(model=name).done_reason == "load"
    assert client.chat(model=name, messages=[]).done_reason == "load"


@pytest.mark.parametrize("call, status, wording", [
    (lambda c, n: c.chat(model="other", messages=CHAT), 404, "not found"),
    (lambda c, n: c.chat(model=n, messages=CHAT, options={"presence_penalty": 1.0}), 400,
     "options.presence_penalty"),
    (lambda c, n: c.chat(model=n, messages=CHAT, options={"num_ctx": 4096}), 400,
     "more than the loaded context"),
    (lambda c, n: c.chat(model=n, messages=CHAT, options={"temperature": -1}), 400,
     "at least 0"),
    (lambda c, n: c.chat(model=n, messages=CHAT, format="json"), 400, "format"),
    (lambda c, n: c.chat(model=n, messages=CHAT, tools=[{"type": "function", "function": {
        "name": "f"}}]), 400, "tools"),
    (lambda c, n: c.chat(model=n, messages=[{"role": "tool", "content": "x"}]), 400,
     "role 'tool'"),
    (lambda c, n: c.chat(model=n, messages=CHAT, think=True), 400, "think"),
    (lambda c, n: c.pull(n), 400, "does not pull"),
    (lambda c, n: c.delete(n), 400, "does not delete"),
    (lambda c, n: c.embed(model=n, input="x"), 400, "embeddings"),
])
def test_refusals_are_ollama_errors(client, name, call, status, wording):
    with pytest.raises(ollama.ResponseError) as caught:
        call(client, name)
    assert caught.value.status_code == status and wording in caught.value.error


def test_the_ollama_port_option(f32):
    port = free_port()
    with running_server(["--model", str(f32[FAMILY]), "--ctx", "256", "--ollama-port",
                         str(port)]):
        client = ollama.Client(host=f"http://127.0.0.1:{port}")
        assert client.list().models[0].model.endswith(":latest")


def test_the_ollama_port_must_differ_from_the_port():
    run = subprocess.run([sys.executable, "-m", "spectrum_local", "serve", "--port", "8799",
                          "--ollama-port", "8799"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "is --port already" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
