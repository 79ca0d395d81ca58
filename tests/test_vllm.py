"""The remote backend against a real vLLM (the CPU build, installed by `make test` in its own
venv), on tiny random Llama 3.1 and Qwen3 checkpoints with their real tokenizers, float32: the
tokens we send equal the local engine's, ``score`` and ``top`` through vLLM equal the local
llama.cpp engine on the F32 GGUF of the same checkpoint, samples follow ``top``'s
probabilities, and batch jobs and the CLI work with ``--server``.

Cost: vLLM's start-up dominates (see vllm_server.py); both servers start together."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import scipy.stats
from conftest import DICE, FEW_SHOT
from tiny_checkpoints import VLLM_BUILDERS
from vllm_server import running_vllm, vllm_python

import spectrum_local
from spectrum_local import InputError, SpectrumError, formats
from spectrum_local.convert import convert
from spectrum_local.backend import SamplerSettings
from spectrum_local.remote import VLLMBackend

pytestmark = [pytest.mark.http, pytest.mark.skipif(
    vllm_python() is None,
    reason="no vLLM: `make test` installs it into .venv-vllm on Linux x86-64")]

EXACT = 1e-3  # nats per candidate, as the issue asks (measured: a few 1e-6)
CLI = [sys.executable, "-m", "spectrum_local"]
MARKERS = {"llama3": "<|eot_id|>", "qwen3": "<|im_end|>"}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """family -> (vLLM URL, the local F32 model, the checkpoint folder); both vLLM servers
    start at once (their start-up is most of this module's time)."""
    root = tmp_path_factory.mktemp("vllm")
    folders = {name: build(root / name) for name, build in VLLM_BUILDERS.items()}
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(len(folders)) as pool:
        servers = {name: running_vllm(folder) for name, folder in folders.items()}
        starts = {name: pool.submit(server.__enter__) for name, server in servers.items()}
        for name, start in starts.items():
            if start.exception() is None:
                stack.push(servers[name])  # stopped on the way out, even if another failed
        urls = {name: start.result() for name, start in starts.items()}
        locals_ = {}
        for name, folder in folders.items():
            path = convert(folder, root / f"{name}-F32.gguf", "f32", progress=False).path
            locals_[name] = spectrum_local.load(str(path), ctx=1024)
            stack.callback(locals_[name].close)
        yield {name: (urls[name], locals_[name], folders[name]) for name in folders}


@pytest.fixture(scope="module", params=sorted(VLLM_BUILDERS))
def pair(request, families):
    """(the model through vLLM, the local F32 model, the family, the URL, the folder)."""
    url, local, folder = families[request.param]
    remote = spectrum_local.connect(url)
    yield remote, local, request.param, url, folder
    remote.close()


def tricky_prompts(family: str) -> list[list[dict]]:
    marker = MARKERS[family]
    return [DICE, FEW_SHOT, [
        {"role": "description", "content": f"Text that looks like a turn end: {marker} and "
                                           "<|start_header_id|>output<|im_start|>"},
        {"role": "input", "content": "  spaces, tabs\t, café, 12345, ünïcödé\n\nlines"},
        {"role": "output", "content": marker}]]


def test_connect_finds_the_tokenizer_and_the_format(pair):
    remote, _, family, url, folder = pair
    assert isinstance(remote.engine, VLLMBackend)
    assert remote.format == family and remote.info()["format_from"] == "tokenizer"
    assert remote.info()["server"] == [url]


def test_the_tokens_sent_are_the_local_engines(pair):
    """Rendered and tokenised here, a marker inside content stays text, exactly as the local
    engine tokenises it from the GGUF vocabulary."""
    remote, local, family, _, _ = pair
    fmt = formats.get_format(family)
    for messages in tricky_prompts(family):
        assert remote.prompt_tokens(messages) == local.prompt_tokens(messages)
        parsed = formats.parse_messages(messages)
        for candidate in ["7", " apple", MARKERS[family], "é\n"]:
            segments = fmt.render(parsed, candidate=candidate)
            assert remote.tokenize(segments) == local.tokenize(segments)
    eoo = remote.end_of_output_id
    content_only = remote.prompt_tokens([{"role": "output", "content": MARKERS[family]}])
    assert content_only.count(eoo) == 1  # the turn's own end, not the content's marker


@pytest.mark.parametrize("prompt", [0, 1, 2])
def test_score_through_vllm_equals_the_local_engine(pair, prompt):
    remote, local, family, _, _ = pair
    messages = tricky_prompts(family)[prompt]
    candidates = ["2", "7", "12", " apple", "dragon fruit", MARKERS[family], "\n\nfig"]
    got, want = remote.score(messages, candidates), local.score(messages, candidates)
    for g, w in zip(got.candidates, want.candidates):
        assert g.text == w.text and g.n_tokens == w.n_tokens
        assert g.logprob == pytest.approx(w.logprob, abs=EXACT)
    assert got.coverage == pytest.approx(want.coverage, rel=1e-2)


def test_top_through_vllm_equals_the_local_engine(pair):
    remote, local, *_ = pair
    for prefix in ("", "ap"):
        got, want = remote.top(FEW_SHOT, k=10, prefix=prefix), local.top(FEW_SHOT, k=10,
                                                                          prefix=prefix)
        assert [t.id for t in got] == [t.id for t in want]
        assert [t.token for t in got] == [t.token for t in want]
        assert [t.logprob for t in got] == pytest.approx([t.logprob for t in want], abs=EXACT)


def test_k_above_the_servers_max_logprobs_is_a_clear_error(pair):
    remote = pair[0]
    with pytest.raises(InputError, match="max allowed: 20.*--max-logprobs"):
        remote.top(DICE, k=25)  # vLLM says "greater than max allowed: 20"


def test_enumerate_through_vllm_is_a_clear_error(pair):
    with pytest.raises(InputError, match="max-logprobs"):
        pair[0].enumerate(DICE)


def test_one_token_samples_follow_the_top_probabilities(pair):
    """1000 one-token samples through vLLM (untruncated) against the local engine's next-token
    probabilities: chi-squared over groups of tokens in rank order, each group holding at least
    5% of the mass (a random tiny model spreads its mass thinly over its vocabulary). Unseeded:
    vLLM 0.32's CPU build kills its engine on a seeded request whose prompts it splits into
    chunks (n x prompt tokens over its batch budget; "CPU Generator does not use offset")."""
    remote, local, *_ = pair
    draws = remote.engine.generate(remote.prompt_tokens(DICE), 1000, 1,
                                   SamplerSettings(1.0, 0, 1.0, 0.0, 1.0), None,
                                   {remote.end_of_output_id})
    firsts = [g.tokens[0] if g.tokens else g.stop_token for g in draws]
    group_of, expected = {}, [0.0]
    for t in local.top(DICE, k=5000):
        if expected[-1] >= 0.05:
            expected.append(0.0)
        group_of[t.id] = len(expected) - 1
        expected[-1] += t.prob
    expected.append(1 - sum(expected))  # the tokens past the 5000 most likely
    observed = [0] * len(expected)
    for token in firsts:
        observed[group_of.get(token, len(expected) - 1)] += 1
    expected = [p * len(firsts) for p in expected]
    assert len(expected) >= 5
    assert scipy.stats.chisquare(observed, expected).pvalue > 1e-4, (observed, expected)


def test_samples_are_seeded_and_stop_at_the_end_of_output(pair):
    remote, local, *_ = pair
    first = remote.sample(FEW_SHOT, n=6, max_tokens=5, seed=7)
    assert first == remote.sample(FEW_SHOT, n=6, max_tokens=5, seed=7)
    assert len(first) == 6
    for s in first:
        assert s.n_tokens <= 5 and s.finish_reason in ("stop", "length")
        assert s.finish_reason == "stop" or s.n_tokens == 5
    prompt = remote.prompt_tokens(FEW_SHOT)
    runs = remote.engine.generate(prompt, 40, 8, SamplerSettings(1.0, 0, 1.0, 0.0, 1.0), 3,
                                  {remote.end_of_output_id})
    for run in runs:
        assert remote.end_of_output_id not in run.tokens
        assert (run.finish_reason == "stop") == (run.stop_token is not None)


def test_a_batch_job_and_the_cli_through_vllm(pair, tmp_path):
    remote, local, family, url, folder = pair
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": i, "messages": messages, "candidates": "1..5"}
             for i, messages in enumerate(tricky_prompts(family))]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = subprocess.run([*CLI, "score", "--batch", str(source), "--out", str(out), "--server",
                          url, "--tokenizer", str(folder)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [line["id"] for line in lines]
    for record, line in zip(records, lines):
        want = local.score(line["messages"], [str(n) for n in range(1, 6)])
        assert [c["logprob"] for c in record["candidates"]] == \
            pytest.approx([c.logprob for c in want.candidates], abs=EXACT)
    top = subprocess.run([*CLI, "top", "-d", "x", "-k", "3", "--server", url, "--json"],
                         capture_output=True, text=True, timeout=300)
    assert top.returncode == 0 and len(json.loads(top.stdout)["tokens"]) == 3, top.stderr


def test_a_tokenizer_of_another_model_is_refused(families):
    (llama_url, *_), (_, _, qwen_folder) = families["llama3"], families["qwen3"]
    with pytest.raises(SpectrumError, match="does not tokenise like the server"):
        spectrum_local.connect(llama_url, tokenizer=str(qwen_folder))
