"""The llama.cpp batch engine: one model, one context, many sequences in a unified KV cache.

- ``read`` answers paths (token sequences to read log-probabilities along: score candidates,
  several requests' prompts, vLLM's prompt log-probs) in as few ``llama_decode`` calls as the
  batch allows, over a token trie (``reads``); sequence 0 keeps the newest prompt (``cache``).
- ``generate`` decodes samples side by side; ``advance`` lets samples of other jobs join at any
  step (the scheduler's cross-request batching; ``sampling``).

Every input is checked before anything changes (``check_read``, ``new_job``), so a bad request
never disturbs another; see ``reads`` and ``sampling`` for what a fault mid-way leaves.
"""

from __future__ import annotations

import functools
import numbers
import os
import threading
from typing import Sequence

from ..backend import Backend, Generation, Path, PathResult, SamplerSettings
from ..errors import InputError, check_int
from ..ggufheader import read_header
from ..ops import MAX_LORA_SCALE, MAX_THREADS, LoadOptions
from ..textfile import check_unicode
from .cache import KVCache
from .native import Decoder, LlamaContext, LlamaModel, supports_gpu_offload, system_info
from .reads import Reader
from .sampling import GenerateJob, Sampler

# llama.cpp 0.3.36's LLAMA_MAX_SEQ (llama-cparams.h).
LLAMA_MAX_SEQ = 256
INT32_MAX = 2**31 - 1
DEFAULT_CTX = 4096  # tokens, or the model's trained length if smaller


