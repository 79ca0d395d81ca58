"""One definition per operation's options (spectrum_local/ops.py): every front end rejects a bad
value with the same message and the same kind of error (the Python API and a batch line: an
InputError; the command line: exit 2 with that line, before a model loads; HTTP: a 400 with it;
the remote client: the same InputError), and a field added to an ops model is an option of the
command line without another edit."""

import json
import subprocess
import sys

import click
import httpx
import pytest
from click.testing import CliRunner
from conftest import DICE, SERVED_FAMILY
from pydantic import Field

import spectrum_local
from spectrum_local import InputError
from spectrum_local.batch import run_batch
from spectrum_local.cli import cli
from spectrum_local.cli.options import from_model
from spectrum_local.ops import (OPERATIONS, SERVER_MAX_K, SERVER_MAX_N, Count, SampleOptions,
                                TopOptions)
from spectrum_local.remote import _error_message

# (operation, the bad options as JSON gives them, the same on the command line, the message)
BAD = [
    ("sample", {"n": 0}, ["-n", "0"], "n must be at least 1, got 0"),
    ("sample", {"max_tokens": 0}, ["--max-tokens", "0"], "max_tokens must be at least 1, got 0"),
    ("sample", {"top_p": 1.5}, ["--top-p", "1.5"], "top_p must be at most 1, got 1.5"),
    ("sample", {"temperature": -0.5}, ["--temperature", "-0.5"],
     "temperature must be at least 0, got -0.5"),
    ("sample", {"n": 10_001}, ["-n", "10001"], "n must be at most 10000, got 10001"),
    ("top", {"k": 0}, ["-k", "0"], "k must be at least 1, got 0"),
    ("enumerate", {"coverage": 1.5}, ["--coverage", "1.5"], "coverage must be at most 1, got 1.5"),
    ("enumerate", {"max_decoded": -1}, ["--max-decoded", "-1"],
     "max_decoded must be at least 0, got -1"),
    ("score", {"candidates": "12..2"}, ["-c", "12..2"],
     "invalid range '12..2': the end is smaller than the start"),
    ("score", {"candidates": ["a", ""]}, ["-c", "a,,b"],
     "a candidate is the empty string; an empty output is not scored (remove it, e.g. a stray "
     "comma in --candidates)"),
]
# Values only JSON and Python can give (the command line's text is parsed by click first).
BAD_TYPES = [
    ("sample", {"n": "5"}, "n must be a whole number, got '5'"),
    ("sample", {"max_tokens": 1.5}, "max_tokens must be a whole number, got 1.5"),
    ("sample", {"top_k": True}, "top_k must be a whole number, got True"),
    ("top", {"prefix": 3}, "prefix must be a string, got 3"),
    ("score", {"candidates": ["a", 1]}, "candidates[1] must be a string, got 1"),
    ("enumerate", {"min_prob": "0.1"}, "min_prob must be a number, got '0.1'"),
]
EVERY = [(op, options, message) for op, options, _, message in BAD] + BAD_TYPES


def call(model, operation: str, options: dict):
    options = dict(options)
    if operation == "score":
        return model.score(DICE, options.pop("candidates"), **options)
    return getattr(model, operation)(DICE, **options)


@pytest.fixture(scope="module")
def local(f32_models):
    return f32_models[SERVED_FAMILY]


@pytest.mark.parametrize("operation, options, message", EVERY)
def test_the_api_and_a_batch_line_refuse_with_the_same_message(local, tmp_path, operation,
                                                               options, message):
    with pytest.raises(InputError) as refused:
        call(local, operation, options)
    if isinstance(options.get("candidates"), str):  # a spec: the API takes a list
        assert str(refused.value) == "candidates must be a list of strings, not one string"
    else:
        assert str(refused.value) == message
    src = tmp_path / "in.jsonl"
    good = {"candidates": ["1", "2"]} if operation == "score" else {}
    src.write_text(json.dumps({"id": "bad", "messages": DICE, **good, **options}) + "\n")
    reports = []
    summary = run_batch(local, operation, str(src), str(tmp_path / "out.jsonl"), defaults={},
                        shared_messages=[], resume=False, strict=False,
                        report=reports.append, progress=False)
    assert summary.failed == [(1, message)]
    assert reports == [f"{src} line 1: {message} (skipped)"]


