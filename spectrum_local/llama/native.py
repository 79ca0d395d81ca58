"""llama.cpp's C objects, one small owner class each (as llama-cpp-python's ``_internals.py``):
the owner allocates its object, is the only code that calls the C functions on it, and frees
it once. Everything above this module speaks Python: token lists, numpy rows, exceptions."""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from typing import Sequence

import llama_cpp
import numpy as np

from ..backend import SamplerSettings
from ..errors import InputError, SpectrumError
from ..interrupts import called_from_c, guard_ctrl_c
from ..ops import QUANTIZED_TYPES

_backend_lock = threading.Lock()
_backend_ready = False


def init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            # Silence llama.cpp's load chatter; errors still reach us through return codes.
            llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p(0))
            guard_ctrl_c()  # a Ctrl-C must not be lost inside _quiet_log
            llama_cpp.llama_backend_init()
            _backend_ready = True


@llama_cpp.llama_log_callback
@called_from_c
def _quiet_log(level, text, user_data):  # noqa: ARG001 - signature fixed by llama.cpp
    if os.environ.get("SPECTRUM_LOCAL_VERBOSE"):
        print(text.decode("utf-8", "replace"), end="", flush=True)


# -- what the machine and the build can do -------------------------------------------------------

def use_extra_buffer_types() -> bool:
    """Whether llama.cpp may repack CPU weights into its extra buffer types. Off on CPUs with
    AMX: llama.cpp 0.3.36's AMX matmul crashes (SIGSEGV) on them, seen on Xeon VMs.
    SPECTRUM_LOCAL_EXTRA_BUFTS=1 or 0 forces it."""
    forced = os.environ.get("SPECTRUM_LOCAL_EXTRA_BUFTS")
    if forced in ("0", "1"):
        return forced == "1"
    return not cpu_has_amx()


def cpu_has_amx() -> bool:
    return "amx_int8" in _cpuinfo()


def cpu_name() -> str:
    """The processor's model name (for reports: quantized numbers differ between CPUs)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:  # not Linux
        return ""


def supports_gpu_offload() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


def system_info() -> str:
    """The backends and CPU features llama.cpp was built with."""
    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


# -- the model: weights, vocabulary, metadata, adapters ------------------------------------------

class LlamaModel:
    """A loaded GGUF file (``llama_model``); LoRA adapters loaded on it are freed with it."""

    def __init__(self, path: str, gpu_layers: int):
        init_backend()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        params.use_extra_bufts = use_extra_buffer_types()
        self.ptr = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not self.ptr:
            raise SpectrumError(f"llama.cpp could not load {path} (not a valid GGUF model, or an "
                                "unsupported architecture; set SPECTRUM_LOCAL_VERBOSE=1 for details)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.ptr)
        self.metadata = self._read_metadata()

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    def _read_metadata(self) -> dict[str, str]:
        buf = ctypes.create_string_buffer(1 << 16)
        metadata = {}
        for i in range(llama_cpp.llama_model_meta_count(self.ptr)):
            n = llama_cpp.llama_model_meta_key_by_index(self.ptr, i, buf, len(buf))
            key = buf.value.decode("utf-8", "replace") if n >= 0 else None
            n = llama_cpp.llama_model_meta_val_str_by_index(self.ptr, i, buf, len(buf))
            if key and n >= 0:
                metadata[key] = buf.value.decode("utf-8", "replace")
        # Long values (the chat template) do not fit the buffer: ask for them by name.
        for key in ("tokenizer.chat_template",):
            if key in metadata:
                big = ctypes.create_string_buffer(1 << 20)
                llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), big, len(big))
                metadata[key] = big.value.decode("utf-8", "replace")
        return metadata

    def size(self) -> int:
        return llama_cpp.llama_model_size(self.ptr)

    def n_params(self) -> int:
        return llama_cpp.llama_model_n_params(self.ptr)

    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.ptr, buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def load_adapter(self, path: str):
        """A LoRA adapter's handle (freed with the model), or an InputError."""
        adapter = llama_cpp.llama_adapter_lora_init(self.ptr, path.encode())
        if not adapter:
            raise InputError(f"llama.cpp could not load the LoRA adapter {path}: not a GGUF "
                             "LoRA adapter, or made for another base model (set "
                             "SPECTRUM_LOCAL_VERBOSE=1 for llama.cpp's reason)")
        return adapter

    # -- tokens

    def tokenize(self, data: bytes, *, special: bool, bos: bool) -> tuple[ctypes.Array, int]:
        """``data``'s tokens in a C array, and how many there are (the caller decides whether
        to make Python ints of them)."""
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        add_bos = bos and bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_bos,
                                     special)
        if n < 0:
            raise SpectrumError(f"tokenizer failed on {len(data)} bytes of text")
        return tokens, n

    def token_bytes(self, token: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:max(n, 0)]

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))


