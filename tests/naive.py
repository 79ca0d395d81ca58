"""The naive reference: llama-cpp-python's high-level Llama, one full evaluation per
candidate, with logits at every position. Shared by the tests (as an independent second code
path) and the benchmark (as the baseline)."""

from __future__ import annotations

import contextlib
from typing import Sequence

import llama_cpp
import numpy as np

from spectrum_local.backend import common_prefix
from spectrum_local.llama import use_extra_buffer_types
from spectrum_local.formats import get_format, parse_messages
from spectrum_local.source import DEFAULT_ADAPTER

# The default model is the base GGUF plus this adapter: the naive path applies it too.
DEFAULT_LORA = str(DEFAULT_ADAPTER)


@contextlib.contextmanager
def _same_model_params():
    # Llama builds its model params itself; give it the engine's CPU buffer choice (AMX off).
    # llama.py calls it through the llama_cpp.llama_cpp submodule.
    api = llama_cpp.llama_cpp
    original = api.llama_model_default_params

    def patched():
        params = original()
        params.use_extra_bufts = use_extra_buffer_types()
        return params

    api.llama_model_default_params = patched
    try:
        yield
    finally:
        api.llama_model_default_params = original


def naive_llama(path: str, n_ctx: int = 2048, *, n_batch: int = 512,
                f32_cache: bool = False, lora_path: str | None = None) -> llama_cpp.Llama:
    """``n_batch`` sets how many tokens go into one llama_decode (the batch layout);
    ``f32_cache`` keeps the KV cache in F32, as the engine does for F32 models; ``lora_path``
    applies a GGUF LoRA adapter at scale 1 (llama-cpp-python's own adapter loading).
    Attention is the engine's: plain with the F32 cache (as for F32 models), else flash
    attention, which llama.cpp's default (auto) picks on CPU; the two differ by up to ~1 nat on
    a quantized model's far tail (a -28 nat candidate of the demo adapter)."""
    f32 = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    with _same_model_params():
        return llama_cpp.Llama(path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                               logits_all=True, verbose=False, lora_path=lora_path,
                               flash_attn=not f32_cache, **f32)


def sequence_logprob(llm: llama_cpp.Llama, context: Sequence[int], tokens: Sequence[int]) -> float:
    """log P(tokens | context), evaluating context + tokens from scratch."""
    llm.reset()
    llm.eval(list(context) + list(tokens[:-1]))
    rows = np.asarray(llm.scores[len(context) - 1:len(context) - 1 + len(tokens)], dtype=np.float64)
    rows -= rows.max(axis=1, keepdims=True)
    logprobs = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
    return float(sum(logprobs[i, t] for i, t in enumerate(tokens)))


def prompt_and_full_tokens(model, messages, candidate) -> tuple[list[int], list[int]]:
    """The prompt's tokens, and those of the prompt with the candidate as a closed output turn."""
    fmt, parsed = get_format(model.format), parse_messages(messages)
    return (model.tokenize(fmt.render(parsed)),
            model.tokenize(fmt.render(parsed, candidate=candidate)))


def naive_score(model, naive, messages, candidate):
    """log P(candidate + end-of-output | prompt) from a full evaluation per candidate, with the
    prompt and candidate rendered as one string and split where their tokens first differ."""
    prompt, full = prompt_and_full_tokens(model, messages, candidate)
    start = common_prefix(prompt, full)
    logprob = sequence_logprob(naive, full[:start], full[start:])
    if start < len(prompt):
        logprob -= sequence_logprob(naive, prompt[:start], prompt[start:])
    return logprob