@pytest.mark.parametrize("operation, options, args, message", BAD)
def test_the_command_line_refuses_with_the_same_line_before_a_model_loads(operation, options,
                                                                         args, message):
    extra = ["-c", "1,2"] if operation == "score" and "-c" not in args else []
    proc = subprocess.run([sys.executable, "-m", "spectrum_local", operation, "-d", "x", *args,
                           *extra, "-m", "/nonexistent/model.gguf"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"Error: {message}\n"


def test_unknown_fields_are_named(local, tmp_path):
    assert_refused = pytest.raises(InputError, match=r"^unknown field\(s\): temprature$")
    with assert_refused:
        SampleOptions.check(temprature=1.0)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"messages": DICE, "temprature": 1}) + "\n")
    summary = run_batch(local, "sample", str(src), str(tmp_path / "out.jsonl"), defaults={},
                        shared_messages=[], resume=False, strict=False, report=print,
                        progress=False)
    assert summary.failed == [(1, "unknown field(s): temprature")]


@pytest.mark.http
@pytest.mark.parametrize("operation, options, message", EVERY)
def test_http_and_the_remote_client_refuse_with_the_same_message(f32_server, operation,
                                                                 options, message):
    fields = {**({"candidates": ["1"]} if operation == "score" else {}), **options}
    answer = httpx.post(f"{f32_server}/spectrum/v1/{operation}",
                        json={"messages": DICE, **fields}, timeout=60)
    if set(options) & set(OPERATIONS[operation].server_caps):  # n=10001: the cap of 256 first
        with pytest.raises(InputError) as capped:
            OPERATIONS[operation].served().check(**fields)
        message_over_http = str(capped.value)
    else:
        message_over_http = message
    assert answer.status_code == 400 and _error_message(answer) == message_over_http
    served = spectrum_local.connect(f32_server)
    try:
        with pytest.raises(InputError) as refused:
            call(served, operation, options)
        assert str(refused.value) == message
    finally:
        served.close()


@pytest.mark.http
def test_the_server_caps_read_as_the_api_bounds_do(f32_server):
    for operation, options, message in [
            ("sample", {"n": SERVER_MAX_N + 1}, f"n must be at most {SERVER_MAX_N}, got 257"),
            ("top", {"k": SERVER_MAX_K + 1}, f"k must be at most {SERVER_MAX_K}, got 1001")]:
        answer = httpx.post(f"{f32_server}/spectrum/v1/{operation}",
                            json={"messages": DICE, **options}, timeout=60)
        assert answer.status_code == 400 and _error_message(answer) == message
        ops = OPERATIONS[operation].served()
        with pytest.raises(InputError, match=f"^{message}$"):
            ops.check(**options)
    served = spectrum_local.connect(f32_server)
    try:
        with pytest.raises(InputError, match=r"\(400\): k must be at most 1000, got 5000$"):
            served.top(DICE, k=5000)
    finally:
        served.close()


def test_every_field_of_every_operation_is_a_command_line_option():
    runner = CliRunner()
    for operation, options in OPERATIONS.items():
        text = runner.invoke(cli, [operation, "--help"], terminal_width=200).output
        for name, field in options.model_fields.items():
            if name == "candidates":  # -c specs and --candidates-file (the command's own)
                continue
            flag = f"-{name} " if len(name) == 1 else "--" + name.replace("_", "-")
            assert flag in text, (operation, flag)
            assert field.description.split()[0] in text, (operation, name)


def test_a_new_field_is_an_option_with_its_default_help_and_bounds():
    """What adding a field to an ops model gives the command line, with no other edit: the
    option, its help, its default and bounds in --help, and the model's message for a bad
    value."""
    class Extended(SampleOptions):
        beam_width: Count = Field(4, ge=1, le=64, description="Beams kept at each step.")

    @click.command()
    @from_model(Extended)
    def command(**values):
        click.echo(json.dumps(Extended.check(**values).model_dump()))

    runner = CliRunner()
    text = runner.invoke(command, ["--help"], terminal_width=200).output
    assert "--beam-width INTEGER" in text
    assert "Beams kept at each step.  [default: 4; 1<=x<=64]" in text
    assert json.loads(runner.invoke(command, ["--beam-width", "8"]).output)["beam_width"] == 8
    refused = runner.invoke(command, ["--beam-width", "65"])
    assert isinstance(refused.exception, InputError)
    assert str(refused.exception) == "beam_width must be at most 64, got 65"


def test_served_models_keep_the_api_bounds_and_add_the_caps():
    served = TopOptions.served()
    assert served.check(k=SERVER_MAX_K).k == SERVER_MAX_K
    with pytest.raises(InputError, match="^k must be at least 1, got 0$"):
        served.check(k=0)
    assert TopOptions.check(k=SERVER_MAX_K + 1).k == SERVER_MAX_K + 1  # the API has no cap
    schema = SampleOptions.served().model_json_schema()["properties"]["n"]
    assert (schema["minimum"], schema["maximum"]) == (1, SERVER_MAX_N)
