"""Generate spectrum_local/suites/basic.jsonl, the built-in task suite of `spectrum-local eval`.

The suite holds small tasks whose true answer is known exactly, so a spectrum model can be
graded against the truth rather than against another model:

- distribution: score every candidate answer of a prompt (two dice, a coin, an urn, ...) and
  compare the model's normalized probabilities with the true distribution;
- generation: sample n answers and count how many are valid (a US state, a prime under 100, ...);
- steerability: the model's loss on example k+1 given a description and k examples of a hidden
  process (a biased coin, a loaded die, ...), compared with the process's entropy, the lowest
  loss possible once the process is known.

Every target is computed here from the task's definition with exact fractions, never typed in,
and the random example outputs come from seeded generators, so the file is reproducible: edit
this script (not the .jsonl) and regenerate it byte for byte with

    python scripts/make_suite.py            # writes spectrum_local/suites/basic.jsonl
    python scripts/make_suite.py OUT.jsonl  # writes elsewhere (the tests compare the two)

Standard library only.
"""

import itertools
import json
import math
import random
import sys
from fractions import Fraction
from pathlib import Path

SEED = 20250101
OUT = Path(__file__).resolve().parent.parent / "spectrum_local" / "suites" / "basic.jsonl"

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
US_STATES = [
    "Alabama", "Alaska", "Arizona", "Arkansas", "California", "Colorado", "Connecticut",
    "Delaware", "Florida", "Georgia", "Hawaii", "Idaho", "Illinois", "Indiana", "Iowa",
    "Kansas", "Kentucky", "Louisiana", "Maine", "Maryland", "Massachusetts", "Michigan",
    "Minnesota", "Mississippi", "Missouri", "Montana", "Nebraska", "Nevada", "New Hampshire",
    "New Jersey", "New Mexico", "New York", "North Carolina", "North Dakota", "Ohio",
    "Oklahoma", "Oregon", "Pennsylvania", "Rhode Island", "South Carolina", "South Dakota",
    "Tennessee", "Texas", "Utah", "Vermont", "Virginia", "Washington", "West Virginia",
    "Wisconsin", "Wyoming",
]
LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]


# --- exact distributions --------------------------------------------------------------------

def from_outcomes(outcomes):
    """The distribution of a list of equally likely outcomes (repeats add up)."""
    dist = {}
    for o in outcomes:
        dist[o] = dist.get(o, 0) + Fraction(1, len(outcomes))
    return dist


def uniform(values):
    return from_outcomes(list(values))


def entropy(dist):
    """Entropy in nats. log(1/p) rather than -log(p), so a point mass gives 0.0, not -0.0."""
    return sum(float(p) * math.log(1 / p) for p in dist.values() if p)


def primes_below(n):
    """Sieve of Eratosthenes."""
    is_prime = [False, False] + [True] * (n - 2)
    for p in range(2, math.isqrt(n - 1) + 1):
        if is_prime[p]:
            for m in range(p * p, n, p):
                is_prime[m] = False
    return [p for p in range(n) if is_prime[p]]


def rng_for(task_id):
    # One generator per task (string seeds are hashed with SHA-512, stable across runs and
    # Python versions), so adding or reordering tasks leaves the others' examples unchanged.
    return random.Random(f"{SEED}/{task_id}")


# --- task builders: the dicts' key order is the file's key order -----------------------------

def description(text):
    return [{"role": "description", "content": text}]


def distribution(task_id, messages, dist, ordinal=False):
    candidates = list(dist)
    assert sum(dist.values()) == 1, task_id  # exact, before rounding to floats
    task = {"id": task_id, "type": "distribution", "messages": messages,
            "candidates": [str(c) for c in candidates],
            "target_probs": [float(dist[c]) for c in candidates]}
    if ordinal:
        task["ordinal"] = True
    return task


def generation(task_id, text, max_tokens, **validator):
    (kind, value), = validator.items()  # exactly one of valid / regex / int_range
    return {"id": task_id, "type": "generation", "messages": description(text), "n": 100,
            "max_tokens": max_tokens, kind: value}


def steerability(task_id, text, examples, k, optimal_loss):
    task = {"id": task_id, "type": "steerability"}
    if text is not None:
        task["description"] = text
    task.update(examples=examples, k=k, orderings=4, optimal_loss=optimal_loss)
    assert len(examples) >= max(k) + 1, task_id  # example k+1 is the one scored
    return task


def iid_outputs(task_id, dist, count):
    """count i.i.d. draws from dist as {"output": str} examples."""
    values = list(dist)
    draws = rng_for(task_id).choices(values, weights=[dist[v] for v in values], k=count)
    return [{"output": str(v)} for v in draws]


def proportional_outputs(task_id, dist, count):
    """count examples whose frequencies are exactly dist's, in a seeded random order.

    Not i.i.d. draws: a small i.i.d. sample strays from the process (12 rolls of a die with
    P(6) = 1/2 can show three sixes), and then a model that knows the process would score
    far from optimal_loss on these very examples. With exact frequencies, the examples' mean
    loss under the true process is exactly the entropy."""
    outputs = []
    for value, p in dist.items():
        repeats = p * count
        assert repeats.denominator == 1, (task_id, value)
        outputs += [str(value)] * int(repeats)
    rng_for(task_id).shuffle(outputs)
    return [{"output": o} for o in outputs]


# --- the suite ------------------------------------------------------------------------------

