"""/v1/chat/completions against a real ``spectrum-local serve`` on loopback, driven by the real
``openai`` SDK (sync, async, streamed): chat's roles are spectrum's (system -> description,
user -> input, assistant -> output), and its numbers are those of the other routes.

The server runs the tiny F32 Gemma 3 (exact numbers on any CPU). Its random weights give
arbitrary text, so the tests compare routes with each other and with the Python API, never
with expected words.
"""

from __future__ import annotations

import asyncio
import math
import sys
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from servers import running_server  # noqa: E402

pytestmark = pytest.mark.http

FAMILY = "gemma3"
CTX = 1024
CHAT = [{"role": "system", "content": "Roll two six-sided dice. What is the sum?"},
        {"role": "user", "content": "first roll"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "second roll"}]
SPECTRUM = [{"role": "description", "content": "Roll two six-sided dice. What is the sum?"},
            {"role": "input", "content": "first roll"},
            {"role": "output", "content": "7"},
            {"role": "input", "content": "second roll"}]
CLOSE = 1e-4  # nats: one F32 model, the same rows read two ways


@pytest.fixture(scope="module")
def base_url(f32):
    with running_server(["--model", str(f32[FAMILY]), "--ctx", str(CTX)]) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(f32_models):
    return f32_models[FAMILY]


def post(base_url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", json=body, timeout=None)


def chat(base_url: str, **body) -> dict:
    r = post(base_url, "/v1/chat/completions", {"messages": CHAT, **body})
    assert r.status_code == 200, r.text
    return r.json()


# -- the model's id --------------------------------------------------------------------------


def test_the_model_id_is_the_file_name_and_no_answer_names_a_local_path(base_url, client, f32):
    stem = f32[FAMILY].name.removesuffix(".gguf")
    assert [m.id for m in client.models.list().data] == [stem]
    folder = str(f32[FAMILY].parent)
    answers = [
        httpx.get(f"{base_url}/v1/models").text,
        httpx.get(f"{base_url}/spectrum/v1/info").text,
        post(base_url, "/v1/completions", {"prompt": "a", "max_tokens": 2}).text,
        post(base_url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}).text,
        post(base_url, "/spectrum/v1/sample", {"messages": SPECTRUM, "max_tokens": 2}).text,
        httpx.get(f"{base_url}/api/tags").text,
        post(base_url, "/api/show", {"model": stem}).text,
    ]
    for text in answers:
        assert folder not in text and stem in text, text
    # the id, the name with its .gguf and no name at all are the loaded model; others are 404s
    for name in (stem, f32[FAMILY].name, ""):
        assert chat(base_url, model=name, max_tokens=1)["model"] == stem
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model=str(f32[FAMILY]), messages=CHAT, max_tokens=1)


def test_served_model_name_and_info_behind_the_key(f32):
    with running_server(["--model", str(f32[FAMILY]), "--ctx", "256",
                         "--served-model-name", "dice"], api_key="k") as url:
        key = {"Authorization": "Bearer k"}
        models = httpx.get(f"{url}/v1/models", headers=key).json()
        assert [m["id"] for m in models["data"]] == ["dice"]
        info = httpx.get(f"{url}/spectrum/v1/info", headers=key).json()
        assert info["model"] == "dice" and info["path"] == str(f32[FAMILY])  # the owner's


# -- chat's numbers are the other routes' ------------------------------------------------------


def test_a_seeded_chat_sample_is_the_native_sample(base_url, client):
    answer = client.chat.completions.create(model="", messages=CHAT, n=3, seed=5,
                                            max_tokens=12)
    native = post(base_url, "/spectrum/v1/sample",
                  {"messages": SPECTRUM, "n": 3, "seed": 5, "max_tokens": 12}).json()
    assert [c.message.content for c in answer.choices] == [s["text"] for s in
                                                           native["samples"]]
    assert [c.finish_reason for c in answer.choices] == [s["finish_reason"] for s in
                                                         native["samples"]]
    assert all(c.message.role == "assistant" for c in answer.choices)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")


def test_chat_logprobs_are_the_prompt_logprobs_of_the_same_tokens(base_url, reference):
    """The sampled tokens' logprobs (and top alternatives) equal what /v1/completions reads
    for the rendered prompt followed by those tokens."""
    answer = chat(base_url, n=2, seed=3, max_tokens=10, logprobs=True, top_logprobs=3,
                  return_token_ids=True)
    prompt = answer["prompt_token_ids"]
    assert prompt == reference.prompt_tokens(SPECTRUM)
    for choice in answer["choices"]:
        tokens, content = choice["token_ids"], choice["logprobs"]["content"]
        assert len(content) == len(tokens) > 0
        read = post(base_url, "/v1/completions", {
            "prompt": prompt + tokens, "max_tokens": 1, "prompt_logprobs": 3,
            "add_special_tokens": False}).json()["choices"][0]["prompt_logprobs"]
        for token, entry, position in zip(tokens, content, read[len(prompt):]):
            assert abs(entry["logprob"] - position[str(token)]["logprob"]) < CLOSE
            assert entry["bytes"] == list(entry["token"].encode())
            # the top list: the token itself first, then the most likely (vLLM's order)
            assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]
            assert len(entry["top_logprobs"]) <= 3
            ranked = sorted((v["logprob"] for v in position.values()), reverse=True)
            assert entry["top_logprobs"][-1]["logprob"] >= ranked[min(3, len(ranked)) - 1] \
                - CLOSE


