"""make bench, issue 12: score over a token trie, and enumerate against sampling.

- score: the engine reads every candidate in one token trie (each shared prefix decoded
  once) vs each candidate decoded on its own after the cached prompt, as an engine without
  the trie does (its token count is the candidates' tokens summed).
- enumerate: tokens and time to reach coverage 0.9 and 0.99, against the samples needed to
  estimate the same distribution to the same total-variation accuracy (1 - coverage). Those
  are from the closed form for a multinomial's expected TV distance,
  E[TV] ~ sum_i sqrt(p_i (1 - p_i) / (2 pi n)), over the outputs enumerated at 0.99 (leaving
  the tail out flatters sampling), timed at the rate measured for 400 samples here.
"""

from __future__ import annotations

import json
import math
import time

DICE = [{"role": "description",
         "content": "Roll two six-sided dice. What is the sum of their values?"}]
STATE = [{"role": "description", "content": "Pick a US state."}]
AWKWARD = [("Calling your teacher mom", True),
           ("Waving back at someone who was waving at the person behind you", True),
           ("Holding the door for a stranger", False), ("Forgetting a coworker's name", True),
           ("Saying thank you to the bus driver", False),
           ("Laughing at your own joke when nobody else does", True),
           ("Ordering a coffee", False), ("Tripping on flat ground in public", True)]
SCORE_SETS = {
    "0..100": ([str(n) for n in range(101)], ">= 1.6x"),
    "1..2000": ([str(n) for n in range(1, 2001)], ">= 2.5x"),
    "8 JSON outputs": ([json.dumps({"situation": s, "is_awkward": a}) for s, a in AWKWARD],
                       ">= 1.6x"),
}


def score_rows(model, medians) -> list[tuple]:
    engine, rows = model.engine, []
    for name, (candidates, target) in SCORE_SETS.items():
        prompt, reads = model.candidate_reads(DICE, candidates)
        model.score(DICE, ["x"])  # the prompt is cached for both

        def trie():
            model.score(DICE, candidates)

        def each_alone():
            for continuation in reads.continuations:
                engine.continuation_logprobs(prompt, [continuation])

        before = engine.tokens_evaluated
        trie()
        nodes = engine.tokens_evaluated - before
        alone = sum(len(tokens) - 1 for _, tokens in reads.continuations)
        repeats = 1 if len(candidates) > 500 else 3
        t_trie, t_alone = medians(trie, each_alone, repeats=repeats)
        rows.append((f"score {name} ({nodes} trie nodes vs {alone} tokens)",
                     "each candidate decoded alone", t_trie, t_alone, "speed-up", target,
                     t_alone / t_trie))
    return rows


def samples_for_tv(probs: list[float], tv: float) -> int:
    return math.ceil(sum(math.sqrt(p * (1 - p)) for p in probs) ** 2 / (2 * math.pi * tv ** 2))


def enumerate_rows(model) -> list[tuple]:
    rows = []
    for name, messages in (("dice", DICE), ("a US state", STATE)):
        full = model.enumerate(messages, coverage=0.99, max_outputs=1000)
        n_rate = 400
        start = time.perf_counter()
        samples = model.sample(messages, n=n_rate, max_tokens=32, seed=0)
        per_sample = (time.perf_counter() - start) / n_rate
        tokens_per_sample = sum(s.n_tokens + 1 for s in samples) / n_rate
        for coverage in (0.9, 0.99):
            start = time.perf_counter()
            result = model.enumerate(messages, coverage=coverage, max_outputs=1000)
            took = time.perf_counter() - start
            # The accuracy reached: the mass not listed (max_outputs can stop it short).
            tv = 1 - result.coverage
            n = samples_for_tv([o.text_prob for o in full.outputs], tv)
            rows.append((f"enumerate {name}, coverage {coverage} asked, {result.coverage:.3f} "
                         f"reached ({result.decoded:,} tokens, {len(result.outputs)} outputs)",
                         f"{n:,} samples (~{n * tokens_per_sample:,.0f} tokens) for TV "
                         f"{tv:.3f}", took, n * per_sample, "speed-up", "",
                         n * per_sample / took))
    return rows
