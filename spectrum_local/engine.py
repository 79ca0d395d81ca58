"""The llama.cpp batch engine: the only module that touches llama-cpp-python's low-level API.

One model, one context, many sequences in a unified KV cache:
- sequence 0 always holds the most recent prompt (``cached_tokens``) and its last logits row;
  a new prompt that shares a prefix with it only evaluates the new part;
- ``read`` answers paths (token sequences to read log-probabilities along: score candidates,
  several requests' prompts, vLLM's prompt log-probs) in one ``llama_decode`` per batch: paths
  are merged into a trie, so a token two paths share is evaluated once and belongs to both
  their sequences, and logits are asked only where a probability is read;
- ``generate`` decodes samples side by side, one sequence each, one ``llama_decode`` per step
  for every live sample; ``advance`` lets samples of other jobs join at any step (the
  scheduler's cross-request batching). Sequences are returned when their call or sample ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import numbers
import os
import platform
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Sequence

import llama_cpp
import numpy as np

from .backend import (Backend, Busy, Generation, Path, PathResult, SamplerSettings, Step,
                      best_tokens, common_prefix, logsumexp)
from .errors import InputError, SpectrumError, check_int
from .ggufheader import read_header
from .textfile import check_unicode

# llama.cpp 0.3.36's limits: LLAMA_MAX_SEQ (llama-cparams.h) and GGML_MAX_N_THREADS (ggml.h);
# more threads than OpenMP can start aborts the process.
LLAMA_MAX_SEQ = 256
MAX_THREADS = 512
INT32_MAX = 2**31 - 1
DEFAULT_CTX = 4096  # tokens, or the model's trained length if smaller
MIN_CTX = 32  # llama.cpp rounds the cells up to 256, but decodes at most ctx tokens at a time

_backend_lock = threading.Lock()
_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            # Silence llama.cpp's load chatter; errors still reach us through return codes.
            llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


@llama_cpp.llama_log_callback
def _quiet_log(level, text, user_data):  # noqa: ARG001 - signature fixed by llama.cpp
    if os.environ.get("SPECTRUM_LOCAL_VERBOSE"):
        print(text.decode("utf-8", "replace"), end="", flush=True)


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


MAX_LORA_SCALE = 100


class Engine(Backend):
    """A loaded GGUF model and its context. Thread-safe: calls are serialised."""

    def __init__(self, path: str, *, ctx: int | None = None, gpu_layers: int | None = None,
                 threads: int | None = None, batch: int = 512, max_sequences: int = 64,
                 lora: Sequence[tuple[str, float]] = ()):
        # Every number that reaches llama.cpp is checked here: past its limits llama.cpp
        # asserts (killing the process), OpenMP aborts, or ctypes silently wraps the value.
        if ctx is not None:
            check_int("ctx", ctx, MIN_CTX)
        check_int("batch", batch, 2)  # sequence 0 and at least one continuation
        check_int("max_sequences", max_sequences, 2)
        if threads is not None:
            check_int("threads", threads, 1, MAX_THREADS)
        if gpu_layers is not None:
            check_int("gpu_layers", gpu_layers, -1)
        for _, scale in lora:
            # Far past the scales adapters are trained for, activations overflow to NaN.
            if isinstance(scale, bool) or not isinstance(scale, numbers.Real) \
                    or not -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE:
                raise InputError(f"a LoRA scale must be a number between -{MAX_LORA_SCALE} and "
                                 f"{MAX_LORA_SCALE}, got {scale!r}")
        _init_backend()
        self.path = path = os.fspath(path)
        if gpu_layers is None:
            gpu_layers = -1 if supports_gpu_offload() else 0
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = min(gpu_layers, INT32_MAX)  # more than the model has: all
        model_params.use_extra_bufts = use_extra_buffer_types()
        self._model = llama_cpp.llama_model_load_from_file(path.encode(), model_params)
        if not self._model:
            raise SpectrumError(f"llama.cpp could not load {path} (not a valid GGUF model, or an "
                                "unsupported architecture; set SPECTRUM_LOCAL_VERBOSE=1 for details)")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._model)
        self.metadata = self._read_metadata()

        # Past the trained length positions are out of distribution, and the KV cache alone of
        # ctx=10**9 would ask for terabytes: the trained length is the limit (and the default's
        # cap, so a small model loads with the default).
        limit = self.n_ctx_train or DEFAULT_CTX
        if ctx is None:
            ctx = min(DEFAULT_CTX, limit)
        elif ctx > limit:
            llama_cpp.llama_model_free(self._model)
            raise InputError(f"ctx={ctx} is more than the {limit} tokens this model was trained on")
        threads = threads or min(max(1, os.cpu_count() or 1), MAX_THREADS)
        # llama.cpp caps a decode's tokens (and so its outputs) at min(ctx, batch) but reserves
        # an output row for every sequence: more sequences than that asserts in the
        # constructor (n_outputs_max), e.g. --ctx 32..63 with 64 sequences.
        batch = min(batch, ctx)
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = ctx
        ctx_params.n_batch = batch
        ctx_params.n_ubatch = batch
        ctx_params.n_seq_max = min(max_sequences, LLAMA_MAX_SEQ, batch)
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        # One KV buffer for all sequences, so a copied prompt shares its cells instead of
        # being duplicated; full-size sliding-window cache, so a cached prefix stays reusable.
        ctx_params.kv_unified = True
        ctx_params.swa_full = True
        ctx_params.no_perf = True
        if self.metadata.get("general.file_type") == str(llama_cpp.LLAMA_FTYPE_ALL_F32):
            # An F32 model is asked for exactness: keep the KV cache in F32 and use the plain
            # attention path (an F16 cache alone moves log-probs by ~2e-3).
            ctx_params.type_k = ctx_params.type_v = llama_cpp.GGML_TYPE_F32
            ctx_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = llama_cpp.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise SpectrumError(f"llama.cpp could not create a context of {ctx} tokens "
                                "(out of memory? try a smaller --ctx)")
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self.n_batch = llama_cpp.llama_n_batch(self._ctx)
        self.max_sequences = llama_cpp.llama_n_seq_max(self._ctx)
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        # A token may belong to several sequences: a prompt shared by all candidates.
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, self.max_sequences)
        self._lock = threading.RLock()
        self.cached_tokens: list[int] = []  # what sequence 0 holds
        self._free_seqs = list(range(1, self.max_sequences))  # sequence ids not in use
        self._live: list[_Live] = []  # samples being generated, one sequence each
        self._prompt_row = np.empty(0, dtype=np.float32)  # logits after cached_tokens
        # Sampling runs llama.cpp's sampler chains on logits rows we hold, one worker thread
        # per core (ctypes releases the GIL), each with its own candidate buffer.
        workers = min(threads, 8)
        self._samplers = [_CandidateBuffer(self.n_vocab) for _ in range(workers)]
        self._pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
        self.tokens_evaluated = 0  # tokens sent to llama_decode so far (for tests and the bench)
        # LoRA adapters, applied to every decode of this context. They are fixed for the
        # engine's life, so everything cached was computed under them: a prefix computed under
        # other adapters or scales (another engine) can never be reused here.
        self.lora = [(os.fspath(p), float(scale)) for p, scale in lora]
        # A model whose output layer is its token embedding has no output.weight tensor.
        tied = bool(lora) and "output.weight" not in read_header(self.path)[1]
        self._adapters = [self._load_adapter(p, tied) for p, _ in self.lora]
        if self._adapters:
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * len(self._adapters))(
                *self._adapters)
            scales = (ctypes.c_float * len(self.lora))(*[scale for _, scale in self.lora])
            if llama_cpp.llama_set_adapters_lora(self._ctx, handles, len(self.lora), scales):
                self.close()
                raise SpectrumError("llama.cpp could not apply the LoRA adapters")

    def _load_adapter(self, path: str, tied: bool):
        # llama.cpp checks the adapter against the model (architecture, tensor shapes) and
        # frees it with the model, but an embedding adapter on a model whose output layer is
        # its embedding (``tied``) passes, then aborts the process at the first decode (a
        # ggml assert): refuse it here.
        try:
            adapter_tensors = read_header(path)[1]
        except InputError as e:  # it names the file and what is wrong with it
            self.close()
            raise InputError(f"LoRA adapter: {e}") from None
        if tied and any(name.startswith("token_embd.") for name in adapter_tensors):
            self.close()
            raise InputError(f"the LoRA adapter {path} changes the token embedding, which this "
                             "model also uses as its output layer: llama.cpp cannot apply that")
        adapter = llama_cpp.llama_adapter_lora_init(self._model, path.encode())
        if not adapter:
            self.close()
            raise InputError(f"llama.cpp could not load the LoRA adapter {path}: not a GGUF "
                             "LoRA adapter, or made for another base model (set "
                             "SPECTRUM_LOCAL_VERBOSE=1 for llama.cpp's reason)")
        return adapter

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            for live in self._live:
                live.free_chain()
            self._live = []
            self._ctx = self._model = None
            if self._pool:
                self._pool.shutdown()

    def __del__(self):
        self.close()

    def clear(self) -> None:
        """Forget every cached token (the next call evaluates its prompt from scratch) and end
        every live sample ("abort")."""
        with self._lock:
            llama_cpp.llama_memory_clear(self._memory, True)
            self.cached_tokens = []
            for live in self._live:
                if not live.job.is_finished(live.index):
                    live.job.finish(live.index, "abort")
                live.free_chain()
            self._live = []
            self._free_seqs = list(range(1, self.max_sequences))

    # -- model facts --------------------------------------------------------------------------

    def _read_metadata(self) -> dict[str, str]:
        buf = ctypes.create_string_buffer(1 << 16)
        metadata = {}
        for i in range(llama_cpp.llama_model_meta_count(self._model)):
            n = llama_cpp.llama_model_meta_key_by_index(self._model, i, buf, len(buf))
            key = buf.value.decode("utf-8", "replace") if n >= 0 else None
            n = llama_cpp.llama_model_meta_val_str_by_index(self._model, i, buf, len(buf))
            if key and n >= 0:
                metadata[key] = buf.value.decode("utf-8", "replace")
        # Long values (the chat template) do not fit the buffer: ask for them by name.
        for key in ("tokenizer.chat_template",):
            if key in metadata:
                metadata[key] = self._meta_value(key, 1 << 20)
        return metadata

    def _meta_value(self, key: str, size: int) -> str:
        buf = ctypes.create_string_buffer(size)
        llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, size)
        return buf.value.decode("utf-8", "replace")

    def model_size(self) -> int:
        return llama_cpp.llama_model_size(self._model)

    def n_params(self) -> int:
        return llama_cpp.llama_model_n_params(self._model)

    def describe(self) -> dict:
        """The model file and what llama.cpp was built with (for ``info``)."""
        meta = self.metadata
        return {
            "name": meta.get("general.name"),
            "architecture": meta.get("general.architecture"),
            "description": self.description(),
            "file_size": os.path.getsize(self.path),
            "parameters": self.n_params(),
            "context_trained": self.n_ctx_train,
            "context": self.n_ctx,
            "chat_template": "tokenizer.chat_template" in meta,
            "lora": [{"path": p, "scale": scale} for p, scale in self.lora],
            "gpu_offload": supports_gpu_offload(),
            "backend": system_info(),
        }

    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self._model, buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    # -- tokens -------------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = False, bos: bool = False,
                 limit: int | None = None) -> list[int]:
        """Text to tokens. By default nothing in ``text`` is read as a control token and no BOS
        is added (message content). ``special`` parses control tokens written in the text and
        ``bos`` prepends the model's BOS if it uses one: a raw prompt, as vLLM tokenises it.
        A text of more than ``limit`` tokens is refused before its tokens become Python
        objects: a multi-megabyte text that cannot fit the context leaves no memory behind."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # the callers check first, naming the field; a last net
            check_unicode(text, "the text")
            raise
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        add_bos = bos and bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_bos,
                                     special)
        if n < 0:
            raise SpectrumError(f"tokenizer failed on {len(data)} bytes of text")
        if limit is not None and n > limit:
            raise self._too_long(n, at_least=True)
        return list(tokens[:n])

    def control_token(self, marker: str) -> int | None:
        """The id of a control marker such as ``<end_of_turn>``, or None if the vocabulary has
        no single control token for it."""
        data = marker.encode("utf-8")
        tokens = (llama_cpp.llama_token * 8)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, 8, False, True)
        if n != 1 or self.token_text(tokens[0], special=True) != marker:
            return None
        return tokens[0]

    def token_text(self, token: int, *, special: bool = True) -> str:
        return self.token_bytes(token, special=special).decode("utf-8", "replace")

    def token_bytes(self, token: int, *, special: bool = True) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:max(n, 0)]

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """Tokens to text; control tokens are left out unless ``special``."""
        # Whole sequences at once, so multi-byte characters split over tokens come out whole.
        data = b"".join(self.token_bytes(t, special=special) for t in tokens)
        return data.decode("utf-8", "replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    @functools.cached_property
    def end_of_generation_tokens(self) -> frozenset[int]:
        """Every token that ends a generation (sampling stops at any of them)."""
        return frozenset(t for t in range(self.n_vocab) if self.is_end_of_generation(t))

    # -- decoding -----------------------------------------------------------------------------

    def _decode(self, tokens: Sequence[int], positions: Sequence[int],
                seq_sets: Sequence[Sequence[int]], logits: Sequence[bool]) -> None:
        b = self._batch
        n = len(tokens)
        b.n_tokens = n
        for i in range(n):
            b.token[i] = tokens[i]
            b.pos[i] = positions[i]
            b.n_seq_id[i] = len(seq_sets[i])
            for k, seq in enumerate(seq_sets[i]):
                b.seq_id[i][k] = seq
            b.logits[i] = logits[i]
        rc = llama_cpp.llama_decode(self._ctx, b)
        self.tokens_evaluated += n
        if rc == 1:
            raise SpectrumError(f"the context ({self.n_ctx} tokens) is full; raise --ctx")
        if rc != 0:
            raise SpectrumError(f"llama_decode failed with code {rc}")

    def _decode_all(self, tokens, positions, seq_sets, wants, reduce=None) -> dict:
        """Decode in batches of n_batch; return ``reduce(index, row)`` for each wanted token's
        logits row, by index (a copy of the row without ``reduce``). Each decode's rows are
        reduced before the next decode, so memory holds what ``reduce`` keeps, not a row of
        n_vocab floats (1 MiB for Gemma 3) per wanted token."""
        reduce = reduce or (lambda j, row: row.copy())
        kept = {}
        for lo in range(0, len(tokens), self.n_batch):
            hi = min(lo + self.n_batch, len(tokens))
            self._decode(tokens[lo:hi], positions[lo:hi], seq_sets[lo:hi], wants[lo:hi])
            wanted = [j for j in range(lo, hi) if wants[j]]
            if wanted:
                kept.update((j, reduce(j, row))
                            for j, row in zip(wanted, self._logits_view(len(wanted))))
        return kept

    # -- sequences and the prefix cache -------------------------------------------------------

    def _check_fits(self, prompt: Sequence[int]) -> None:
        if not prompt:
            raise InputError("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise self._too_long(len(prompt))

    def _too_long(self, n_tokens: int, at_least: bool = False) -> InputError:
        return InputError(f"the prompt is {'at least ' if at_least else ''}{n_tokens} tokens "
                          f"but the context holds {self.n_ctx}; raise --ctx (the model was "
                          f"trained on {self.n_ctx_train})")

    def check_tokens(self, tokens: Sequence[int]) -> None:
        """Token ids from outside (an API client) must exist: llama.cpp aborts on others."""
        for t in tokens:
            if not isinstance(t, numbers.Integral) or not 0 <= t < self.n_vocab:
                raise InputError(f"token id {t!r} is not in the vocabulary (0..{self.n_vocab - 1})")

    def _take_seq(self) -> int:
        return self._free_seqs.pop()

    def _release_seq(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._free_seqs.append(seq)

    @property
    def live_samples(self) -> int:
        return len(self._live)

    def _reserved_cells(self) -> int:
        """KV cells the live samples may fill: each one's prompt once, and every sample's
        max_tokens (an upper bound: prompts shared with the cache are counted anyway)."""
        prompts = {id(s.job): len(s.job.prompt) for s in self._live}
        return sum(prompts.values()) + sum(s.job.max_tokens for s in self._live)

    def _prefill(self, prompt: Sequence[int]) -> np.ndarray:
        """Make sequence 0 hold ``prompt``, evaluating only what the cache lacks; return the
        logits at the prompt's last position."""
        return self._read([], keep=prompt)[1]

    def read(self, paths: Sequence[Path], keep: Sequence[int] | None = None, *,
             cancel: threading.Event | None = None) -> list[PathResult]:
        """What each path asks for, decoding each token two paths have in common once; then
        sequence 0 holds ``keep`` (the prefix cache)."""
        with self._lock, self._consistent():
            return self._read(paths, keep)[0]

    @contextlib.contextmanager
    def _consistent(self):
        # A failed or interrupted decode leaves the cache in an unknown state: drop it.
        try:
            yield
        except Busy:
            raise  # nothing was decoded
        except BaseException:
            self.clear()
            raise

    # -- reading log-probabilities along token paths --------------------------------------------

    def _read(self, paths: Sequence[Path], keep: Sequence[int] | None):
        for tokens in [p.tokens for p in paths] + ([keep] if keep is not None else []):
            self._check_fits(tokens)
            self.check_tokens(tokens)
        return self._read_paths(paths, keep), self._prompt_row

    def _read_paths(self, paths: Sequence[Path], keep: Sequence[int] | None) -> list[PathResult]:
        """Every path, and ``keep`` (the new prompt, into sequence 0), in one token trie: each
        node is decoded once, in the sequences of all the paths through it. ``keep`` goes in
        the first group; the paths go in trie order, in groups as large as the free sequences
        and cells allow. A group's last path keeps its sequence into the next group, which
        shares the nodes it has in common with it or with ``keep`` (trie order puts every node
        two groups share on that path), so splitting a trie decodes no node twice."""
        cached, row0 = self.cached_tokens, self._prompt_row
        plan, starts = _Trie(), {}
        pending = keep if keep is not None and list(keep) != cached else None  # to decode
        if pending is not None:
            # What survives of the cache; the paths start from it, so none needs what goes.
            keep_start = min(common_prefix(cached, keep), len(keep) - 1)
            cached, row0 = cached[:keep_start], None
            plan.add(KEEP, Path(keep, len(keep), final=True), keep_start)
        results: list[PathResult | None] = [None] * len(paths)
        for i, path in enumerate(paths):
            if path.wants_nothing:
                results[i] = PathResult(np.zeros(0), [], [])
            else:
                starts[i] = _decode_start(path, cached, row0 is not None)
                plan.add(i, path, starts[i][0])
        todo = sorted(starts, key=lambda i: (starts[i][0], list(paths[i].tokens[starts[i][0]:])))
        if pending is not None:
            llama_cpp.llama_memory_seq_rm(self._memory, 0, keep_start, -1)
            self.cached_tokens = list(cached)
        rows: dict[int, dict] = {}
        carrier = None  # (path, sequence) held over from the last group
        try:
            while todo or pending is not None:
                shared = {i: self._shared(plan, i, carrier, pending is None) for i in todo}
                placed, fresh = self._place(plan, todo, shared, carrier, pending)
                if not placed and pending is None:
                    if carrier:  # its cells take the room: re-decode what it held instead
                        self._release_seq(carrier[1])
                        carrier = None
                        continue
                    if self._live:
                        raise Busy  # live samples hold the room: try after a step
                    self.clear()  # the cached prompt takes the room: read without it,
                    results = self._read_paths(paths, None)
                    if keep is not None:
                        self._read_paths([], keep)  # then cache it again
                    return results
                seqs = dict(zip(placed, self._free_seqs))
                del self._free_seqs[:len(placed)]
                for i, seq in seqs.items():
                    depth, source = shared[i]
                    if starts[i][0] + depth:
                        llama_cpp.llama_memory_seq_cp(self._memory, source, seq, 0,
                                                      starts[i][0] + depth)
                if carrier:
                    self._release_seq(carrier[1])
                carrier = (placed[-1], seqs[placed[-1]]) if placed else None
                owners = {i: (seqs[i], shared[i][0]) for i in placed}
                if pending is not None:
                    owners[KEEP] = (0, 0)
                owners = plan.owners(fresh, owners)
                wants = [plan.wants(node) and node not in rows for node in fresh]
                decoded = self._decode_all([plan.tokens[n] for n in fresh],
                                           [plan.positions[n] for n in fresh],
                                           [tuple(owners[n]) for n in fresh], wants,
                                           lambda j, row: plan.reduce(fresh[j], row))
                rows.update((fresh[j], kept) for j, kept in decoded.items())
                if pending is not None:
                    self._prompt_row = rows[plan.nodes_of[KEEP][-1]]["row"]
                    self.cached_tokens = list(pending)
                    pending = None
                for i in placed[:-1]:
                    self._release_seq(seqs[i])
                todo = todo[len(placed):]
        finally:
            if carrier:
                self._release_seq(carrier[1])
        for i, (start, from_row0) in starts.items():
            path, first_row = paths[i], None
            if from_row0:
                final = path.final and len(path.tokens) == len(cached)
                targets = {path.tokens[start]} if start < len(path.tokens) else set()
                first_row = _reduce(row0, targets, path.top, final)
            results[i] = plan.result(i, path, start, rows, first_row)
        return results

    @staticmethod
    def _shared(plan: "_Trie", path: int, carrier, keep_decoded: bool) -> tuple[int, int]:
        """How many of ``path``'s nodes are already decoded, and the sequence that holds them
        (with the prompt before them): the carrier (the last group's last path) or sequence 0
        (the cache, and the new prompt once decoded)."""
        best = (0, 0)
        if carrier:
            best = max(best, (plan.shared(path, carrier[0]), carrier[1]), key=lambda b: b[0])
        if keep_decoded and KEEP in plan.nodes_of:
            best = max(best, (plan.shared(path, KEEP), 0), key=lambda b: b[0])
        return best

    def _place(self, plan: "_Trie", todo: list[int], shared: dict, carrier, pending):
        """The next group: the new prompt if it is ``pending``, and the first paths of ``todo``
        that fit the free sequences and cells; and the nodes it decodes (those it does not
        share with what is decoded), in trie order."""
        held = len(plan.nodes_of[carrier[0]]) if carrier else 0
        budget = self.n_ctx - len(self.cached_tokens) - self._reserved_cells() - held
        fresh = list(plan.nodes_of[KEEP]) if pending is not None else []
        if len(fresh) > budget:
            raise Busy  # only live samples can hold the room (_check_fits)
        placed, seen = [], set(fresh)
        for i in todo:
            if len(placed) == len(self._free_seqs):
                break
            new = [n for n in plan.nodes_of[i][shared[i][0]:] if n not in seen]
            if len(fresh) + len(new) > budget:
                break
            placed.append(i)
            fresh += new
            seen.update(new)
        return placed, sorted(fresh)

    # -- sampling ---------------------------------------------------------------------------

    def generate(self, prompt: Sequence[int], n: int, max_tokens: int, settings: SamplerSettings,
                 seed: int | None, stop_tokens: set[int], *, logprobs: int | None = None,
                 on_step=None, on_done=None, cancel: threading.Event | None = None) -> list[Generation]:
        """``n`` independent continuations of ``prompt``, decoded side by side (see
        ``GenerateJob`` for the arguments). Returns each one's ``Generation``."""
        with self._lock, self._consistent():
            job = self.new_job(prompt, n, max_tokens, settings, seed, stop_tokens, logprobs,
                               on_step, on_done, cancel)
            while not job.finished:
                self.advance([job])
            if job.error:
                raise job.error
            return job.results

    def new_job(self, prompt, n, max_tokens, settings, seed, stop_tokens, logprobs=None,
                on_step=None, on_done=None, cancel=None) -> GenerateJob:
        self._check_fits(prompt)
        self.check_tokens(prompt)
        room = self.n_ctx - len(prompt)
        return GenerateJob(list(prompt), n, min(max_tokens, room), settings, seed,
                           set(stop_tokens), logprobs, on_step, on_done, cancel)

    def advance(self, jobs: Sequence[GenerateJob]) -> None:
        """Admit the waiting samples of ``jobs`` that fit, then one decode step for every live
        sample (of these and earlier jobs)."""
        with self._lock, self._consistent():
            for job in jobs:
                self._admit(job)
            if self._live:
                self._step()

    def _admit(self, job: GenerateJob) -> None:
        if job.cancelled:
            job.abandon()
            return
        indices = []
        while job.waiting and len(indices) < len(self._free_seqs):
            need = job.max_tokens * (len(indices) + 1) + len(job.prompt)
            if self._live:
                need += self._reserved_cells() + len(self.cached_tokens)
            # Alone, the first sample always fits (max_tokens was cut to the room).
            if need > self.n_ctx and (indices or self._live):
                break
            indices.append(job.take_index())
        if not indices:
            return
        row = self._prefill(job.prompt)
        chains = [self._sampler_chain(job.settings, job.seed_of(i)) for i in indices]
        fresh = [_Live(job, i, None, chain, len(job.prompt)) for i, chain in zip(indices, chains)]
        tokens = self._sample_rows(fresh, np.broadcast_to(row, (len(fresh), self.n_vocab)))
        for live, token in zip(fresh, tokens):
            if self._accept(live, token, row):
                live.seq = self._take_seq()
                llama_cpp.llama_memory_seq_cp(self._memory, 0, live.seq, -1, -1)
                self._live.append(live)

    def _step(self) -> None:
        for live in self._live:
            if live.job.cancelled:
                live.job.abandon()
        self._live = [s for s in self._live if not self._drop_if_done(s)]
        if not self._live:
            return
        live = self._live
        self._decode([s.last for s in live], [s.pos for s in live], [(s.seq,) for s in live],
                     [True] * len(live))
        rows = self._logits_view(len(live))
        tokens = self._sample_rows(live, rows)
        for s, token, row in zip(live, tokens, rows):
            s.pos += 1
            self._accept(s, token, row)
        self._live = [s for s in live if not self._drop_if_done(s)]

    def _accept(self, live: _Live, token: int, row: np.ndarray) -> bool:
        """Record a sampled token; return whether the sample goes on."""
        job, result = live.job, live.job.results[live.index]
        if token in job.stop_tokens or self.is_end_of_generation(token):
            result.stop_step = Step(live.index, token, *_step_logprobs(row, token, job.logprobs))
            job.finish(live.index, "stop", token)
        else:
            step = Step(live.index, token, *_step_logprobs(row, token, job.logprobs))
            result.tokens.append(token)
            result.steps.append(step)
            live.last = token
            reason = job.call(job.on_step, step) if job.on_step else None
            if reason:
                job.finish(live.index, reason)
            elif len(result.tokens) >= job.max_tokens:
                job.finish(live.index, "length")
        if job.is_finished(live.index):
            live.free_chain()
            return False
        return True

    def _drop_if_done(self, live: _Live) -> bool:
        if not live.job.is_finished(live.index):
            return False
        live.free_chain()
        if live.seq is not None:
            self._release_seq(live.seq)
            live.seq = None
        return True

    def _logits_view(self, n_outputs: int) -> np.ndarray:
        """The last decode's logits, one row per output in batch order, without a copy."""
        ptr = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_outputs, self.n_vocab))

    def _sample_rows(self, samples: Sequence[_Live], rows: np.ndarray) -> list[int]:
        """One token per (sample, row): each sample's chain on its row, split over the workers."""
        workers = len(self._samplers) if self._pool and len(samples) > 1 else 1

        def work(w: int) -> list[int]:
            return [self._samplers[w].sample(samples[j].chain, rows[j],
                                             samples[j].job.settings.truncates)
                    for j in range(w, len(samples), workers)]

        if workers == 1:
            return work(0)
        futures = [self._pool.submit(work, w) for w in range(workers)]
        try:
            parts = [f.result() for f in futures]
        except BaseException:
            # Ctrl-C lands in this thread while workers still run the chains: the caller frees
            # those chains next, so let the workers finish first (else a use after free).
            wait(futures)
            raise
        return [parts[j % workers][j // workers] for j in range(len(samples))]

    def _sampler_chain(self, settings: SamplerSettings, seed: int | None):
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
        # Only samplers that change something are added: the default chain is just "dist".
        if settings.repeat_penalty != 1.0:
            add(llama_cpp.llama_sampler_init_penalties(self.n_vocab, 64, settings.repeat_penalty,
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
        return chain


class GenerateJob:
    """One generate call: ``n`` samples of ``prompt``, each at most ``max_tokens`` (already cut
    to the room the context has after the prompt). Sample i is seeded ``seed + i`` (None:
    random); a sample stops at ``stop_tokens`` or the model's end-of-generation tokens.
    ``logprobs``: record each token's log-probability and that many alternatives;
    ``on_step(step)`` sees every token and may end that sample there by returning its finish
    reason ("stop", "length" or "abort"; None goes on);
    ``on_done(index, generation)`` sees each finished sample; setting ``cancel`` (an Event)
    ends them all ("abort"). Callbacks run on the engine's thread: keep them short."""

    def __init__(self, prompt, n, max_tokens, settings, seed, stop_tokens, logprobs, on_step,
                 on_done, cancel):
        self.prompt, self.n, self.max_tokens, self.settings = prompt, n, max_tokens, settings
        self.seed, self.stop_tokens, self.logprobs = seed, stop_tokens, logprobs
        self.on_step, self.on_done, self.cancel = on_step, on_done, cancel
        self.results = [Generation() for _ in range(n)]
        self.error: BaseException | None = None  # raised by a callback
        self._next = 0  # samples from here on are not admitted yet
        self._finished: set[int] = set()

    @property
    def waiting(self) -> bool:
        return self._next < self.n

    @property
    def finished(self) -> bool:
        return len(self._finished) == self.n

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def take_index(self) -> int:
        self._next += 1
        return self._next - 1

    def seed_of(self, index: int) -> int | None:
        return None if self.seed is None else self.seed + index

    def is_finished(self, index: int) -> bool:
        return index in self._finished

    def finish(self, index: int, reason: str, stop_token: int | None = None) -> None:
        result = self.results[index]
        result.finish_reason, result.stop_token = reason, stop_token
        self._finished.add(index)
        if self.on_done:
            self.call(self.on_done, index, result)

    def abandon(self) -> None:
        """Cancelled: every sample not finished yet ends now."""
        self._next = self.n
        for index in range(self.n):
            if index not in self._finished:
                self.finish(index, "abort")

    def call(self, callback, *args):
        """``callback``'s answer; "abort" when it raises (the caller's bug must not take the
        engine down: the error is raised to the caller of this job alone)."""
        try:
            return callback(*args)
        except Exception as e:
            self.error = self.error or e
            return "abort"


@dataclass(eq=False)
class _Live:
    """A sample being generated: its sequence, sampler chain and next position."""

    job: GenerateJob
    index: int
    seq: int | None
    chain: object  # freed (None) once the sample is finished
    pos: int
    last: int = -1  # the token to decode next

    def free_chain(self) -> None:
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None


def _decode_start(path: Path, cached: Sequence[int], row_kept: bool) -> tuple[int, bool]:
    """Where ``path``'s decoding starts, and whether its first row is the cached prompt's row:
    tokens shared with the cache are not decoded again, except from the first position
    whose row is needed (only the cache's last row is kept, if ``row_kept``)."""
    shared = common_prefix(cached, path.tokens)
    first_row = path.first - 1
    if row_kept and cached and shared == len(cached) and first_row == len(cached) - 1:
        return len(cached), True
    return min(shared, first_row), False


def _reduce(row: np.ndarray, targets, top: int | None, final: bool) -> dict:
    """What is kept of one logits row: the log-probabilities of ``targets``; with ``top`` not
    None their ranks and the ``top`` best (id, logprob); the row itself when ``final``."""
    lse = logsumexp(row)
    kept: dict = {"lp": {t: float(row[t] - lse) for t in targets}}
    if top is not None:
        kept["top"] = best_tokens(row, top, lse)
        kept["rank"] = {t: int((row > row[t]).sum()) + 1 for t in targets}
    if final:
        kept["row"] = row.copy()
    return kept


def _step_logprobs(row: np.ndarray, token: int, k: int | None):
    if k is None:
        return None, None
    lse = logsumexp(row)
    return float(row[token] - lse), best_tokens(row, k, lse)


KEEP = -1  # the trie's key for the new prompt, decoded into sequence 0


class _Trie:
    """The tokens of one read. Paths that start decoding at the same position share each
    token they have in common: one node, decoded once, in every such path's sequence. A
    node's children are added after it, so node order is position order along every path."""

    def __init__(self):
        self.tokens: list[int] = []
        self.positions: list[int] = []
        self.nodes_of: dict[int, list[int]] = {}  # path -> its nodes, in position order
        self._targets: list[set[int]] = []
        self._top: list[int] = []  # per node: the most alternatives a path asks for, -1: none
        self._final: list[bool] = []
        self._index: dict = {}  # (parent node or ("root", start), token) -> node

    def add(self, key: int, path: Path, start: int) -> None:
        tokens, parent, nodes = path.tokens, ("root", start), []
        last = len(tokens) - (1 if path.final else 2)  # a last token is read, not decoded
        for pos in range(start, last + 1):
            node = self._index.get((parent, tokens[pos]))
            if node is None:
                node = self._index[(parent, tokens[pos])] = len(self.tokens)
                self.tokens.append(tokens[pos])
                self.positions.append(pos)
                self._targets.append(set())
                self._top.append(-1)
                self._final.append(False)
            if path.first - 1 <= pos < len(tokens) - 1:
                self._targets[node].add(tokens[pos + 1])
                self._top[node] = max(self._top[node], -1 if path.top is None else path.top)
            if path.final and pos == len(tokens) - 1:
                self._final[node] = True
            nodes.append(node)
            parent = node
        self.nodes_of[key] = nodes

    def shared(self, a: int, b: int) -> int:
        """How many nodes paths ``a`` and ``b`` have in common (a prefix of both)."""
        return common_prefix(self.nodes_of[a], self.nodes_of[b])

    def owners(self, nodes: Sequence[int], placed: dict[int, tuple[int, int]]) -> dict:
        """Each of ``nodes``'s sequences: those of the placed paths (path -> (sequence, nodes
        it shares with the carrier)) that decode it."""
        owners = {n: set() for n in nodes}
        for path, (seq, shared) in placed.items():
            for n in self.nodes_of[path][shared:]:
                owners[n].add(seq)
        return owners

    def wants(self, node: int) -> bool:
        return bool(self._targets[node]) or self._final[node]

    def reduce(self, node: int, row: np.ndarray) -> dict:
        top = self._top[node]
        return _reduce(row, self._targets[node], None if top < 0 else top, self._final[node])

    def result(self, key: int, path: Path, start: int, rows: dict, first_row: dict | None):
        """``path``'s answer from the reduced rows (``first_row``: the cached prompt's)."""
        nodes, tokens = self.nodes_of[key], path.tokens

        def at(pos: int) -> dict:
            return first_row if pos == start - 1 else rows[nodes[pos - start]]

        positions = range(path.first - 1, len(tokens) - 1)
        logprobs = np.array([at(p)["lp"][tokens[p + 1]] for p in positions], dtype=np.float64)
        ranks = tops = None
        if path.top is not None:
            ranks = [at(p)["rank"][tokens[p + 1]] for p in positions]
            tops = [at(p)["top"] for p in positions]
        row = at(len(tokens) - 1)["row"] if path.final else None
        return PathResult(logprobs, ranks, tops, row)


class _CandidateBuffer:
    """A llama_token_data_array over the whole vocabulary, for running a sampler chain on a
    logits row we hold (llama.cpp's own sampling code, on our rows)."""

    def __init__(self, n_vocab: int):
        self.n_vocab = n_vocab
        self.data = (llama_cpp.llama_token_data * n_vocab)()
        self.view = np.ctypeslib.as_array(self.data)
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.view["id"] = self.ids
        self.reordered = False
        self.array = llama_cpp.llama_token_data_array(
            ctypes.cast(self.data, llama_cpp.llama_token_data_p), n_vocab, -1, False)

    def sample(self, chain, logits: np.ndarray, truncates: bool) -> int:
        if self.reordered:  # a truncating chain sorted the buffer in place last time
            self.view["id"] = self.ids
        self.reordered = truncates
        self.view["logit"] = logits
        self.array.size, self.array.selected, self.array.sorted = self.n_vocab, -1, False
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(self.array))
        token = int(self.view["id"][self.array.selected])
        llama_cpp.llama_sampler_accept(chain, token)
        return token


def quantize(src: str, dst: str, outtype: str, threads: int | None = None) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (used by the converter)."""
    ftypes = {
        "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
        "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
        "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
        "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
        "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    }
    if outtype not in ftypes:
        raise InputError(f"cannot quantize to {outtype!r}; choose one of {', '.join(ftypes)}")
    _init_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[outtype]
    params.nthread = threads or 0
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SpectrumError(f"llama.cpp failed to quantize {src} to {outtype} (code {rc})")
