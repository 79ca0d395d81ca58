"""Reading log-probabilities along token paths (``Engine.read``): the paths and the prompt to
keep are merged into a token trie, so a token two paths share is decoded once, in the
sequences of all the paths through it, and logits are asked only where a probability is read.

A read changes nothing but the prefix cache and its own sequences: it refuses (``Busy``) before
touching anything when live samples hold the room, and whatever stops it (a failed decode,
``cancel``, Ctrl-C) leaves sequence 0 holding a prefix it really holds and every sequence it
took free again. Live samples' sequences are never in a read's decodes."""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import numpy as np

from ..backend import Busy, Path, PathResult, best_tokens, common_prefix, logsumexp
from ..errors import Cancelled
from .cache import KVCache, free_cells
from .native import Decoder


class Reader:
    """Reads over a context's cache, beside the samples ``live()`` gives (their room is
    theirs: ``cache.free_cells``)."""

    def __init__(self, decoder: Decoder, kv: KVCache, live: Callable[[], list]):
        self.decoder, self.kv, self.live = decoder, kv, live
        self.n_ctx, self.n_batch = decoder.ctx.n_ctx, decoder.ctx.n_batch

    def read(self, paths: Sequence[Path], keep: Sequence[int] | None,
             cancel: threading.Event | None = None) -> list[PathResult]:
        """Every path, and ``keep`` (the new prompt, into sequence 0), in one token trie: each
        node is decoded once, in the sequences of all the paths through it. ``keep`` goes in
        the first group; the paths go in trie order, in groups as large as the free sequences
        and cells allow. A group's last path keeps its sequence into the next group, which
        shares the nodes it has in common with it or with ``keep`` (trie order puts every node
        two groups share on that path), so splitting a trie decodes no node twice. The inputs
        are checked by the caller (``Engine.check_read``)."""
        kv = self.kv
        try:
            return self._read(paths, keep, cancel)
        except Busy:
            raise  # refused before anything changed
        except BaseException:
            # Cells a stopped decode may have written past the prompt sequence 0 still holds.
            kv.truncate(len(kv.tokens))
            raise

    def _read(self, paths, keep, cancel) -> list[PathResult]:
        kv = self.kv
        cached, row0 = kv.tokens, kv.row
        plan, starts = _Trie(), {}
        # To decode: a new prompt, or the cached one whose last row is not known.
        pending = keep if keep is not None and (list(keep) != cached or row0 is None) else None
        if pending is not None:
            # What survives of the cache; the paths start from it, so none needs what goes.
            keep_start = min(common_prefix(cached, keep), len(keep) - 1)
            cached, row0 = cached[:keep_start], None
            plan.add(KEEP, Path(keep, len(keep), final=True), keep_start)
            if self._budget(len(cached), 0) < len(plan.nodes_of[KEEP]) and self.live():
                raise Busy  # only live samples can hold the room (the prompt fits the context)
        results: list[PathResult | None] = [None] * len(paths)
        for i, path in enumerate(paths):
            if path.wants_nothing:
                results[i] = PathResult(np.zeros(0), [], [])
            else:
                starts[i] = _decode_start(path, cached, row0 is not None)
                plan.add(i, path, starts[i][0])
        todo = sorted(starts, key=lambda i: (starts[i][0], list(paths[i].tokens[starts[i][0]:])))
        if pending is not None:
            kv.truncate(keep_start)
        rows: dict[int, dict] = {}
        carrier = None  # (path, sequence) held over from the last group
        held: set[int] = set()  # the sequences this read has taken and not released yet

        def release(seq: int) -> None:
            held.discard(seq)
            kv.release(seq)
            if carrier and seq == carrier[1]:
                kv.ctx.seq_rm(kv.carrier_pin)

        try:
            while todo or pending is not None:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled")
                shared = {i: self._shared(plan, i, carrier, pending is None) for i in todo}
                placed, fresh = self._place(plan, todo, shared, carrier, pending)
                if not placed and pending is None:
                    if carrier:  # its cells take the room: re-decode what it held instead
                        release(carrier[1])
                        carrier = None
                        continue
                    if self.live():
                        raise Busy  # live samples hold the room: try after a step
                    kv.truncate(0)  # the cached prompt takes the room: read without it,
                    results = self._read(paths, None, cancel)
                    if keep is not None:
                        self._read([], keep, cancel)  # then cache it again
                    return results
                seqs = dict(zip(placed, kv.take(len(placed))))
                held.update(seqs.values())
                for i, seq in seqs.items():
                    depth, source = shared[i]
                    if starts[i][0] + depth:
                        kv.ctx.seq_cp(source, seq, 0, starts[i][0] + depth)
                if carrier:
                    release(carrier[1])
                carrier = (placed[-1], seqs[placed[-1]]) if placed else None
                owners = [(i, seqs[i], shared[i][0]) for i in placed]
                if carrier:  # pinned from now on (see cache)
                    kv.ctx.seq_cp(carrier[1], kv.carrier_pin)
                    owners.append((carrier[0], kv.carrier_pin, shared[carrier[0]][0]))
                if pending is not None:
                    owners += [(KEEP, 0, 0), (KEEP, kv.prompt_pin, 0)]
                owners = plan.owners(fresh, owners)
                wants = [plan.wants(node) and node not in rows for node in fresh]
                decoded = self._decode_all([plan.tokens[n] for n in fresh],
                                           [plan.positions[n] for n in fresh],
                                           [tuple(owners[n]) for n in fresh], wants,
                                           lambda j, row: plan.reduce(fresh[j], row))
                rows.update((fresh[j], kept) for j, kept in decoded.items())
                if pending is not None:
                    kv.hold(pending, rows[plan.nodes_of[KEEP][-1]]["row"])
                    pending = None
                for i in placed[:-1]:
                    release(seqs[i])
                todo = todo[len(placed):]
        finally:
            for seq in list(held):  # the carrier, or every sequence of a stopped group
                release(seq)
        for i, (start, from_row0) in starts.items():
            path, first_row = paths[i], None
            if from_row0:
                final = path.final and len(path.tokens) == len(cached)
                targets = {path.tokens[start]} if start < len(path.tokens) else set()
                first_row = _reduce(row0, targets, path.top, final)
            results[i] = plan.result(i, path, start, rows, first_row)
        return results

    def _budget(self, cached: int, held: int) -> int:
        return free_cells(self.n_ctx, cached, self.live(), held)

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
        budget = self._budget(len(self.kv.tokens), held)
        fresh = list(plan.nodes_of[KEEP]) if pending is not None else []
        placed, seen = [], set(fresh)
        for i in todo:
            if len(placed) == len(self.kv.free):
                break
            new = [n for n in plan.nodes_of[i][shared[i][0]:] if n not in seen]
            if len(fresh) + len(new) > budget:
                break
            placed.append(i)
            fresh += new
            seen.update(new)
        return placed, sorted(fresh)

    def _decode_all(self, tokens, positions, seq_sets, wants, reduce) -> dict:
        """Decode in batches of n_batch; return ``reduce(index, row)`` for each wanted token's
        logits row, by index. Each decode's rows are reduced before the next decode, so memory
        holds what ``reduce`` keeps, not a row of n_vocab floats (1 MiB for Gemma 3) per
        wanted token."""
        kept = {}
        for lo in range(0, len(tokens), self.n_batch):
            hi = min(lo + self.n_batch, len(tokens))
            rows = self.decoder.decode(tokens[lo:hi], positions[lo:hi], seq_sets[lo:hi],
                                       wants[lo:hi])
            wanted = [j for j in range(lo, hi) if wants[j]]
            kept.update((j, reduce(j, row)) for j, row in zip(wanted, rows))
        return kept


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

    def owners(self, nodes: Sequence[int], placed: Sequence[tuple[int, int, int]]) -> dict:
        """Each of ``nodes``'s sequences: those of the placed paths ((path, sequence, nodes it
        shares with what is decoded)) that decode it."""
        owners = {n: set() for n in nodes}
        for path, seq, shared in placed:
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


