"""The tokens of text runs already seen, bounded by the memory they hold.

Prompts repeat their text runs (every candidate and every line of a batch job re-renders the
same description and examples), so each distinct run is tokenised once. The bound is in bytes,
not entries: a server's cache of 4,096 entries keyed by whole texts grew by gigabytes from a
few dozen multi-megabyte descriptions, each of them refused. A text with more tokens than the
context is refused by the tokenizer itself (its ``limit``) before its tokens become Python
objects, so it is neither kept nor held for a while: no prompt that holds it can run.
"""

from __future__ import annotations

import sys
import threading
from array import array
from collections import OrderedDict
from typing import Callable

DEFAULT_BUDGET = 32 * 2**20  # bytes: text and tokens of ~8,000 runs of a typical prompt's size


class TokenCache:
    """``cache(text)`` = ``tokenize(text)``, remembered (least recently used out first) while
    the texts and their tokens fit in ``budget`` bytes; with ``longest``, ``tokenize(text,
    limit=longest)`` refuses longer texts. Safe to call from many threads."""

    def __init__(self, tokenize: Callable[[str], list[int]], *, longest: int | None,
                 budget: int = DEFAULT_BUDGET):
        self._tokenize, self._longest, self._budget = tokenize, longest, budget
        self._entries: OrderedDict[str, array] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def __call__(self, text: str) -> list[int]:
        with self._lock:
            found = self._entries.get(text)
            if found is not None:
                self._entries.move_to_end(text)
                return found.tolist()
        # Outside the lock: a long text does not stall the others.
        if self._longest is None:
            tokens = self._tokenize(text)
        else:
            tokens = self._tokenize(text, limit=self._longest)
        self._keep(text, array("i", tokens))
        return tokens

    @property
    def size(self) -> int:
        """Bytes held now (texts and tokens)."""
        return self._size

    def _keep(self, text: str, tokens: array) -> None:
        cost = _cost(text, tokens)
        if cost > self._budget:
            return
        with self._lock:
            if text in self._entries:
                return
            self._entries[text] = tokens
            self._size += cost
            while self._size > self._budget:
                old_text, old_tokens = self._entries.popitem(last=False)
                self._size -= _cost(old_text, old_tokens)


def _cost(text: str, tokens: array) -> int:
    return sys.getsizeof(text) + sys.getsizeof(tokens)
