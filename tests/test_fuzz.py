"""Every route of a real ``spectrum-local serve``, fuzzed from its own OpenAPI schema by
schemathesis: valid and invalid bodies, boundary values, odd strings. The server must never
answer 5xx, and every error must be the JSON error body."""

from __future__ import annotations

import os

import pytest
import schemathesis
from conftest import SERVED_FAMILY
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from servers import running_server

pytestmark = pytest.mark.http  # the HTTP layer: run once by `make test`, not per CPU setting

# Fields that multiply the work of a request that is valid: large valid values are brought
# down to these (values at or below them, and invalid ones, are sent as generated), so that a
# few hundred cases per route take seconds, not hours. The server's own limits on them are
# tested where they are defined (test_server.py, test_openai.py).
WORK_CAPS = {"n": 4, "max_tokens": 8, "max_completion_tokens": 8, "max_decoded": 64,
             "max_outputs": 4, "k": 50, "logprobs": 5, "prompt_logprobs": 5}


# The routes in the schema, each fuzzed in its own test (the schema is checked to list no other).
OPERATIONS = [("GET", "/spectrum/v1/info"), ("POST", "/spectrum/v1/score"),
              ("POST", "/spectrum/v1/top"), ("POST", "/spectrum/v1/enumerate"),
              ("POST", "/spectrum/v1/sample"), ("GET", "/v1/models"),
              ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
              ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/tokenizer_info"),
              ("GET", "/api/version"), ("GET", "/api/tags"), ("GET", "/api/ps"),
              ("POST", "/api/show"), ("POST", "/api/generate"), ("POST", "/api/chat"),
              ("POST", "/api/{action}"), ("DELETE", "/api/{action}")]


@pytest.fixture(scope="module")
def api_schema(f32):
    # schemathesis' own pytest fixture loader does not run on pytest 9: its Python API does.
    with running_server(["--model", str(f32[SERVED_FAMILY]), "--ctx", "256"]) as url:
        yield schemathesis.openapi.from_url(url + "/openapi.json")


def test_the_schema_lists_the_fuzzed_routes(api_schema):
    listed = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert listed == set(OPERATIONS)


def capped(body, path: str):
    if isinstance(body, dict):
        if path == "/spectrum/v1/enumerate":  # its default budget, 20,000 tokens, is seconds
            body.setdefault("max_decoded", WORK_CAPS["max_decoded"])
        if path == "/v1/chat/completions":  # chat's default: the rest of the context
            body.setdefault("max_tokens", WORK_CAPS["max_tokens"])
        options = body.setdefault("options", {}) if path in ("/api/generate", "/api/chat") \
            else None  # Ollama's default is the rest of the context too
        if isinstance(options, dict) and not (isinstance(options.get("num_predict"), int)
                                              and options["num_predict"] <= 8):
            options["num_predict"] = WORK_CAPS["max_tokens"]
        for name, cap in WORK_CAPS.items():
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                body[name] = cap
    return body


@pytest.mark.parametrize("method,path,mode", [
    (method, path, mode) for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    # a GET, and the refused Ollama routes, have no body to get wrong
    if (method == "POST" and path != "/api/{action}") or mode is GenerationMode.POSITIVE])
def test_no_request_gets_a_5xx_and_every_error_is_json(api_schema, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=int(os.environ.get("FUZZ_N", 150)), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def answers_well(case):
        case.body = capped(case.body, path)
        response = case.call(timeout=None)
        assert response.status_code < 500, (case.as_curl_command(), response.text)
        if response.status_code >= 400:
            assert response.headers["content-type"] == ["application/json"], response.text
            error = response.json()["error"]
            if path.startswith("/api/"):  # Ollama's error body: {"error": message}
                assert isinstance(error, str) and error, error
            else:
                assert error["code"] == response.status_code and error["message"], error

    answers_well()