class Engine(Backend):
    """A loaded GGUF model and its context. Thread-safe: calls are serialised."""

    def __init__(self, path: str, *, ctx: int | None = None, gpu_layers: int | None = None,
                 threads: int | None = None, batch: int = 512, max_sequences: int = 64,
                 lora: Sequence[tuple[str, float]] = ()):
        # Every number that reaches llama.cpp is checked here: past its limits llama.cpp
        # asserts (killing the process), OpenMP aborts, or ctypes silently wraps the value.
        LoadOptions.check(ctx=ctx, threads=threads, gpu_layers=gpu_layers, batch=batch)
        check_int("max_sequences", max_sequences, 4)  # as batch: see LoadOptions
        for _, scale in lora:
            if isinstance(scale, bool) or not isinstance(scale, numbers.Real) \
                    or not -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE:
                raise InputError(f"a LoRA scale must be a number between -{MAX_LORA_SCALE} and "
                                 f"{MAX_LORA_SCALE}, got {scale!r}")
        self.path = path = os.fspath(path)
        self.lora = [(os.fspath(p), float(scale)) for p, scale in lora]
        # Adapters are checked before the model loads: their errors name the file.
        tied = bool(lora) and "output.weight" not in read_header(path)[1]
        for adapter_path, _ in self.lora:
            _check_adapter(adapter_path, tied)
        if gpu_layers is None:
            gpu_layers = -1 if supports_gpu_offload() else 0
        # More layers than the model has: all of them.
        self._model = LlamaModel(path, min(gpu_layers, INT32_MAX))
        self.n_vocab = self._model.n_vocab
        self.n_ctx_train = self._model.n_ctx_train
        self.metadata = self._model.metadata
        # Past the trained length positions are out of distribution, and the KV cache alone of
        # ctx=10**9 would ask for terabytes: the trained length is the limit (and the default's
        # cap, so a small model loads with the default).
        limit = self.n_ctx_train or DEFAULT_CTX
        if ctx is not None and ctx > limit:
            self._model.close()
            raise InputError(f"ctx={ctx} is more than the {limit} tokens this model was trained on")
        ctx = ctx or min(DEFAULT_CTX, limit)
        threads = threads or min(max(1, os.cpu_count() or 1), MAX_THREADS)
        # llama.cpp caps a decode's tokens (and so its outputs) at min(ctx, batch) but reserves
        # an output row for every sequence: more sequences than that asserts in the
        # constructor (n_outputs_max), e.g. --ctx 32..63 with 64 sequences.
        batch = min(batch, ctx)
        try:
            self._ctx = LlamaContext(
                self._model, n_ctx=ctx, n_batch=batch, threads=threads,
                n_seq_max=min(max_sequences, LLAMA_MAX_SEQ, batch),
                exact=self.metadata.get("general.file_type") == "0")  # LLAMA_FTYPE_ALL_F32
            # LoRA adapters apply to every decode of this context. They are fixed for the
            # engine's life, so everything cached was computed under them.
            if self.lora:
                self._ctx.set_adapters([self._model.load_adapter(p) for p, _ in self.lora],
                                       [scale for _, scale in self.lora])
        except BaseException:
            self._model.close()
            raise
        self.n_ctx, self.n_batch = self._ctx.n_ctx, self._ctx.n_batch
        self.max_sequences = self._ctx.n_seq_max
        self._lock = threading.RLock()
        self._decoder = Decoder(self._ctx, self.max_sequences)
        self._kv = KVCache(self._ctx, self.max_sequences)
        self._reader = Reader(self._decoder, self._kv, lambda: self._sampler.live)
        self._sampler = Sampler(self._decoder, self._kv, self._reader, self.n_vocab, threads,
                                self.is_end_of_generation)

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "_sampler", None) is not None:
            with self._lock:
                self._sampler.close()
                self._decoder.close()
                self._ctx.close()
                self._model.close()
                self._sampler = None

    def __del__(self):
        self.close()

    def clear(self) -> None:
        """Forget every cached token (the next call evaluates its prompt from scratch) and end
        every live sample ("abort")."""
        with self._lock:
            self._sampler.abort_all()
            self._kv.clear()

    # -- model facts --------------------------------------------------------------------------

    @property
    def tokens_evaluated(self) -> int:
        """Tokens sent to llama_decode so far (for tests, the bench and the server's load)."""
        return self._decoder.tokens_evaluated

    @property
    def cached_tokens(self) -> list[int]:
        return list(self._kv.tokens)

    @property
    def live_samples(self) -> int:
        return len(self._sampler.live)

    def model_size(self) -> int:
        return self._model.size()

    def n_params(self) -> int:
        return self._model.n_params()

    def description(self) -> str:
        return self._model.description()

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
        tokens, n = self._model.tokenize(data, special=special, bos=bos)
        if limit is not None and n > limit:
            raise self._too_long(n, at_least=True)
        return list(tokens[:n])

    def control_token(self, marker: str) -> int | None:
        """The id of a control marker such as ``<end_of_turn>``, or None if the vocabulary has
        no single control token for it."""
        tokens, n = self._model.tokenize(marker.encode("utf-8"), special=True, bos=False)
        if n != 1 or self.token_text(tokens[0], special=True) != marker:
            return None
        return tokens[0]

    def token_text(self, token: int, *, special: bool = True) -> str:
        return self.token_bytes(token, special=special).decode("utf-8", "replace")

    def token_bytes(self, token: int, *, special: bool = True) -> bytes:
        return self._model.token_bytes(token, special=special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """Tokens to text; control tokens are left out unless ``special``."""
        # Whole sequences at once, so multi-byte characters split over tokens come out whole.
        data = b"".join(self.token_bytes(t, special=special) for t in tokens)
        return data.decode("utf-8", "replace")

    def is_end_of_generation(self, token: int) -> bool:
        return self._model.is_end_of_generation(token)

    @functools.cached_property
    def end_of_generation_tokens(self) -> frozenset[int]:
        """Every token that ends a generation (sampling stops at any of them)."""
        return frozenset(t for t in range(self.n_vocab) if self.is_end_of_generation(t))

    # -- checks (before anything changes) -------------------------------------------------------

    def check_prompt(self, tokens: Sequence[int]) -> None:
        """A prompt or path must be non-empty, fit the context, and hold only real token ids
        (llama.cpp aborts on others)."""
        if not tokens:
            raise InputError("the prompt is empty")
        if len(tokens) >= self.n_ctx:
            raise self._too_long(len(tokens))
        self.check_tokens(tokens)

    def check_tokens(self, tokens: Sequence[int]) -> None:
        """Token ids from outside (an API client) must exist: llama.cpp aborts on others."""
        for t in tokens:
            if not isinstance(t, numbers.Integral) or not 0 <= t < self.n_vocab:
                raise InputError(f"token id {t!r} is not in the vocabulary (0..{self.n_vocab - 1})")

    def check_read(self, paths: Sequence[Path], keep: Sequence[int] | None) -> None:
        for tokens in [p.tokens for p in paths] + ([keep] if keep is not None else []):
            self.check_prompt(tokens)

    def _too_long(self, n_tokens: int, at_least: bool = False) -> InputError:
        return InputError(f"the prompt is {'at least ' if at_least else ''}{n_tokens} tokens "
                          f"but the context holds {self.n_ctx}; raise --ctx (the model was "
                          f"trained on {self.n_ctx_train})")

    # -- reads and samples ----------------------------------------------------------------------

    def read(self, paths: Sequence[Path], keep: Sequence[int] | None = None, *,
             cancel: threading.Event | None = None) -> list[PathResult]:
        """What each path asks for, decoding each token two paths have in common once; then
        sequence 0 holds ``keep`` (the prefix cache). ``Busy`` when live samples hold the
        room it needs (nothing changed: retry after a step)."""
        self.check_read(paths, keep)
        with self._lock:
            return self._reader.read(paths, keep, cancel)

    def generate(self, prompt: Sequence[int], n: int, max_tokens: int, settings: SamplerSettings,
                 seed: int | None, stop_tokens: set[int], *, logprobs: int | None = None,
                 on_step=None, on_done=None, cancel: threading.Event | None = None) -> list[Generation]:
        """``n`` independent continuations of ``prompt``, decoded side by side (see
        ``GenerateJob`` for the arguments). Returns each one's ``Generation``."""
        job = self.new_job(prompt, n, max_tokens, settings, seed, stop_tokens, logprobs,
                           on_step, on_done, cancel)
        with self._lock:
            while not job.finished:
                self.advance([job])
        if job.error:
            raise job.error
        return job.results

    def new_job(self, prompt, n, max_tokens, settings, seed, stop_tokens, logprobs=None,
                on_step=None, on_done=None, cancel=None) -> GenerateJob:
        """A job for ``advance``, checked; its max_tokens cut to the room after its prompt."""
        self.check_prompt(prompt)
        return GenerateJob(list(prompt), n, min(max_tokens, self.n_ctx - len(prompt)), settings,
                           seed, set(stop_tokens), logprobs, on_step, on_done, cancel)

    def advance(self, jobs: Sequence[GenerateJob]) -> None:
        """Admit the waiting samples of ``jobs`` that fit, then one decode step for every live
        sample (of these and earlier jobs). A job's own fault ends its own samples only."""
        with self._lock:
            for job in jobs:
                self._sampler.admit(job)
            self._sampler.step()


def _check_adapter(path: str, tied: bool) -> None:
    """llama.cpp checks an adapter against the model (architecture, tensor shapes), but an
    embedding adapter on a model whose output layer is its embedding (``tied``) passes, then
    aborts the process at the first decode (a ggml assert): refuse it here."""
    try:
        adapter_tensors = read_header(path)[1]
    except InputError as e:  # it names the file and what is wrong with it
        raise InputError(f"LoRA adapter: {e}") from None
    if tied and any(name.startswith("token_embd.") for name in adapter_tensors):
        raise InputError(f"the LoRA adapter {path} changes the token embedding, which this "
                         "model also uses as its output layer: llama.cpp cannot apply that")

