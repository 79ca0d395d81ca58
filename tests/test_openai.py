"""The OpenAI/vLLM-compatible routes (/v1/completions, /v1/models, /tokenize, /detokenize)
against a real ``spectrum-local serve`` on loopback, driven by the real ``openai`` SDK.

The server runs the tiny F32 models, where numbers are exact on any CPU: one server per family,
started once for the module (most tests use the gemma3 one). Sampling on these random-weight
models gives arbitrary text, so the tests take their stop strings and stop tokens from a first,
seeded answer and check what the second one does with them.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from servers import running_server  # noqa: E402

from spectrum_local import formats  # noqa: E402

pytestmark = pytest.mark.http  # the HTTP layer: run once by `make test`, not per CPU setting

DICE = [{"role": "description",
         "content": "Roll two six-sided dice. What is the sum of their values?"}]
CTX = 1024
EXACT = 1e-3  # F32 model, F32 cache: the HTTP path and the Python API agree to rounding


@pytest.fixture(scope="module")
def servers(f32):
    """family -> base URL of a server on that family's F32 model (started on first use)."""
    with contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}

        def url(family: str) -> str:
            if family not in urls:
                urls[family] = stack.enter_context(running_server(
                    ["--model", str(f32[family]), "--ctx", str(CTX)]))
            return urls[family]

        yield url


@pytest.fixture(scope="module")
def base_url(servers) -> str:
    return servers("gemma3")


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def prompt() -> str:
    """A raw prompt in the gemma3 spectrum format, control tokens written as markers (the BOS
    left out: add_special_tokens adds it)."""
    fmt = formats.get_format("gemma3")
    return fmt.text(fmt.render(formats.parse_messages(DICE))).removeprefix("<bos>")