# -- the context: KV cache, decoding, logits -----------------------------------------------------

class LlamaContext:
    """A ``llama_context`` over a model: its unified KV cache (``seq_*``), ``decode`` and the
    last decode's logits."""

    def __init__(self, model: LlamaModel, *, n_ctx: int, n_batch: int, n_seq_max: int,
                 threads: int, exact: bool):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.n_threads = params.n_threads_batch = threads
        # One KV buffer for all sequences, so a copied prompt shares its cells instead of
        # being duplicated; full-size sliding-window cache, so a cached prefix stays reusable.
        params.kv_unified = True
        params.swa_full = True
        params.no_perf = True
        if exact:
            # An F32 model is asked for exactness: keep the KV cache in F32 and use the plain
            # attention path (an F16 cache alone moves log-probs by ~2e-3).
            params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.n_vocab = model.n_vocab
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise SpectrumError(f"llama.cpp could not create a context of {n_ctx} tokens "
                                "(out of memory? try a smaller --ctx)")
        self.n_ctx = llama_cpp.llama_n_ctx(self.ptr)
        self.n_batch = llama_cpp.llama_n_batch(self.ptr)
        self.n_seq_max = llama_cpp.llama_n_seq_max(self.ptr)
        self._memory = llama_cpp.llama_get_memory(self.ptr)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_free(self.ptr)
            self.ptr = None

    def set_adapters(self, adapters: Sequence, scales: Sequence[float]) -> None:
        handles = (llama_cpp.llama_adapter_lora_p_ctypes * len(adapters))(*adapters)
        c_scales = (ctypes.c_float * len(scales))(*scales)
        if llama_cpp.llama_set_adapters_lora(self.ptr, handles, len(adapters), c_scales):
            raise SpectrumError("llama.cpp could not apply the LoRA adapters")

    def seq_rm(self, seq: int, start: int = -1, end: int = -1) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, seq, start, end)

    def seq_cp(self, source: int, seq: int, start: int = -1, end: int = -1) -> None:
        llama_cpp.llama_memory_seq_cp(self._memory, source, seq, start, end)

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self._memory, True)

    def decode(self, batch: "LlamaBatch") -> None:
        rc = llama_cpp.llama_decode(self.ptr, batch.ptr)
        if rc == 1:
            raise SpectrumError(f"the context ({self.n_ctx} tokens) is full; raise --ctx")
        if rc != 0:
            raise SpectrumError(f"llama_decode failed with code {rc}")

    def logits(self, n_outputs: int) -> np.ndarray:
        """The last decode's logits, one row per output in batch order, without a copy (valid
        until the next decode)."""
        ptr = llama_cpp.llama_get_logits(self.ptr)
        return np.ctypeslib.as_array(ptr, shape=(n_outputs, self.n_vocab))


class LlamaBatch:
    """A ``llama_batch`` of up to ``size`` tokens, each in up to ``n_seq_max`` sequences."""

    def __init__(self, size: int, n_seq_max: int):
        self.size = size
        self.ptr = llama_cpp.llama_batch_init(size, 0, n_seq_max)

    def close(self) -> None:
        if self.ptr is not None:
            llama_cpp.llama_batch_free(self.ptr)
            self.ptr = None

    def fill(self, tokens: Sequence[int], positions: Sequence[int],
             seq_sets: Sequence[Sequence[int]], logits: Sequence[bool]) -> None:
        b = self.ptr
        b.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            b.token[i] = token
            b.pos[i] = positions[i]
            b.n_seq_id[i] = len(seq_sets[i])
            for k, seq in enumerate(seq_sets[i]):
                b.seq_id[i][k] = seq
            b.logits[i] = logits[i]


