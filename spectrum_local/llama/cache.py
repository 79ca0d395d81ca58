"""The context's KV cells: which sequences are free, what sequence 0 (the prefix cache) holds,
and how much room is left. Sequence 0 always holds the most recent prompt and, when known, its
last logits row: a new prompt that shares a prefix with it only evaluates the new part.

The prompt's tokens and its row change together (``truncate``, ``hold``): a row is never kept
for a prompt it was not computed after.

Sliding-window models (Gemma 3): llama.cpp reuses a cell that only one sequence holds once it
is outside that sequence's window (``find_slot``: "mask SWA, using current max pos for that
sequence"), and drops the sequence's older cells with it. A prompt read again from an earlier
position, or a read's paths branching from a carrier, need those cells: so two sequences are
pins, holding the same cells as sequence 0 (``PROMPT_PIN``) and as a read's carrier
(``CARRIER_PIN``), and a cell two sequences hold is never reused."""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence

import numpy as np

from .native import LlamaContext


class Reservation(Protocol):
    """What a live sample promises to fill: its job's prompt and at most max_tokens more."""

    @property
    def job(self): ...


def free_cells(n_ctx: int, cached: int, live: Iterable[Reservation], held: int = 0) -> int:
    """The room accounting, in one place: the cells not promised to anything. The context,
    less the prefix cache (``cached`` tokens), the live samples' reservation (each job's prompt
    once, each sample's max_tokens: an upper bound, since prompts shared with the cache count
    twice) and ``held`` (cells a read keeps between its decodes). Admission and reads both ask
    it, so "alone, a sample fits" (its max_tokens is cut to the room after its prompt) and "a
    read waits only for live samples" hold together."""
    jobs, reserved = {}, 0
    for sample in live:
        jobs[id(sample.job)] = len(sample.job.prompt)
        reserved += sample.job.max_tokens
    return n_ctx - cached - sum(jobs.values()) - reserved - held


class KVCache:
    """Sequence ids and the prefix cache over a context's unified KV cache."""

    def __init__(self, ctx: LlamaContext, n_sequences: int):
        self.ctx = ctx
        self.n_sequences = n_sequences
        self.prompt_pin, self.carrier_pin = n_sequences - 1, n_sequences - 2
        self.tokens: list[int] = []  # what sequence 0 holds
        self.row: np.ndarray | None = None  # the logits after ``tokens``, if known
        self.free = self._all_free()  # sequence ids not in use

    def _all_free(self) -> list[int]:
        return list(range(1, self.n_sequences - 2))

    def take(self, n: int = 1) -> list[int]:
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def release(self, seq: int) -> None:
        self.ctx.seq_rm(seq)
        self.free.append(seq)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens of sequence 0 (and their row only if all are kept)."""
        self.ctx.seq_rm(0, n, -1)
        self.ctx.seq_rm(self.prompt_pin, n, -1)
        if n < len(self.tokens):
            self.tokens, self.row = self.tokens[:n], None

    def hold(self, tokens: Sequence[int], row: np.ndarray | None) -> None:
        """Sequence 0 now holds ``tokens`` (decoded), whose last row is ``row``."""
        self.tokens, self.row = list(tokens), row

    def clear(self) -> None:
        """Forget every cell of every sequence."""
        self.ctx.clear()
        self.tokens, self.row = [], None
        self.free = self._all_free()