def post(base_url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", json=body, timeout=None)  # however long it takes


def completion(base_url: str, **body) -> dict:
    r = post(base_url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


def tokenize(base_url: str, text: str, add_special_tokens: bool = True) -> list[int]:
    r = post(base_url, "/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def ids_of(logprobs) -> list[int]:
    """The token ids of a logprobs object returned with return_tokens_as_token_ids."""
    tokens = logprobs["tokens"] if isinstance(logprobs, dict) else logprobs.tokens
    assert all(t.startswith("token_id:") for t in tokens)
    return [int(t.removeprefix("token_id:")) for t in tokens]


# -- /v1/models ----------------------------------------------------------------------------------


def test_models_lists_the_loaded_model(base_url, client, f32):
    body = httpx.get(f"{base_url}/v1/models", timeout=None).json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == card["root"] == f32["gemma3"].stem  # no local path
    assert card["object"] == "model" and card["max_model_len"] == CTX
    assert card["parent"] is None and isinstance(card["created"], int) and card["owned_by"]
    assert card["permission"][0]["object"] == "model_permission"
    assert [m.id for m in client.models.list().data] == [card["id"]]


# -- /v1/completions through the SDK ---------------------------------------------------------


def test_sdk_completion_returns_n_choices_with_logprobs(client, model_id, prompt, base_url):
    r = client.completions.create(model=model_id, prompt=prompt, max_tokens=6, n=3, seed=1,
                                  logprobs=2, extra_body={"return_token_ids": True,
                                                          "return_tokens_as_token_ids": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == model_id
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.prompt_tokens == len(tokenize(base_url, prompt))
    assert r.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in r.choices)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    for c in r.choices:
        assert c.finish_reason in ("stop", "length")
        lp = c.logprobs
        n_tokens = len(c.model_extra["token_ids"])
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) \
            == len(lp.text_offset)
        if c.finish_reason == "length":
            assert n_tokens == 6 and c.model_extra["stop_reason"] is None
            # return_tokens_as_token_ids: the tokens are "token_id:N", the very ids generated
            assert ids_of(lp) == c.model_extra["token_ids"]
        # text_offset: vLLM adds up the lengths of the token strings
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert logprob <= 0 and token in top and top[token] == logprob
            assert 2 <= len(top) <= 3  # the sampled token and the 2 most likely
            assert max(top.values()) >= logprob
    assert c.model_extra["prompt_logprobs"] is None and c.model_extra["prompt_token_ids"]


def test_seeded_samples_repeat_and_differ_between_seeds(base_url, prompt):
    first = completion(base_url, prompt=prompt, max_tokens=8, n=2, seed=5, return_token_ids=True)
    again = completion(base_url, prompt=prompt, max_tokens=8, n=2, seed=5, return_token_ids=True)
    other = completion(base_url, prompt=prompt, max_tokens=8, n=2, seed=6, return_token_ids=True)
    ids = [[c["token_ids"] for c in r["choices"]] for r in (first, again, other)]
    assert ids[0] == ids[1] and ids[0] != ids[2]
    # seeds seed, seed+1, ...: the second sample of seed 5 is the first of seed 6
    assert ids[0][1] == ids[2][0]


@pytest.mark.parametrize("family", ["gemma3", "llama3", "qwen3"])
def test_prompt_logprobs_sum_to_the_score(servers, family):
    """Sum of vLLM's prompt_logprobs over candidate + end-of-output, for prompt + candidate +
    end-of-output sent as token ids, is what /spectrum/v1/score reports."""
    url = servers(family)
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    fmt = formats.get_format(family)
    parsed = formats.parse_messages(DICE)
    # "\n\nfig": the tokenizer merges it with the prompt's last text (score handles that)
    candidates = ["7", "12", "seven", "\n\nfig"]
    scored = post(url, "/spectrum/v1/score", {"messages": DICE, "candidates": candidates}).json()
    # The rendered text holds the control markers (BOS too): tokenise it as written.
    prompt = tokenize(url, fmt.text(fmt.render(parsed)), add_special_tokens=False)

    def prompt_logprobs(tokens: list[int]) -> list[float]:
        r = sdk.completions.create(model="", prompt=tokens, max_tokens=1,
                                   extra_body={"prompt_logprobs": 0})
        positions = r.choices[0].model_extra["prompt_logprobs"]
        assert positions[0] is None and len(positions) == len(tokens)
        return [0.0] + [p[str(t)]["logprob"] for t, p in zip(tokens[1:], positions[1:])]

    prompt_lp = prompt_logprobs(prompt)
    merged = []
    for c in scored["candidates"]:
        full = tokenize(url, fmt.text(fmt.render(parsed, candidate=c["text"])),
                        add_special_tokens=False)
        start = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), len(prompt))
        # the candidate's tokens and the end-of-output token (less any part of the prompt the
        # tokenizer merged the candidate into, as score does)
        logprob = sum(prompt_logprobs(full)[start:]) - sum(prompt_lp[start:])
        assert logprob == pytest.approx(c["logprob"], abs=EXACT)
        merged.append(start < len(prompt))
    assert merged[:3] == [False] * 3


def test_echo_logprobs_are_the_prompt_logprobs(base_url, prompt):
    """The legacy way (llama-cpp-python's, vLLM's): echo + logprobs with max_tokens=0."""
    tokens = tokenize(base_url, prompt)
    echo = completion(base_url, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    plp = completion(base_url, prompt=tokens, max_tokens=1, prompt_logprobs=1)
    choice = echo["choices"][0]
    assert choice["text"] == prompt  # the prompt only
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(tokens) and lp["tokens"][0] == "<bos>"
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    positions = plp["choices"][0]["prompt_logprobs"]
    for t, value, position in zip(tokens[1:], lp["token_logprobs"][1:], positions[1:]):
        assert value == pytest.approx(position[str(t)]["logprob"], abs=1e-9)
        assert position[str(t)]["rank"] >= 1
        others = [v for k, v in position.items() if k != str(t)]
        assert [v["rank"] for v in others] in ([1], [])
    # vLLM fills the choice's prompt_logprobs too when echo asks for logprobs
    assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == len(tokens)


def test_echo_prepends_the_prompt(base_url, prompt):
    tokens = tokenize(base_url, prompt)
    r = completion(base_url, prompt=prompt, max_tokens=4, seed=2, echo=True, logprobs=0,
                   return_tokens_as_token_ids=True)
    plain = completion(base_url, prompt=prompt, max_tokens=4, seed=2)
    choice = r["choices"][0]
    assert choice["text"] == prompt + plain["choices"][0]["text"]
    assert ids_of(choice["logprobs"])[:len(tokens)] == tokens
    # a token-id prompt echoes its decoded text, control tokens as markers
    r = completion(base_url, prompt=tokens, max_tokens=0, echo=True)
    assert r["choices"][0]["text"] == "<bos>" + prompt


def test_stop_strings_cut_the_text(base_url, client, prompt):
    base = completion(base_url, prompt=prompt, max_tokens=16, seed=3)["choices"][0]["text"]
    # a stop string taken from the answer, where it first occurs
    at = next(i for i in range(1, len(base) - 1) if base.find(base[i:i + 2]) == i)
    stop = base[at:at + 2]
    cut = completion(base_url, prompt=prompt, max_tokens=16, seed=3, stop=[stop, "\x00never"])
    choice = cut["choices"][0]
    assert choice["text"] == base[:at]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    kept = completion(base_url, prompt=prompt, max_tokens=16, seed=3, stop=stop,
                      include_stop_str_in_output=True)["choices"][0]
    assert kept["text"] == base[:at + 2]
    streamed = client.completions.create(model="", prompt=prompt, max_tokens=16, seed=3,
                                         stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == base[:at]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].model_extra["stop_reason"] == stop


def test_stop_token_ids_end_the_sample(base_url, prompt):
    base = completion(base_url, prompt=prompt, max_tokens=16, seed=4, return_token_ids=True)
    ids = base["choices"][0]["token_ids"]
    at = next(i for i in range(1, len(ids)) if ids.index(ids[i]) == i)
    r = completion(base_url, prompt=prompt, max_tokens=16, seed=4, stop_token_ids=[ids[at]],
                   return_token_ids=True)
    shorter = completion(base_url, prompt=prompt, max_tokens=at, seed=4)
    choice = r["choices"][0]
    # as in vLLM: the stop token is in token_ids (and usage) but not in the text
    assert choice["token_ids"] == ids[:at + 1]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == ids[at]
    assert choice["text"] == shorter["choices"][0]["text"]
    assert r["usage"]["completion_tokens"] == at + 1


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"seed": 11, "n": 2}])
def test_streaming_concatenates_to_the_same_answer(client, prompt, sampling):
    args = dict(model="", prompt=prompt, max_tokens=12, logprobs=1, **sampling)
    whole = client.completions.create(**args)
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(**args, stream=True,
                                           stream_options={"include_usage": True}):
        assert chunk.object == "text_completion" and chunk.id.startswith("cmpl-")
        if chunk.usage:
            usage = chunk.usage
            assert chunk.choices == []
        for c in chunk.choices:
            assert c.index not in finish  # nothing after a choice's last chunk
            texts[c.index] = texts.get(c.index, "") + c.text
            tokens.setdefault(c.index, []).extend(c.logprobs.tokens)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert tokens == {c.index: c.logprobs.tokens for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_several_prompts_give_n_choices_each(base_url, prompt):
    r = completion(base_url, prompt=[prompt, prompt + "1"], max_tokens=3, n=2, seed=1)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    one = len(tokenize(base_url, prompt))
    assert r["usage"]["prompt_tokens"] == one + len(tokenize(base_url, prompt + "1"))
    alone = completion(base_url, prompt=prompt, max_tokens=3, n=2, seed=1)
    assert [c["text"] for c in r["choices"][:2]] == [c["text"] for c in alone["choices"]]


def test_a_client_that_leaves_a_stream_does_not_hold_the_server(base_url, prompt):
    with httpx.stream("POST", f"{base_url}/v1/completions", timeout=None,
                      json={"prompt": prompt, "max_tokens": 900, "n": 4, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 6:
                break
    # the server goes on serving (its samples end at their next token: cancel is set)
    r = completion(base_url, prompt=prompt, max_tokens=2)
    assert r["choices"][0]["finish_reason"] in ("stop", "length")


# -- /tokenize and /detokenize -----------------------------------------------------------------


def test_tokenize_round_trips_through_detokenize(base_url):
    text = "Roll two six-sided dice. What is the sum? 7, or maybe 12."
    plain = tokenize(base_url, text, add_special_tokens=False)
    r = post(base_url, "/detokenize", {"tokens": plain})
    assert r.status_code == 200 and r.json() == {"prompt": text}
    body = post(base_url, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert body["tokens"] == [2] + plain  # add_special_tokens (the default) adds the BOS
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == CTX
    assert body["token_strs"][0] == "<bos>" and len(body["token_strs"]) == body["count"]
    assert post(base_url, "/detokenize", {"tokens": body["tokens"]}).json()["prompt"] \
        == "<bos>" + text
    assert post(base_url, "/tokenize", {"prompt": text}).json()["token_strs"] is None


def test_control_markers_in_a_raw_prompt_are_control_tokens(base_url, client):
    """As vLLM reads a completion prompt: <end_of_turn> in the text is the control token."""
    marker = tokenize(base_url, "<end_of_turn>", add_special_tokens=False)
    assert len(marker) == 1
    tokens = tokenize(base_url, "a<end_of_turn>b", add_special_tokens=False)
    assert tokens.count(marker[0]) == 1
    assert post(base_url, "/detokenize", {"tokens": tokens}).json()["prompt"] == "a<end_of_turn>b"
    r = client.completions.create(model="", prompt="a<end_of_turn>b", max_tokens=1)
    assert r.usage.prompt_tokens == len(tokens) + 1  # and the BOS


# -- errors and leniency -----------------------------------------------------------------------


@pytest.mark.parametrize("body, param, wording", [
    ({"n": 0}, "n", "n must be at least 1, got 0"),
    ({"max_tokens": -1}, "max_tokens", "max_tokens must be at least 1, got -1."),
    ({"logprobs": 50}, "logprobs",
     "Requested sample logprobs of 50, which is greater than max allowed: 20"),
    ({"prompt_logprobs": 21}, "prompt_logprobs",
     "Requested prompt logprobs of 21, which is greater than max allowed: 20"),
    ({"prompt": "dice " * 1100}, "input_tokens", "However, the model's context length is only"),
    ({"max_tokens": CTX + 1}, "max_tokens", "cannot be greater than max_model_len=1024"),
    ({"temperature": -1}, "temperature", "temperature must be at least 0, got -1"),
    ({"top_p": 0}, "top_p", "top_p must be greater than 0, got 0"),
    ({"n": 300}, "n", "n must be at most 256, got 300"),
    ({"stop": [""]}, "stop", "stop cannot contain an empty string."),
    ({"prompt": [1, 10**6]}, "prompt", "Token id 1000000 is out of vocabulary"),
    ({"prompt": ""}, "prompt", "Either prompt or prompt_embeds must be provided and non-empty."),
    ({"temperature": 0, "n": 2}, "n", "n must be 1 when using greedy sampling, got 2."),
    ({"stream_options": {"include_usage": True}}, "stream_options",
     "Stream options can only be defined when `stream=True`."),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
])
def test_bad_values_are_400_with_vllm_wording(base_url, prompt, body, param, wording):
    r = post(base_url, "/v1/completions", {"prompt": prompt, **body})
    assert r.status_code == 400
    error = r.json()["error"]
    assert wording in error["message"]
    assert error["param"] == param and error["code"] == 400
    assert error["type"] == "BadRequestError"


def test_wrong_types_and_bad_json_are_400(base_url, prompt):
    for body in ({"prompt": prompt, "n": "many"}, {"prompt": prompt, "logprobs": [1]},
                 {"prompt": {"text": prompt}}, {"prompt": [-1]}):
        r = post(base_url, "/v1/completions", body)
        assert r.status_code == 400 and r.json()["error"]["message"], body
    r = httpx.post(f"{base_url}/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=None)
    assert r.status_code == 400 and "error" in r.json()


def test_sdk_raises_on_bad_values_and_unknown_models(client, model_id, prompt, f32):
    with pytest.raises(openai.BadRequestError, match="n must be at least 1"):
        client.completions.create(model=model_id, prompt=prompt, n=0)
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4` does not exist."):
        client.completions.create(model="gpt-4", prompt=prompt, max_tokens=1)
    # the file name alone names the model too
    r = client.completions.create(model=f32["gemma3"].name, prompt=prompt, max_tokens=1)
    assert r.model == model_id


def test_unknown_fields_are_ignored(base_url, prompt):
    r = completion(base_url, prompt=prompt, max_tokens=2, user="someone", metadata={"a": 1},
                   not_a_vllm_field=[1, 2, 3], seed=1)
    assert len(r["choices"]) == 1
    assert post(base_url, "/tokenize", {"prompt": "x", "whatever": True}).status_code == 200


def test_sampling_defaults_are_untruncated(base_url, prompt):
    """No temperature/top_p/top_k/min_p in the request: the model's own distribution, the
    same as asking for it explicitly (vLLM's off values: top_k -1 or 0)."""
    default = completion(base_url, prompt=prompt, max_tokens=8, n=3, seed=9)
    explicit = completion(base_url, prompt=prompt, max_tokens=8, n=3, seed=9, temperature=1,
                          top_p=1, top_k=-1, min_p=0)
    assert [c["text"] for c in default["choices"]] == [c["text"] for c in explicit["choices"]]
    assert default["usage"]["completion_tokens"] <= 24