class Decoder:
    """A context and its batch: decode tokens into sequences and get the wanted rows back.
    ``tokens_evaluated`` counts every token sent to llama_decode (for tests and the bench)."""

    def __init__(self, ctx: LlamaContext, n_seq_max: int):
        self.ctx = ctx
        self.batch = LlamaBatch(ctx.n_batch, n_seq_max)
        self.tokens_evaluated = 0

    def close(self) -> None:
        self.batch.close()

    def decode(self, tokens: Sequence[int], positions: Sequence[int],
               seq_sets: Sequence[Sequence[int]], logits: Sequence[bool]) -> np.ndarray:
        """One llama_decode of at most n_batch tokens; the rows of the tokens whose ``logits``
        is set, in order (a view, valid until the next decode)."""
        self.batch.fill(tokens, positions, seq_sets, logits)
        self.tokens_evaluated += len(tokens)
        self.ctx.decode(self.batch)
        return self.ctx.logits(sum(map(bool, logits)))


# -- sampling ------------------------------------------------------------------------------------

class SamplerChain:
    """llama.cpp's sampler chain for ``settings``, seeded (None: random). Only samplers that
    change something are added: the default chain is just "dist"."""

    def __init__(self, settings: SamplerSettings, seed: int | None, n_vocab: int):
        self.ptr = chain = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
        if settings.repeat_penalty != 1.0:
            add(llama_cpp.llama_sampler_init_penalties(n_vocab, 64, settings.repeat_penalty,
                                                       0.0, 0.0))
        if settings.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(settings.top_k))
        if settings.top_p < 1.0:
            add(llama_cpp.llama_sampler_init_top_p(settings.top_p, 1))
        if settings.min_p > 0.0:
            add(llama_cpp.llama_sampler_init_min_p(settings.min_p, 1))
        if settings.temperature == 0.0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if settings.temperature != 1.0:
                add(llama_cpp.llama_sampler_init_temp(settings.temperature))
            add(llama_cpp.llama_sampler_init_dist(
                llama_cpp.LLAMA_DEFAULT_SEED if seed is None else seed & 0xFFFFFFFF))

    def close(self) -> None:
        if self.ptr is not None:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None


class CandidateBuffer:
    """A llama_token_data_array over the whole vocabulary, for running a sampler chain on a
    logits row we hold (llama.cpp's own sampling code, on our rows). One per worker thread."""

    def __init__(self, n_vocab: int):
        self.n_vocab = n_vocab
        self.data = (llama_cpp.llama_token_data * n_vocab)()
        self.view = np.ctypeslib.as_array(self.data)
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.view["id"] = self.ids
        self.reordered = False
        self.array = llama_cpp.llama_token_data_array(
            ctypes.cast(self.data, llama_cpp.llama_token_data_p), n_vocab, -1, False)

    def sample(self, chain: SamplerChain, logits: np.ndarray, truncates: bool) -> int:
        if self.reordered:  # a truncating chain sorted the buffer in place last time
            self.view["id"] = self.ids
        self.reordered = truncates
        self.view["logit"] = logits
        self.array.size, self.array.selected, self.array.sorted = self.n_vocab, -1, False
        llama_cpp.llama_sampler_apply(chain.ptr, ctypes.byref(self.array))
        token = int(self.view["id"][self.array.selected])
        llama_cpp.llama_sampler_accept(chain.ptr, token)
        return token


# -- quantizing ----------------------------------------------------------------------------------

def quantize(src: str, dst: str, outtype: str, threads: int | None = None) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (used by the converter)."""
    if outtype not in QUANTIZED_TYPES:
        raise InputError(f"cannot quantize to {outtype!r}; choose one of "
                         f"{', '.join(QUANTIZED_TYPES)}")
    init_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}")
    params.nthread = threads or 0
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SpectrumError(f"llama.cpp failed to quantize {src} to {outtype} (code {rc})")
