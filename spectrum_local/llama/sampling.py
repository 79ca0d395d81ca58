"""Sampling jobs (``Engine.generate`` and ``advance``): samples decoded side by side, one
sequence each, one ``llama_decode`` per step for every live sample, whatever job it belongs to;
the samples of a new job join at any step (the scheduler's cross-request batching).

A job's faults stay with it: its callbacks raising, its prompt failing to prefill or its
``cancel`` being set end its own samples; only a failed step's decode, which all live samples
share, ends them all (each job then carries that error)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..backend import Busy, Generation, Step, best_tokens, logsumexp
from .cache import KVCache, free_cells
from .native import CandidateBuffer, Decoder, SamplerChain
from .reads import Reader


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
        self.error: BaseException | None = None  # raised by a callback, or its prefill
        self._next = 0  # samples from here on are not admitted yet
        self._finished: set[int] = set()

    @property
    def waiting(self) -> int:
        """Samples not admitted yet."""
        return self.n - self._next

    @property
    def finished(self) -> bool:
        return len(self._finished) == self.n

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def take(self, k: int) -> range:
        self._next += k
        return range(self._next - k, self._next)

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

    def abandon(self, error: BaseException | None = None) -> None:
        """Every sample not finished yet ends now ("abort"), with ``error`` if one ended it."""
        self.error = self.error or error
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
class Live:
    """A sample being generated: its sequence, sampler chain and next position."""

    job: GenerateJob
    index: int
    seq: int | None
    chain: SamplerChain | None  # closed (None) once the sample is finished
    pos: int
    last: int = -1  # the token to decode next

    def free_chain(self) -> None:
        if self.chain is not None:
            self.chain.close()
            self.chain = None


class Sampler:
    """The live samples of a context, and the worker threads that run their sampler chains on
    logits rows we hold, one per core (ctypes releases the GIL), each with its own buffer."""

    def __init__(self, decoder: Decoder, kv: KVCache, reader: Reader, n_vocab: int,
                 threads: int, is_end: Callable[[int], bool]):
        self.decoder, self.kv, self.reader = decoder, kv, reader
        self.n_ctx, self.n_vocab, self.is_end = decoder.ctx.n_ctx, n_vocab, is_end
        self.live: list[Live] = []
        workers = min(threads, 8)
        self._buffers = [CandidateBuffer(n_vocab) for _ in range(workers)]
        self._pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None

    def close(self) -> None:
        self.abort_all()
        if self._pool:
            self._pool.shutdown()

    def abort_all(self, error: BaseException | None = None) -> None:
        """End every live sample ("abort") and free its sequence."""
        live, self.live = self.live, []
        for s in live:
            s.job.abandon(error)
            self._drop(s)

    def admit(self, job: GenerateJob) -> None:
        """Start the waiting samples of ``job`` that fit the room (alone, the first always
        does: its max_tokens was cut to the room after its prompt)."""
        if job.cancelled:
            job.abandon()
            return
        # With no live samples the cached prompt can make way: its cells are not counted.
        room = free_cells(self.n_ctx, len(self.kv.tokens) if self.live else 0, self.live)
        k = 0
        while k < min(job.waiting, len(self.kv.free)) \
                and len(job.prompt) + (k + 1) * job.max_tokens <= room:
            k += 1
        if not k:
            return
        try:
            self.reader.read([], keep=job.prompt)  # sequence 0 holds the prompt, and its row
            row = self.kv.row
        except Busy:
            return  # after the next step
        except Exception as e:  # its own prompt failed: its own error
            job.abandon(e)
            return
        fresh = [Live(job, i, None, SamplerChain(job.settings, job.seed_of(i), self.n_vocab),
                      len(job.prompt)) for i in job.take(k)]
        tokens = self._sample_rows(fresh, np.broadcast_to(row, (len(fresh), self.n_vocab)))
        for live, token in zip(fresh, tokens):
            if self._accept(live, token, row):
                live.seq = self.kv.take()[0]
                self.kv.ctx.seq_cp(0, live.seq)
                self.live.append(live)

    def step(self) -> None:
        """One decode for every live sample, and each one's next token."""
        for s in self.live:
            if s.job.cancelled:
                s.job.abandon()
        self.live = [s for s in self.live if not self._drop_if_done(s)]
        live = self.live
        if not live:
            return
        try:
            rows = self.decoder.decode([s.last for s in live], [s.pos for s in live],
                                       [(s.seq,) for s in live], [True] * len(live))
            tokens = self._sample_rows(live, rows)
        except Exception as e:  # the decode all of them share failed: theirs, not the engine's
            self.abort_all(e)
            return
        except BaseException as e:  # Ctrl-C
            self.abort_all(e)
            raise
        for s, token, row in zip(live, tokens, rows):
            s.pos += 1
            self._accept(s, token, row)
        self.live = [s for s in live if not self._drop_if_done(s)]

    def _accept(self, live: Live, token: int, row: np.ndarray) -> bool:
        """Record a sampled token; return whether the sample goes on."""
        job, result = live.job, live.job.results[live.index]
        step = Step(live.index, token, *_step_logprobs(row, token, job.logprobs))
        if token in job.stop_tokens or self.is_end(token):
            result.stop_step = step
            job.finish(live.index, "stop", token)
        else:
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

    def _drop_if_done(self, live: Live) -> bool:
        if not live.job.is_finished(live.index):
            return False
        self._drop(live)
        return True

    def _drop(self, live: Live) -> None:
        live.free_chain()
        if live.seq is not None:
            self.kv.release(live.seq)
            live.seq = None

    def _sample_rows(self, samples: Sequence[Live], rows: np.ndarray) -> list[int]:
        """One token per (sample, row): each sample's chain on its row, split over the workers."""
        workers = len(self._buffers) if self._pool and len(samples) > 1 else 1

        def work(w: int) -> list[int]:
            return [self._buffers[w].sample(samples[j].chain, rows[j],
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


def _step_logprobs(row: np.ndarray, token: int, k: int | None):
    if k is None:
        return None, None
    lse = logsumexp(row)
    return float(row[token] - lse), best_tokens(row, k, lse)