def generate():
    tasks = []

    # Distribution tasks: the true distribution over all valid answers.
    die = range(1, 7)
    tasks.append(distribution(
        "one-die", description("Roll a six-sided die. What number does it show?"),
        uniform(die), ordinal=True))
    # The product's demo prompt; keys sorted so candidates run 2..12.
    two_dice = from_outcomes([a + b for a, b in itertools.product(die, die)])
    tasks.append(distribution(
        "two-dice-sum",
        description("Roll two six-sided dice. What is the sum of their values?"),
        dict(sorted(two_dice.items())), ordinal=True))
    d4 = range(1, 5)
    two_d4 = from_outcomes([a + b for a, b in itertools.product(d4, d4)])
    tasks.append(distribution(
        "two-d4-sum",
        description("Roll two four-sided dice. What is the sum of their values?"),
        dict(sorted(two_d4.items())), ordinal=True))
    tasks.append(distribution(
        "coin-flip", description("Flip a fair coin. Answer heads or tails."),
        uniform(["heads", "tails"])))
    two_coins = from_outcomes([flips.count("heads")
                               for flips in itertools.product(["heads", "tails"], repeat=2)])
    tasks.append(distribution(
        "two-coins-heads", description("Flip two fair coins. How many come up heads?"),
        dict(sorted(two_coins.items())), ordinal=True))
    tasks.append(distribution(
        "integer-1-10", description("Pick a random integer from 1 to 10."),
        uniform(range(1, 11)), ordinal=True))
    tasks.append(distribution(
        "likert-1-7",
        description("On a scale from 1 to 7, pick a point uniformly at random."),
        uniform(range(1, 8)), ordinal=True))
    tasks.append(distribution(
        "weekday", description("Pick a random day of the week."), uniform(WEEKDAYS)))
    tasks.append(distribution(
        "month", description("Pick a random month of the year."), uniform(MONTHS)))
    tasks.append(distribution(
        "us-state", description("Name a random US state."), uniform(US_STATES)))
    # The description is built from the counts, so text and target cannot disagree.
    urn = {"red": 3, "blue": 2, "green": 5}
    balls = [color for color, count in urn.items() for _ in range(count)]
    listed = ", ".join(f"{n} {c}" for c, n in list(urn.items())[:-1])
    last_color, last_count = list(urn.items())[-1]
    tasks.append(distribution(
        "urn-color",
        description(f"An urn holds {listed} and {last_count} {last_color} balls. "
                    "One ball is drawn at random. What color is it?"),
        from_outcomes(balls)))
    suits = ["hearts", "diamonds", "clubs", "spades"]  # lowercase, as the description writes them
    ranks = ["A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K"]
    deck = list(itertools.product(ranks, suits))
    tasks.append(distribution(
        "card-suit",
        description("A card is drawn at random from a standard 52-card deck. "
                    "What is its suit: hearts, diamonds, clubs or spades?"),
        from_outcomes([suit for _, suit in deck])))
    # Example outputs in the prompt are i.i.d. draws too: the target stays uniform.
    letters = uniform(LETTERS)
    tasks.append(distribution(
        "letter-with-examples",
        description("A random uppercase letter of the English alphabet.")
        + [{"role": "output", "content": e["output"]}
           for e in iid_outputs("letter-with-examples", letters, 3)],
        letters))

    # Generation tasks: one validator each (valid / int_range / regex).
    tasks.append(generation("us-state-gen", "Name a random US state.", 10, valid=US_STATES))
    tasks.append(generation("weekday-gen", "Pick a random day of the week.", 8, valid=WEEKDAYS))
    # Not int_range: composites in range are invalid.
    tasks.append(generation("prime-under-100-gen", "Name a random prime number less than 100.",
                            8, valid=[str(p) for p in primes_below(100)]))
    tasks.append(generation("number-1-100-gen", "Pick a random number between 1 and 100.",
                            8, int_range=[1, 100]))
    # [0-9], not \d: \d also matches other scripts' digits.
    tasks.append(generation("pin-code-gen", "A random 4-digit PIN code.", 10,
                            regex="[0-9]{4}"))

    # Steerability tasks: the examples reveal what the description leaves out.
    coin = {"heads": Fraction(4, 5), "tails": Fraction(1, 5)}
    tasks.append(steerability(
        "biased-coin", "Flip a coin.", proportional_outputs("biased-coin", coin, 20),
        k=[0, 1, 2, 4, 8, 16], optimal_loss=entropy(coin)))
    loaded = {face: Fraction(1, 10) for face in range(1, 6)} | {6: Fraction(1, 2)}
    tasks.append(steerability(
        "loaded-die", "Roll a die.", proportional_outputs("loaded-die", loaded, 20),
        k=[0, 1, 2, 4, 8], optimal_loss=entropy(loaded)))
    # No description: the rule is in the examples only. Deterministic, so entropy 0.
    xs = rng_for("add-one").sample(range(1, 100), 12)
    tasks.append(steerability(
        "add-one", None, [{"input": str(x), "output": str(x + 1)} for x in xs],
        k=[0, 1, 2, 4, 8], optimal_loss=entropy({"x+1": Fraction(1)})))

    assert len({t["id"] for t in tasks}) == len(tasks)
    return tasks


def render(tasks):
    return "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks)


def main(argv):
    out = Path(argv[1]) if len(argv) > 1 else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    # newline="\n": the same bytes on Windows.
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.write(render(generate()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv)