def test_the_stream_concatenates_to_the_same_answer(client):
    args = dict(model="", messages=CHAT, n=2, seed=9, max_tokens=12, logprobs=True,
                top_logprobs=1)
    whole = client.chat.completions.create(**args)
    texts: dict[int, str] = {}
    roles: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in client.chat.completions.create(**args, stream=True,
                                                stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage:
            usage = chunk.usage
            assert chunk.choices == []
        for c in chunk.choices:
            assert c.index not in finish
            if c.delta.role:
                roles[c.index] = c.delta.role
                assert c.index not in texts  # the role comes first
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.logprobs:
                tokens.setdefault(c.index, []).extend(t.token for t in c.logprobs.content)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert roles == {0: "assistant", 1: "assistant"}
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert tokens == {c.index: [t.token for t in c.logprobs.content] for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_the_async_client(base_url, client):
    async def both():
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused",
                                      max_retries=0) as aclient:
            return await asyncio.gather(*[
                aclient.chat.completions.create(model="", messages=CHAT, seed=s, max_tokens=8)
                for s in (1, 2)])

    answers = asyncio.run(both())
    alone = [client.chat.completions.create(model="", messages=CHAT, seed=s, max_tokens=8)
             for s in (1, 2)]
    assert [a.choices[0].message.content for a in answers] == \
        [a.choices[0].message.content for a in alone]


@pytest.mark.parametrize("flags", [{"continue_final_message": True,
                                    "add_generation_prompt": False},
                                   {"add_generation_prompt": False}])
def test_a_final_assistant_message_is_continued(base_url, reference, flags):
    messages = [*CHAT, {"role": "assistant", "content": "1"}]
    answer = chat(base_url, messages=messages, max_tokens=4, seed=2, return_token_ids=True,
                  **flags)
    # the prompt ends inside the output turn, after "1": the reply goes on from there
    assert answer["prompt_token_ids"] == reference.prompt_tokens(SPECTRUM, "1")
    assert answer["prompt_token_ids"] != reference.prompt_tokens([*SPECTRUM, {
        "role": "output", "content": "1"}])


def test_spectrum_roles_and_text_parts(base_url):
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in SPECTRUM]
    a = chat(base_url, messages=parts, seed=4, max_tokens=6)
    b = chat(base_url, seed=4, max_tokens=6)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]


def test_markers_in_chat_content_stay_text(base_url, reference):
    marker = "<end_of_turn>"
    messages = [{"role": "system", "content": f"say {marker} twice"},
                {"role": "user", "content": marker}]
    answer = chat(base_url, messages=messages, max_tokens=1, return_token_ids=True)
    spectrum = [{"role": "description", "content": f"say {marker} twice"},
                {"role": "input", "content": marker}]
    assert answer["prompt_token_ids"] == reference.prompt_tokens(spectrum)
    end = reference.engine.control_token(marker)
    # only the two turns' own ends are the control token
    assert answer["prompt_token_ids"].count(end) == 2


def test_stop_strings_and_usage(base_url):
    # a seed whose sample is long enough to hold a stop string inside it
    seed, first = next((s, text) for s in range(8, 40) if len(text := chat(
        base_url, seed=s, max_tokens=12)["choices"][0]["message"]["content"]) >= 4)
    stop = first[2:4]
    cut = chat(base_url, seed=seed, max_tokens=12, stop=[stop])
    assert cut["choices"][0]["message"]["content"] == first[:first.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["stop_reason"] == stop
    usage = cut["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_max_tokens_defaults_to_the_rest_of_the_context(base_url):
    answer = chat(base_url, seed=1, temperature=0)
    used = answer["usage"]
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    if answer["choices"][0]["finish_reason"] == "length":
        assert used["prompt_tokens"] + used["completion_tokens"] == CTX


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("body, param, wording", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ({"logit_bias": {"1": 2}}, "logit_bias", "not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "role 'tool'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "x"}}]}]},
     "messages", "content must be text"),
    ({"messages": CHAT, "continue_final_message": True, "add_generation_prompt": False},
     "messages", "final message must be an assistant"),
    ({"continue_final_message": True}, "continue_final_message", "Cannot set both"),
    ({"top_logprobs": 2}, "top_logprobs", "`logprobs` must be set to true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "greater than max allowed: 20"),
    ({"max_tokens": 0}, "max_tokens", "at least 1"),
    ({"max_completion_tokens": CTX}, "input_tokens", "context length is only"),
    ({"temperature": -1}, "temperature", "at least 0"),
    ({"n": 2, "temperature": 0}, "n", "greedy"),
    ({"messages": []}, "messages", "must not be empty"),
])
def test_bad_requests_are_400_naming_the_field(base_url, body, param, wording):
    r = post(base_url, "/v1/chat/completions", {"messages": CHAT, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert wording in error["message"] and error["param"] == param, error


def test_a_lone_surrogate_in_a_message_is_a_400(base_url):
    r = httpx.post(f"{base_url}/v1/chat/completions", timeout=None,
                   headers={"Content-Type": "application/json"},
                   content=b'{"messages": [{"role": "user", "content": "\\ud800"}]}')
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]


def test_the_sdk_raises_on_refusals(client):
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.chat.completions.create(model="", messages=CHAT, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {}}}])


def test_a_client_that_leaves_a_chat_stream_does_not_hold_the_server(base_url):
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", timeout=None,
                      json={"messages": CHAT, "max_tokens": 900, "n": 4, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 8:
                break
    answer = chat(base_url, max_tokens=2)
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert math.isfinite(answer["usage"]["completion_tokens"])
