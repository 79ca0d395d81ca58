"""enumerate: the most probable complete outputs, checked against brute force over the tiny
F32 Gemma 3's small vocabulary (an independent llama-cpp-python evaluation), against score,
and against sampling on the real default model."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from conftest import DICE, EXACT, FEW_SHOT
from naive import DEFAULT_LORA, naive_llama, naive_score
from scipy.stats import chisquare

from spectrum_local import InputError

FAMILY = "gemma3"


def log_softmax(row) -> np.ndarray:
    row = np.asarray(row, dtype=np.float64)
    return row - (row.max() + np.log(np.exp(row - row.max()).sum()))


def next_logprobs(llm, tokens: list[int], cached: int = 0) -> np.ndarray:
    """The naive model's next-token log-probabilities after ``tokens``; the ``cached`` tokens
    before them were evaluated by the previous call (llama-cpp-python drops the rest)."""
    llm.n_tokens = cached
    llm.eval(tokens[cached:])
    return log_softmax(llm.scores[len(tokens) - 1])


def canonical(model, messages, tokens) -> bool:
    """Whether ``tokens`` (after the prompt) are how ``score`` tokenises their own text."""
    prompt = model.prompt_tokens(messages)
    _, reads = model.candidate_reads(messages, [model.engine.detokenize(tokens)])
    (start, full), = reads.continuations[:1]
    return len(reads.continuations) == 1 and start == len(prompt) and full[:-1] == list(tokens)


@pytest.fixture(scope="module")
def tiny(f32_models, naive_f32):
    """The tiny F32 Gemma 3 (its vocabulary is a few hundred tokens) and its naive twin."""
    return f32_models[FAMILY], naive_f32[FAMILY]


def test_one_token_outputs_equal_brute_force_over_the_whole_vocabulary(tiny):
    model, naive = tiny
    prompt = model.prompt_tokens(FEW_SHOT)
    end, eog = model.end_of_output_id, model.engine.end_of_generation_tokens
    first = next_logprobs(naive, prompt)
    mass: Counter = Counter({"": math.exp(first[end])})  # the output that ends at once
    for t in range(model.engine.n_vocab):
        if t not in eog:
            p = math.exp(first[t] + next_logprobs(naive, prompt + [t], len(prompt))[end])
            mass[model.engine.detokenize([t])] += p
    result = model.enumerate(FEW_SHOT, coverage=1.0, max_outputs=len(mass), max_tokens=1)
    assert result.stopped in ("exhausted", "max_outputs") and result.unexplored < 1e-6
    assert {o.text for o in result.outputs} == set(mass)
    for o in result.outputs:
        if o.n_tokens <= 2:  # its own tokens are a one-token path: no other reading added
            assert math.log(o.text_prob) == pytest.approx(math.log(mass[o.text]), abs=EXACT)
    # Every mass accounted for: listed outputs, paths cut at one token, other end tokens.
    assert result.coverage + result.cut == pytest.approx(1.0, abs=1e-6)
    texts = [o.text_prob for o in result.outputs]
    assert texts == sorted(texts, reverse=True)


def test_two_token_outputs_agree_with_brute_force_over_the_likeliest_first_tokens(
        model, layout_bound):
    # The real default model, where outputs of two tokens ("10", "11", "12") are likely: every
    # output of at most two tokens with probability 1% or more, by brute force over the 200
    # likeliest first tokens (an output that likely needs a first token that likely).
    naive = naive_llama(model.path, n_ctx=256, lora_path=DEFAULT_LORA)
    prompt = model.prompt_tokens(DICE)
    end, eog = model.end_of_output_id, model.engine.end_of_generation_tokens
    first = next_logprobs(naive, prompt)
    outputs = {"": first[end]}
    for t1 in (int(t) for t in np.argsort(-first)[:200]):
        if t1 in eog:
            continue
        second = next_logprobs(naive, prompt + [t1], len(prompt))
        outputs[model.engine.detokenize([t1])] = first[t1] + second[end]
        for t2 in (int(t) for t in np.argsort(-second)[:100]):
            if t2 not in eog and first[t1] + second[t2] > math.log(0.005):
                path = [t1, t2]
                after = next_logprobs(naive, prompt + path, len(prompt) + 1)
                outputs.setdefault(model.engine.detokenize(path),
                                   first[t1] + second[t2] + after[end])
    naive.close()
    result = model.enumerate(DICE, coverage=1.0, min_prob=0.01, max_outputs=1000, max_tokens=2)
    assert result.stopped == "min_prob"
    listed = {o.text: o for o in result.outputs}
    for text, lp in outputs.items():
        if lp > math.log(0.01) + layout_bound:
            assert text in listed, text
        if text in listed:
            assert listed[text].logprob == pytest.approx(lp, abs=layout_bound)
    assert set(listed) <= set(outputs)
    assert sum(o.n_tokens == 3 for o in result.outputs) >= 2  # "10", "11", "12"


def test_each_output_has_the_probability_score_gives(tiny):
    model, naive = tiny
    result = model.enumerate(DICE, coverage=0.5, max_outputs=25, max_tokens=3, max_decoded=2000)
    assert len(result.outputs) == 25
    scored = model.score(DICE, [o.text for o in result.outputs if o.text])
    by_text = {c.text: c for c in scored.candidates}
    for o in result.outputs:
        assert o.prob == pytest.approx(math.exp(o.logprob), rel=1e-9)
        assert o.text_prob >= o.prob * (1 - 1e-9)
        if o.text:
            assert o.logprob == pytest.approx(by_text[o.text].logprob, abs=EXACT)
            assert o.n_tokens == by_text[o.text].n_tokens
            assert o.logprob == pytest.approx(naive_score(model, naive, DICE, o.text), abs=EXACT)


def test_coverage_grows_with_the_budget_and_never_passes_one(tiny):
    model, _ = tiny
    model.enumerate(FEW_SHOT, max_decoded=0)  # the prompt is cached: decoded counts outputs
    coverages = []
    for budget in (0, 4, 16, 64, 256, 1024):
        before = model.engine.tokens_evaluated
        result = model.enumerate(FEW_SHOT, coverage=1.0, max_outputs=1000, max_tokens=4,
                                 max_decoded=budget)
        # Each prefix once; past the budget only by the reads of outputs' own spellings.
        assert result.decoded == model.engine.tokens_evaluated - before
        assert result.stopped in ("max_decoded", "exhausted")
        assert result.coverage <= 1 + 1e-9
        assert result.coverage + result.unexplored + result.cut <= 1 + 1e-6
        coverages.append(result.coverage)
    assert coverages == sorted(coverages) and coverages[-1] > coverages[0]


def test_min_prob_and_max_outputs_stop_where_they_say(tiny):
    model, _ = tiny
    everything = model.enumerate(FEW_SHOT, coverage=1.0, max_outputs=1000, max_tokens=1)
    assert everything.stopped == "exhausted"
    floor = everything.outputs[9].text_prob
    above = model.enumerate(FEW_SHOT, coverage=1.0, min_prob=floor, max_tokens=1)
    assert above.stopped == "min_prob"
    assert [o.text for o in above.outputs] == [o.text for o in everything.outputs
                                              if o.text_prob >= floor]
    five = model.enumerate(FEW_SHOT, coverage=1.0, max_outputs=5, max_tokens=1)
    assert five.stopped == "max_outputs"
    assert [o.text for o in five.outputs] == [o.text for o in everything.outputs[:5]]


@pytest.mark.parametrize("bad", [dict(coverage=0), dict(coverage=1.5), dict(min_prob=-0.1),
                                 dict(max_outputs=0), dict(max_tokens=0), dict(max_decoded=-1),
                                 dict(coverage=float("nan"))])
def test_bad_settings_are_input_errors(tiny, bad):
    model, _ = tiny
    with pytest.raises(InputError):
        model.enumerate(DICE, **bad)


def test_sample_frequencies_fit_the_enumerated_distribution(model):
    # The real default model: 2,000 samples against the enumerated probabilities (a
    # chi-square goodness-of-fit over the outputs expected 5+ times, the rest in one bin).
    result = model.enumerate(DICE, coverage=0.99, max_outputs=300, max_tokens=8)
    n = 2000
    samples = model.sample(DICE, n=n, max_tokens=8, seed=11)
    counts = Counter(s.text if s.finish_reason == "stop" else None for s in samples)
    bins = [o for o in result.outputs if o.text_prob * n >= 5]
    assert len(bins) >= 8
    observed = [counts[o.text] for o in bins]
    expected = [o.text_prob * n for o in bins]
    observed.append(n - sum(observed))
    expected.append(n - sum(expected))
    assert chisquare(observed, expected).pvalue > 1e-3
