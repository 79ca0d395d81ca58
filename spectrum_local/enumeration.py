"""Best-first search for a prompt's most probable complete outputs (``SpectrumModel.enumerate``).

A prompt's outputs form a token tree: a path's probability is the product of its tokens'
next-token probabilities, and an output is a path that the end-of-output token closes. The
search keeps a frontier of partial outputs, most probable first, and expands the best ones
together: one read of many paths, so the engine decodes the tokens they share once. An
expanded path's logits row gives the probability that the output ends there and every
child's probability. A child is never more probable than its parent, so an output found is
certain to be in its place in the ranking once nothing unexplored is more probable than it.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .backend import Backend, Path, logsumexp

PATHS_PER_READ = 32  # frontier paths expanded in one read
MAX_CHILDREN = 1024  # children of one path put on the frontier; the rest count as unexplored
MIN_PATH_PROB = 1e-9  # paths less likely than this are not followed (counted as unexplored)


@dataclass
class Search:
    """What the search found: ``found`` holds (logprob, tokens, text) of each complete output
    (the end-of-output token not included), in the order found."""

    found: list[tuple[float, tuple[int, ...], str]] = field(default_factory=list)
    unexplored: float = 0.0  # mass of partial outputs never expanded (the frontier, pruned paths)
    bound: float = 1.0  # no output not found is more probable than this
    cut: float = 0.0  # mass that is no output: at max_tokens, or ended by another EOG token
    decoded: int = 0  # tokens the reads decoded (trie nodes: each shared prefix once)
    stopped: str = ""  # the rule that ended it: coverage, min_prob, max_outputs, max_decoded,
    # or exhausted (no path left to expand)


def best_first(backend: Backend, prompt: Sequence[int], end_token: int, other_ends: set[int],
               spell: Callable[[Sequence[int]], str], *, coverage: float, min_prob: float,
               max_outputs: int, max_tokens: int, max_decoded: int, cancel=None) -> Search:
    """Expand the most probable partial outputs of ``prompt`` until a stopping rule holds.
    ``spell`` turns an output's tokens into its text: ``max_outputs`` counts texts, since two
    token paths may spell one."""
    search = Search()
    ends = [end_token, *other_ends]
    log_floor = math.log(max(min_prob, MIN_PATH_PROB))
    frontier: list[tuple[float, tuple[int, ...]]] = [(-0.0, ())]  # (-logprob, tokens)
    pruned_best = 0.0  # the most probable path left off the frontier
    pruned_mass = 0.0
    unsettled: list[tuple[float, str]] = []  # outputs found, (-logprob, text), best first
    settled_texts: set[str] = set()  # outputs nothing unexplored can outrank
    settled_mass = 0.0
    while True:
        # The bound never grows: a path is never more probable than the one it extends.
        search.bound = max(math.exp(-frontier[0][0]) if frontier else 0.0, pruned_best)
        while unsettled and math.exp(-unsettled[0][0]) >= search.bound:
            neg_lp, text = heapq.heappop(unsettled)
            if math.exp(-neg_lp) >= min_prob:  # those below are never listed
                settled_texts.add(text)
                settled_mass += math.exp(-neg_lp)
        if len(settled_texts) >= max_outputs:
            search.stopped = "max_outputs"
        elif settled_mass >= coverage:
            search.stopped = "coverage"
        elif search.bound < min_prob:
            search.stopped = "min_prob"
        elif not frontier:
            search.stopped = "exhausted"
        if search.stopped:
            break
        batch, prefixes = [], set()
        while frontier and len(batch) < PATHS_PER_READ:
            tokens = frontier[0][1]
            new = {tokens[:k] for k in range(1, len(tokens) + 1)} - prefixes
            if search.decoded + len(prefixes) + len(new) > max_decoded:
                break
            batch.append(heapq.heappop(frontier))
            prefixes |= new
        if not batch:
            search.stopped = "max_decoded"
            break
        paths = [Path([*prompt, *tokens], len(prompt) + len(tokens), final=True)
                 for _, tokens in batch]
        results = backend.read(paths, keep=prompt, cancel=cancel)
        search.decoded += len(prefixes)
        for (neg_lp, tokens), result in zip(batch, results):
            path_lp, row = -neg_lp, result.row
            lse = float(logsumexp(row))
            output = (path_lp + float(row[end_token]) - lse, tokens, spell(tokens))
            search.found.append(output)
            heapq.heappush(unsettled, (-output[0], output[2]))
            ending = math.fsum(math.exp(float(row[t]) - lse) for t in ends)
            going_on = math.exp(path_lp) * max(0.0, 1.0 - ending)
            search.cut += math.exp(path_lp) * math.fsum(
                math.exp(float(row[t]) - lse) for t in other_ends)
            if len(tokens) == max_tokens:
                search.cut += going_on
                continue
            lps = row.astype(np.float64) - lse + path_lp
            lps[ends] = -np.inf
            k = min(MAX_CHILDREN, len(lps) - 1)  # the k best, and the best of the rest
            best = np.argpartition(-lps, k)[:k + 1]
            best = best[np.argsort(-lps[best], kind="stable")]
            kept = best[:k][lps[best[:k]] >= log_floor]
            for t in kept:
                heapq.heappush(frontier, (-float(lps[t]), (*tokens, int(t))))
            pruned_best = max(pruned_best, math.exp(lps[best[len(kept)]]))
            pruned_mass += max(0.0, going_on - math.fsum(np.exp(lps[kept])))
    search.unexplored = min(1.0, pruned_mass + math.fsum(math.exp(-lp) for lp, _ in frontier))
    return search
