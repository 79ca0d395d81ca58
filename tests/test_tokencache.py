"""The tokenizer's cache of text runs: what it answers equals the tokenizer's own answer, what it
holds stays under its budget in bytes, and texts longer than the context are refused before
their tokens are made (the server's memory test is in test_guard.py)."""

from __future__ import annotations

import random

import pytest

from spectrum_local.errors import InputError
from spectrum_local.tokencache import TokenCache


def test_answers_equal_the_tokenizer_and_the_bytes_held_stay_under_the_budget(model):
    engine = model.engine
    budget = 64 * 1024
    cache = TokenCache(engine.tokenize, longest=engine.n_ctx - 1, budget=budget)
    rng = random.Random(0)
    texts = [" ".join(rng.choice(["dice", "coin", "red", "7", "Paris", "é", "🎲"])
                      for _ in range(rng.randint(1, 400))) for _ in range(300)]
    for text in texts + texts[::-1] + rng.sample(texts, 100):
        assert cache(text) == engine.tokenize(text)
        assert 0 < cache.size <= budget
    cache(texts[0])
    held = cache.size
    assert cache(texts[0]) == engine.tokenize(texts[0]) and cache.size == held  # a hit


def test_a_text_longer_than_the_context_is_refused_and_not_kept(model):
    engine = model.engine
    cache = TokenCache(engine.tokenize, longest=engine.n_ctx - 1)
    with pytest.raises(InputError, match="at least .* tokens but the context holds"):
        cache("word " * (2 * engine.n_ctx))
    assert cache.size == 0
