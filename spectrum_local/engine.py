"""The llama.cpp batch engine: the only module that touches llama-cpp-python's low-level API.

One model, one context, many sequences in a unified KV cache:
- sequence 0 always holds the most recent prompt (``cached_tokens``); a new prompt that shares a
  prefix with it only evaluates the new part;
- continuations (score candidates, samples) are sequences 1..n that share the prompt's cells
  (``llama_memory_seq_cp`` for a cached prompt; for new prompt tokens, by belonging to every
  sequence in the same batch) and are removed when the call ends;
- all continuations advance together, one ``llama_decode`` per batch, with logits asked only
  where they are needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import numbers
import os
import platform
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Sequence

import llama_cpp
import numpy as np

from .errors import InputError, SpectrumError

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


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    """An InputError naming ``name`` unless ``value`` is a whole number in [low, high]."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = (f"between {low} and {high}" if low is not None and high is not None
                 else f"at least {low}" if low is not None else f"at most {high}")
        raise InputError(f"{name} must be {bound}, got {value}")


def supports_gpu_offload() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


def system_info() -> str:
    """The backends and CPU features llama.cpp was built with."""
    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


@dataclass(frozen=True)
class SamplerSettings:
    """llama.cpp's sampler chain. The defaults are the model card's: temperature 1, no
    truncation, no penalty, i.e. exactly the model's distribution."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0

    @property
    def truncates(self) -> bool:
        """Whether the chain sorts or cuts the candidate list (anything but plain "dist")."""
        return (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0
                or self.temperature == 0.0)


class Engine:
    """A loaded GGUF model and its context. Thread-safe: calls are serialised."""

    def __init__(self, path: str, *, ctx: int | None = None, gpu_layers: int | None = None,
                 threads: int | None = None, batch: int = 512, max_sequences: int = 64):
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
        self._prompt_row = np.empty(0, dtype=np.float32)  # logits after cached_tokens
        # Sampling runs llama.cpp's sampler chains on logits rows we hold, one worker thread
        # per core (ctypes releases the GIL), each with its own candidate buffer.
        workers = min(threads, 8)
        self._samplers = [_CandidateBuffer(self.n_vocab) for _ in range(workers)]
        self._pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
        self.tokens_evaluated = 0  # tokens sent to llama_decode so far (for tests and the bench)

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = self._model = None
            if self._pool:
                self._pool.shutdown()

    def __del__(self):
        self.close()

    def clear(self) -> None:
        """Forget every cached token (the next call evaluates its prompt from scratch)."""
        with self._lock:
            llama_cpp.llama_memory_clear(self._memory, True)
            self.cached_tokens = []

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

    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self._model, buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    # -- tokens -------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Plain text to tokens: nothing in ``text`` is read as a control token, no BOS added."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, False, False)
        if n < 0:
            raise SpectrumError(f"tokenizer failed on {len(data)} bytes of text")
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

    def detokenize(self, tokens: Sequence[int]) -> str:
        # Whole sequences at once, so multi-byte characters split over tokens come out whole.
        data = b"".join(self.token_bytes(t, special=False) for t in tokens)
        return data.decode("utf-8", "replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

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

    def _forget_continuations(self) -> None:
        # Sequences 1.. are scratch; only sequence 0 (the cached prompt) survives a call.
        llama_cpp.llama_memory_seq_rm(self._memory, -1, len(self.cached_tokens), -1)
        for seq in range(1, self.max_sequences):
            llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)

    def _check_fits(self, prompt: Sequence[int]) -> None:
        if not prompt:
            raise InputError("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise InputError(f"the prompt is {len(prompt)} tokens but the context holds "
                             f"{self.n_ctx}; raise --ctx (the model was trained on "
                             f"{self.n_ctx_train})")

    def _reuse_prefix(self, prompt: Sequence[int]) -> int:
        """Trim sequence 0 to its common prefix with ``prompt``; return how many of the
        prompt's tokens it holds. All of them only if the prompt is exactly the cached one, whose
        logits row is kept: a repeated prompt gets exactly the same numbers (re-decoding its last
        token alone would round differently on quantized kernels and change seeded samples)."""
        self._check_fits(prompt)
        if list(prompt) != self.cached_tokens:
            keep = min(common_prefix(self.cached_tokens, prompt), len(prompt) - 1)
            llama_cpp.llama_memory_seq_rm(self._memory, 0, keep, -1)
            self.cached_tokens = list(prompt[:keep])
        self._forget_continuations()
        return len(self.cached_tokens)

    def _prefill(self, prompt: Sequence[int]) -> np.ndarray:
        """Make sequence 0 hold ``prompt``, evaluating only what the cache lacks; return the
        logits at the prompt's last position."""
        keep = self._reuse_prefix(prompt)
        if keep < len(prompt):
            n = len(prompt) - keep
            rows = self._decode_all(prompt[keep:], range(keep, len(prompt)), [(0,)] * n,
                                    [False] * (n - 1) + [True])
            self._prompt_row = rows[n - 1]
            self.cached_tokens = list(prompt)
        return self._prompt_row

    def prompt_logits(self, prompt: Sequence[int]) -> np.ndarray:
        """Next-token logits after ``prompt``."""
        with self._lock, self._consistent():
            return self._prefill(prompt)

    @contextlib.contextmanager
    def _consistent(self):
        # A failed or interrupted decode leaves the cache in an unknown state: drop it.
        try:
            yield
        except BaseException:
            self.clear()
            raise

    def continuation_logprobs(self, prompt: Sequence[int],
                              continuations: Sequence[tuple[int, Sequence[int]]]) -> list[np.ndarray]:
        """For each ``(start, tokens)``, the log-probability of each of ``tokens`` placed at
        positions start.. after ``prompt[:start]``. ``start`` is normally ``len(prompt)``; it is
        smaller when a tokenizer merges the continuation into the prompt's last text."""
        with self._lock, self._consistent():
            results: list[np.ndarray | None] = [None] * len(continuations)
            for group in self._groups(prompt, continuations):
                self._continuation_group(prompt, continuations, group, results)
            return results  # type: ignore[return-value]

    def _groups(self, prompt, continuations) -> list[list[int]]:
        """Split continuations into runs that fit the free sequences and KV cells at once."""
        free_cells = self.n_ctx - len(prompt)
        groups: list[list[int]] = [[]]
        used = 0
        for i, (start, tokens) in enumerate(continuations):
            need = len(tokens) + (len(prompt) - start)
            if need > free_cells:
                raise InputError(f"candidate {i + 1} needs {need} tokens after a {len(prompt)}-token "
                                 f"prompt but the context holds {self.n_ctx}; raise --ctx")
            if groups[-1] and (len(groups[-1]) >= self.max_sequences - 1 or used + need > free_cells):
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += need
        return groups

    def _continuation_group(self, prompt, continuations, group, results) -> None:
        """One llama_decode (per n_batch tokens) for the prompt's uncached part and every
        continuation in ``group``: prompt tokens belong to sequence 0 and to each continuation's
        sequence, so they are evaluated once and attended to by all."""
        keep = self._reuse_prefix(prompt)
        # Continuation i lives in sequence s; it decodes from ``first``: its own tokens but the
        # last (whose probability comes from the row before it), or from one token earlier
        # when it re-spells the prompt's end (see ``start``).
        firsts = {}
        for seq, i in enumerate(group, start=1):
            start = continuations[i][0]
            firsts[seq] = start if start == len(prompt) else start - 1
            llama_cpp.llama_memory_seq_cp(self._memory, 0, seq, 0, min(firsts[seq], keep))
        tokens, positions, seq_sets, wants = [], [], [], []
        for pos in range(keep, len(prompt)):
            tokens.append(prompt[pos])
            positions.append(pos)
            seq_sets.append((0, *(seq for seq, first in firsts.items() if first > pos)))
            wants.append(pos == len(prompt) - 1)
        n_prompt = len(tokens)
        owner, targets = [], []  # per continuation entry: its sequence, the token it predicts
        for seq, i in enumerate(group, start=1):
            start, cont = continuations[i]
            full = list(prompt[:start]) + list(cont)
            for pos in range(firsts[seq], len(full) - 1):
                tokens.append(full[pos])
                positions.append(pos)
                seq_sets.append((seq,))
                wants.append(pos >= start - 1)
                owner.append(seq)
                targets.append(full[pos + 1])

        def reduce(j, row):  # the prompt's last row is kept whole (the prefix cache's row)
            if j < n_prompt:
                return row.copy()
            return float(row[targets[j - n_prompt]] - logsumexp(row))

        kept = self._decode_all(tokens, positions, seq_sets, wants, reduce)
        if n_prompt:
            self._prompt_row = kept.pop(n_prompt - 1)
            self.cached_tokens = list(prompt)
        logprobs = {seq: [] for seq in firsts}
        for j in sorted(kept):
            logprobs[owner[j - n_prompt]].append(kept[j])
        prompt_lse = logsumexp(self._prompt_row)
        for seq, i in enumerate(group, start=1):
            start, cont = continuations[i]
            own = logprobs[seq]
            if start == len(prompt):
                own = [self._prompt_row[cont[0]] - prompt_lse] + own
            results[i] = np.array(own, dtype=np.float64)
        self._forget_continuations()

    def sample(self, prompt: Sequence[int], n: int, max_tokens: int, settings: SamplerSettings,
               seed: int | None, stop_tokens: set[int]) -> list[tuple[list[int], str]]:
        """``n`` independent continuations of ``prompt``, decoded side by side. Returns each
        one's tokens (without the stop token) and why it ended: "stop" or "length"."""
        with self._lock, self._consistent():
            self._check_fits(prompt)
            room = self.n_ctx - len(prompt)
            max_tokens = min(max_tokens, room)
            # All samples of a group hold their tokens in the context at once.
            per_group = max(1, min(self.max_sequences - 1, room // max_tokens))
            results: list[tuple[list[int], str]] = []
            for lo in range(0, n, per_group):
                count = min(n - lo, per_group)
                seeds = [None if seed is None else seed + lo + j for j in range(count)]
                results += self._sample_group(prompt, count, max_tokens, settings, seeds, stop_tokens)
            return results

    def _sample_group(self, prompt, count, max_tokens, settings, seeds, stop_tokens):
        prompt_row = self._prefill(prompt)
        chains = [self._sampler_chain(settings, s) for s in seeds]
        try:
            outputs: list[list[int]] = [[] for _ in range(count)]
            reasons = ["length"] * count
            for j in range(count):
                llama_cpp.llama_memory_seq_cp(self._memory, 0, j + 1, -1, -1)
            live = list(range(count))
            rows = np.broadcast_to(prompt_row, (count, self.n_vocab))  # every first token
            step = 0
            while live:
                nxt = []
                for j, token in zip(live, self._sample_rows([chains[j] for j in live], rows,
                                                                   settings.truncates)):
                    if token in stop_tokens or self.is_end_of_generation(token):
                        reasons[j] = "stop"
                    else:
                        outputs[j].append(token)
                        if len(outputs[j]) < max_tokens:
                            nxt.append(j)
                if not nxt:
                    break
                pos = len(prompt) + step
                self._decode([outputs[j][-1] for j in nxt], [pos] * len(nxt),
                             [(j + 1,) for j in nxt], [True] * len(nxt))
                live = nxt
                rows = self._logits_view(len(nxt))
                step += 1
            return list(zip(outputs, reasons))
        finally:
            for chain in chains:
                llama_cpp.llama_sampler_free(chain)
            self._forget_continuations()

    def _logits_view(self, n_outputs: int) -> np.ndarray:
        """The last decode's logits, one row per output in batch order, without a copy."""
        ptr = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_outputs, self.n_vocab))

    def _sample_rows(self, chains, rows: np.ndarray, truncates: bool) -> list[int]:
        """One token per (chain, row), the rows split over the worker threads."""
        workers = len(self._samplers) if self._pool and len(chains) > 1 else 1

        def work(w: int) -> list[int]:
            return [self._samplers[w].sample(chains[j], rows[j], truncates)
                    for j in range(w, len(chains), workers)]

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
        return [parts[j % workers][j // workers] for j in range(len(chains))]

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


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def logsumexp(rows: np.ndarray) -> np.ndarray:
    """Per-row log-sum-exp: exp in float32 (fast over a 262k vocabulary), sums in float64."""
    peak = rows.max(axis=-1, keepdims=True)
    sums = np.exp(rows - peak).sum(axis=-1, dtype=np.float64)
    return peak[..., 0].astype(np.float64) + np.log(sums)


def log_softmax(rows: np.ndarray) -> np.ndarray:
    return rows.astype(np.float64) - logsumexp(rows)[..., None]


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
