"""Generate the tasks that train (and test) the demo adapter: synthetic distribution tasks.

The demo adapter is a small LoRA for the default base model (Gemma 3 270M) trained to behave
like a spectrum model: end its output turn, and put probability on the right answers in the
right proportions. Its training data are distribution tasks in the task format of
``spectrum-local eval`` (messages, candidates, target_probs; "ordinal" for ordered outcomes)
from eight families, each with random parameters and several wordings:

- dice: the sum of k n-sided dice (k 1..3, n in 4, 6, 8, 10, 12, 20), or the highest or
  lowest of two or three;
- coins: heads among k fair coins (k 1..6), one fair or biased coin, heads among a few
  biased coins;
- numbers: a uniform integer from a range (2..50 values), or an even, odd, multiple of 5 or
  multiple of 10 from one;
- lists: a uniform pick from a well-known closed list named in words (the planets) or from an
  explicit comma-separated list;
- likert: a rating scale with its distribution stated in percent or in words;
- urns: a draw from a bag of colored objects, or of tickets and cards with names and words;
- inputs: input-conditioned tasks (a number within d of the input, a letter of the input
  word, an item of the input list, heads among the input's number of coins, ...);
- percent: a weighted choice stated in percent, as a probability or as "3 times out of 4".

Each task has one of four prompt shapes:
  (a) a description only;
  (b) a description and 1-6 example outputs drawn i.i.d. from the target distribution;
  (c) 3-8 example outputs and no description, only where the examples reveal the process
      (a pick from a well-known list, a coin, a choice between two answers);
  (d) in the inputs family: a description, 0-4 (input, output) pairs and the final input (or,
      for a pick from the input list, 2-5 pairs and no description).

The held-out tasks (40) come from what the training tasks never show: weekdays, months, card
suits, card ranks, letters of the alphabet, US states, seven-sided dice and 7 or 8 coins. The
product's demo prompt (DEMO_PROMPT) appears in neither set, and no description of either set
equals it or a prompt of the built-in suite (scripts/make_suite.py) once lower-cased and
stripped of punctuation; training never asks for "the sum of their values" at all.

Every target is computed from the task's definition with exact fractions, never typed in,
and all randomness comes from generators seeded by --seed, so a seed gives the same files
byte for byte:

    python scripts/demo_tasks.py OUT_DIR [--seed S] [--n-train N]

writes OUT_DIR/train.jsonl (shuffled) and OUT_DIR/held_out.jsonl. Standard library only.
"""

import argparse
import json
import math
import random
import re
import sys
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_suite  # noqa: E402
from make_suite import LETTERS, MONTHS, US_STATES, WEEKDAYS, from_outcomes, uniform  # noqa: E402

DEMO_PROMPT = "Roll two six-sided dice. What is the sum of their values?"
MAX_CANDIDATES = 60

# Each family's share of the training tasks.
# Lists (uniform over a named set) and dice got more after the first shipped run: most
# held-out tasks are lists, whose JS fell by only 30%, and the two-dice triangle was barely
# learned (more sums of two dice, below, for the same reason).
SHARES = {"dice": 26, "coins": 10, "numbers": 8, "lists": 26, "likert": 6, "urns": 9,
          "inputs": 9, "percent": 6}

SUITS = ["hearts", "diamonds", "clubs", "spades"]
RANKS = ["A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K"]
RANK_WORDS = ["ace", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
              "jack", "queen", "king"]
WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six",
         7: "seven", 8: "eight", 9: "nine", 10: "ten", 12: "twelve", 20: "twenty"}

# Closed lists: (singular phrase, plural phrase, items). Named in words, so a prompt may
# describe them ("a planet of the solar system") or show only examples of them.
CLOSED = {
    "planets": ("planet of the solar system", "planets of the solar system",
                ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus",
                 "Neptune"]),
    "rainbow": ("color of the rainbow", "colors of the rainbow",
                ["red", "orange", "yellow", "green", "blue", "indigo", "violet"]),
    "continents": ("continent", "continents",
                   ["Africa", "Antarctica", "Asia", "Australia", "Europe", "North America",
                    "South America"]),
    "seasons": ("season of the year", "seasons of the year",
                ["spring", "summer", "autumn", "winter"]),
    "chess": ("kind of chess piece", "kinds of chess pieces",
              ["king", "queen", "rook", "bishop", "knight", "pawn"]),
    "oceans": ("ocean of the world", "oceans of the world",
               ["Atlantic", "Pacific", "Indian", "Arctic", "Southern"]),
    "zodiac": ("sign of the zodiac", "signs of the zodiac",
               ["Aries", "Taurus", "Gemini", "Cancer", "Leo", "Virgo", "Libra", "Scorpio",
                "Sagittarius", "Capricorn", "Aquarius", "Pisces"]),
    "noble gases": ("noble gas", "noble gases",
                    ["helium", "neon", "argon", "krypton", "xenon", "radon"]),
    "directions": ("cardinal direction", "cardinal directions",
                   ["north", "east", "south", "west"]),
    "rps": ("move in rock-paper-scissors", "moves in rock-paper-scissors",
            ["rock", "paper", "scissors"]),
    "traffic light": ("traffic light color", "traffic light colors",
                      ["red", "yellow", "green"]),
    "olympic rings": ("color of the Olympic rings", "colors of the Olympic rings",
                      ["blue", "yellow", "black", "green", "red"]),
    "south america": ("country of South America", "countries of South America",
                      ["Argentina", "Bolivia", "Brazil", "Chile", "Colombia", "Ecuador",
                       "Guyana", "Paraguay", "Peru", "Suriname", "Uruguay", "Venezuela"]),
    "nordic": ("Nordic country", "Nordic countries",
               ["Denmark", "Finland", "Iceland", "Norway", "Sweden"]),
    "beatles": ("member of the Beatles", "members of the Beatles",
                ["John", "Paul", "George", "Ringo"]),
    "hogwarts": ("Hogwarts house", "Hogwarts houses",
                 ["Gryffindor", "Hufflepuff", "Ravenclaw", "Slytherin"]),
    "platonic": ("Platonic solid", "Platonic solids",
                 ["tetrahedron", "cube", "octahedron", "dodecahedron", "icosahedron"]),
    "solfege": ("solfege syllable", "solfege syllables",
                ["do", "re", "mi", "fa", "sol", "la", "ti"]),
    "g7": ("G7 country", "G7 countries",
           ["Canada", "France", "Germany", "Italy", "Japan", "United Kingdom",
            "United States"]),
}
# Open lists: (plural noun, items); a prompt picks from a subset it spells out.
OPEN = {
    "fruits": ("fruits", ["apple", "banana", "orange", "pear", "grape", "mango", "cherry",
                          "peach", "plum", "kiwi", "lemon", "pineapple"]),
    "farm animals": ("animals", ["cow", "pig", "sheep", "goat", "horse", "chicken", "duck",
                                 "donkey"]),
    "board games": ("board games", ["chess", "checkers", "Monopoly", "Scrabble", "Go",
                                    "backgammon", "Risk", "Clue"]),
    "sports": ("sports", ["soccer", "basketball", "tennis", "baseball", "golf", "hockey",
                          "cricket", "rugby", "volleyball", "swimming"]),
    "capitals": ("European capitals", ["Paris", "Berlin", "Madrid", "Rome", "Lisbon",
                                       "Vienna", "Athens", "Dublin", "Warsaw", "Prague",
                                       "Oslo", "Stockholm", "Helsinki", "Copenhagen",
                                       "Brussels", "Amsterdam", "Budapest", "Bern"]),
    "languages": ("programming languages", ["Python", "Java", "C", "C++", "JavaScript", "Go",
                                            "Rust", "Ruby", "Swift", "Kotlin", "PHP",
                                            "Haskell"]),
    "genres": ("music genres", ["rock", "jazz", "pop", "blues", "classical", "hip hop",
                                "country", "reggae", "metal", "folk", "techno", "soul"]),
    "names": ("names", ["Emma", "Liam", "Olivia", "Noah", "Ava", "Ethan", "Sophia", "Lucas",
                        "Mia", "Oliver", "Zoe", "Leo", "Anna", "Ben", "Carl", "Nina"]),
    "shapes": ("shapes", ["circle", "square", "triangle", "rectangle", "pentagon", "hexagon",
                          "oval", "star"]),
    "vegetables": ("vegetables", ["carrot", "potato", "onion", "tomato", "pepper", "broccoli",
                                  "spinach", "cabbage", "cucumber", "lettuce"]),
    "instruments": ("instruments", ["piano", "guitar", "violin", "drums", "flute", "trumpet",
                                    "cello", "saxophone", "harp", "clarinet"]),
    "pets": ("pets", ["dog", "cat", "rabbit", "hamster", "parrot", "goldfish", "turtle"]),
    "colors": ("colors", ["red", "green", "blue", "yellow", "orange", "purple", "pink",
                          "brown", "black", "white", "gray"]),
    "drinks": ("drinks", ["tea", "coffee", "water", "juice", "milk", "soda", "lemonade"]),
    "flowers": ("flowers", ["rose", "tulip", "daisy", "lily", "orchid", "sunflower",
                            "daffodil", "violet"]),
    "vehicles": ("vehicles", ["car", "bus", "train", "bicycle", "boat", "plane", "truck",
                              "scooter"]),
    "weather": ("kinds of weather", ["sunny", "cloudy", "rainy", "snowy", "windy", "foggy"]),
}
# Words whose letters the inputs family draws from (lower case, no withheld entity).
LETTER_WORDS = [
    "apple", "banana", "river", "garden", "window", "pencil", "rocket", "silver", "yellow",
    "planet", "guitar", "butter", "coffee", "kitten", "jungle", "mirror", "orange", "puzzle",
    "rabbit", "summer", "winter", "castle", "dragon", "forest", "island", "lemon", "market",
    "number", "ocean", "pepper", "school", "spring", "tomato", "violin", "wizard", "zebra",
    "cloud", "bread", "chair", "house", "music", "night", "paper", "queen", "smile", "table",
    "water", "light", "stone", "tiger", "letter", "bottle", "cookie", "balloon", "pizza",
    "llama", "coconut", "giraffe", "teapot", "sunset",
]
COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink",
          "brown"]
TWO_OPTIONS = [("yes", "no"), ("true", "false"), ("left", "right"), ("up", "down"),
               ("on", "off"), ("accept", "reject"), ("cat", "dog"), ("tea", "coffee"),
               ("stay", "go"), ("win", "lose"), ("agree", "disagree"), ("odd", "even"),
               ("hot", "cold"), ("heads", "tails"), ("buy", "sell")]
MANY_OPTIONS = [("rock", "paper", "scissors"), ("win", "lose", "draw"),
                ("red", "blue", "green"), ("buy", "sell", "hold"), ("low", "medium", "high"),
                ("small", "medium", "large"), ("north", "south", "east", "west"),
                ("sunny", "cloudy", "rainy"), ("walk", "bike", "drive", "bus"),
                ("yes", "no", "maybe"), ("pizza", "pasta", "salad", "soup")]
SCALES = [(1, 5), (1, 5), (1, 7), (1, 4), (1, 3), (1, 10), (0, 10), (1, 6)]
LABELS = [["strongly disagree", "disagree", "neutral", "agree", "strongly agree"],
          ["disagree", "neutral", "agree"],
          ["never", "rarely", "sometimes", "often", "always"],
          ["poor", "fair", "good", "very good", "excellent"],
          ["very unlikely", "unlikely", "likely", "very likely"],
          ["low", "medium", "high"]]


# --- helpers ---------------------------------------------------------------------------------

def normalize(text):
    """Lower case, punctuation dropped, spaces collapsed: how near-copies of a prompt are
    caught ("roll two sixsided dice what is the sum of their values")."""
    return " ".join(re.sub(r"[^\w\s]", "", text.lower()).split())


def banned_descriptions():
    """The normalized prompts no description may equal: the demo's and the built-in suite's."""
    banned = {normalize(DEMO_PROMPT)}
    for task in make_suite.generate():
        if "description" in task:
            banned.add(normalize(task["description"]))
        for message in task.get("messages", []):
            if message["role"] == "description":
                banned.add(normalize(message["content"]))
    return banned


def pick(rng, weights):
    """A key of ``weights`` drawn with its weight."""
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def weighted(weights):
    """The distribution proportional to ``weights`` (value -> positive number), keys as str,
    in the given order."""
    total = sum(Fraction(w) for w in weights.values())
    return {str(k): Fraction(w) / total for k, w in weights.items()}


def dice(k, n, kind="sum"):
    """The exact distribution of the sum (or highest, lowest) of k fair n-sided dice."""
    if kind == "sum":
        counts = {0: 1}
        for _ in range(k):  # convolution with one more die
            nxt = {}
            for total, c in counts.items():
                for face in range(1, n + 1):
                    nxt[total + face] = nxt.get(total + face, 0) + c
            counts = nxt
    elif kind == "highest":  # P(max <= m) = (m/n)^k
        counts = {m: m ** k - (m - 1) ** k for m in range(1, n + 1)}
    else:
        counts = {m: (n - m + 1) ** k - (n - m) ** k for m in range(1, n + 1)}
    return weighted(dict(sorted(counts.items())))


def binomial(k, p):
    """Heads among k coins of heads probability p (a Fraction)."""
    return {str(h): math.comb(k, h) * p ** h * (1 - p) ** (k - h) for h in range(k + 1)}


def percents(rng, m):
    """m positive multiples of 5 (or of 10) that sum to 100, skewed at random."""
    step = 10 if m <= 5 and rng.random() < 0.5 else 5
    units = [1] * m
    skew = [rng.random() ** 2 + 0.05 for _ in range(m)]
    for _ in range(100 // step - m):
        units[rng.choices(range(m), weights=skew)[0]] += 1
    return [u * step for u in units]


def pct(p):
    """A percentage, a Fraction of 1, as text: 0.7 -> "70%"."""
    value = p * 100
    return f"{value.numerator}%" if value.denominator == 1 else f"{float(value):g}%"


def decimal(p):
    return f"{float(p):g}"


def joined(items, last="and"):
    """a, b and c."""
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"


def article(phrase):
    return ("an " if phrase.startswith(("8", "eight", "11", "18", "a", "e", "i", "o", "u"))
            else "a ") + phrase


def cap(text):
    return text[:1].upper() + text[1:]


def sample(rng, dist, count):
    values = list(dist)
    return rng.choices(values, weights=[float(dist[v]) for v in values], k=count)


# A family's builder returns a spec: the description, the target distribution, whether it is
# ordinal, and which prompt shapes fit it. Input-conditioned specs give a function
# rng -> (input, distribution) instead of one distribution.
PLAIN = {"a": 45, "b": 55}
INFERABLE = {"a": 30, "b": 40, "c": 30}


def spec(description, dist, ordinal=False, shapes=PLAIN):
    return {"description": description, "dist": dist, "ordinal": ordinal, "shapes": shapes}


def realize(rng, s):
    """(messages, distribution, ordinal) of a spec, in a prompt shape drawn for it."""
    if "conditional" in s:
        with_description = not s.get("examples_only") or rng.random() < 0.75
        messages = [{"role": "description", "content": s["description"]}] \
            if with_description else []
        pairs = pick(rng, {0: 2, 1: 3, 2: 3, 3: 2, 4: 1}) if with_description \
            else rng.randint(2, 5)
        for _ in range(pairs):
            given, dist = s["conditional"](rng)
            messages += [{"role": "input", "content": given},
                         {"role": "output", "content": sample(rng, dist, 1)[0]}]
        given, dist = s["conditional"](rng)
        messages.append({"role": "input", "content": given})
        return messages, dist, s["ordinal"]
    shape = pick(rng, s["shapes"])
    messages = [] if shape == "c" else [{"role": "description", "content": s["description"]}]
    count = {"a": 0, "b": rng.randint(1, 6), "c": rng.randint(3, 8)}[shape]
    messages += [{"role": "output", "content": o} for o in sample(rng, s["dist"], count)]
    return messages, s["dist"], s["ordinal"]


def task(task_id, messages, dist, ordinal=False):
    assert sum(dist.values()) == 1, task_id  # exact, before rounding to floats
    assert all(p > 0 for p in dist.values()), task_id  # the full support, nothing more
    assert all(isinstance(c, str) and c for c in dist), task_id
    assert len(dist) <= MAX_CANDIDATES, task_id
    out = {"id": task_id, "type": "distribution", "messages": messages,
           "candidates": list(dist), "target_probs": [float(p) for p in dist.values()]}
    if ordinal:
        out["ordinal"] = True
    return out


# --- the training families -------------------------------------------------------------------

# Weights: six-sided dice the most, and two dice more often than three, so that sums of two
# six-sided dice are 6.6% of the tasks (4.9% in the previous run, which put 6 first).
SIDES = {4: 2, 6: 8, 8: 2, 10: 1, 12: 1, 20: 1}
SUM_TEMPLATES = [
    "Roll {K} {N} dice and report the total.",
    "What is the sum of {k}d{n}?",
    "I throw {K} d{n}s. Total?",
    "You roll {k} dice with {n} faces each; give the sum.",
    "Roll {k}d{n}. Output the total.",
    "{Kc} fair {N} dice are rolled. Report the sum of the faces.",
    "Throw {K} fair dice, each numbered 1 to {n}, and add them up.",
    "Add up the results of rolling {K} {N} dice.",
    "Simulate rolling {k}d{n} and give the total.",
    "Total of {K} {N} dice:",
    "Roll {K} dice, each with {n} sides. What total do you get?",
    "Sum of {K} fair {N} dice?",
    "Roll {K} {N} dice. What total do they show?",
    "Throw {K} {N} dice. What do the faces add up to?",
    "{Kc} {N} dice are rolled. What is the total of the rolls?",
]
SINGLE_TEMPLATES = [
    "Roll {aN} die.",
    "Roll a d{n}. What does it show?",
    "Roll one fair die with {n} faces and report the number.",
    "What number comes up on {aN} die?",
    "Roll 1d{n}.",
    "A fair {N} die is rolled. Which face lands up?",
    "Give the result of one roll of a die numbered 1 to {n}.",
    "Throw a single {N} die and say the number.",
]
EXTREME_TEMPLATES = [
    "Roll {K} {N} dice and report the {hi} value.",
    "Roll {k}d{n} and keep the {hi}. What is it?",
    "Throw {K} fair dice with {n} faces each. What is the {hi} number rolled?",
    "{Kc} {N} dice are rolled; give the {hi} face showing.",
    "Roll {K} d{n}s and say the {hi} result.",
]
ADVANTAGE_TEMPLATES = [
    "Roll a d{n} with {adv} (roll twice, keep the {er}).",
    "Roll two {N} dice and tell me the {er} of the two numbers.",
]


def dice_family(rng):
    n = pick(rng, SIDES)
    kind = pick(rng, {"sum": 70, "single": 15, "highest": 10, "lowest": 5})
    k = 1 if kind == "single" else pick(rng, {2: 5, 3: 1})
    fields = {"k": k, "n": n, "N": f"{WORDS[n] if rng.random() < 0.6 else n}-sided",
              "K": rng.choice({1: ["one"], 2: ["two", "2", "a pair of"],
                               3: ["three", "3"]}[k])}
    fields.update(Kc=cap(fields["K"]), aN=article(fields["N"]))
    if kind == "sum":
        template = rng.choice(SUM_TEMPLATES)
    elif kind == "single":
        template = rng.choice(SINGLE_TEMPLATES)
    else:
        high = kind == "highest"
        fields.update(hi=rng.choice(["highest", "largest"] if high else ["lowest", "smallest"]),
                      er="higher" if high else "lower",
                      adv="advantage" if high else "disadvantage")
        template = rng.choice(EXTREME_TEMPLATES + (ADVANTAGE_TEMPLATES if k == 2 else []))
    return spec(template.format(**fields), dice(k, n, "sum" if kind == "single" else kind),
                ordinal=True)


COUNT_TEMPLATES = [
    "Flip {K} fair coins. How many land heads?",
    "Toss {K} coins and count the heads.",
    "Number of heads in {k} fair coin flips:",
    "I flip a fair coin {k} times. How many heads do I get?",
    "Count the tails when {K} fair coins are tossed.",
    "How many heads show up when you toss {K} coins?",
    "Flip {k} coins at once and report how many came up heads.",
]
ONE_COUNT_TEMPLATES = [
    "Flip a fair coin once. How many heads (0 or 1)?",
    "Toss one coin and count the heads.",
    "Number of heads in a single fair coin flip:",
]
FAIR_TEMPLATES = [
    "Flip a fair coin. Say {a} or {b}.",
    "Toss a coin and report the result as {a} or {b}.",
    "Coin toss ({a}/{b}):",
    "Call a fair coin flip: {a} or {b}?",
    "A fair coin is tossed once. Which side lands up, {a} or {b}?",
    "Simulate one flip of a fair coin. Answer {a} or {b}.",
]
BIASED_TEMPLATES = [
    "This coin lands heads {p} of the time. Flip it once: {a} or {b}?",
    "A biased coin comes up heads {p} of the time. Report one toss as {a} or {b}.",
    "A weighted coin shows tails {q} of the time. Toss it: {a} or {b}?",
    "Flip an unfair coin that lands heads with probability {P}. Answer {a} or {b}.",
    "A trick coin lands heads in {num} of every {den} flips. One flip, {a} or {b}:",
    "Heads with probability {p}, tails otherwise. One toss ({a}/{b}):",
]
BIASED_COUNT_TEMPLATES = [
    "Flip {K} coins that each land heads {p} of the time. How many heads?",
    "{Kc} biased coins, each with a {p} chance of heads, are tossed. Count the heads.",
    "Toss a coin {k} times; it lands heads with probability {P} each time. "
    "How many heads in total?",
]
HEADS_TAILS = [("heads", "tails"), ("Heads", "Tails"), ("H", "T")]
BIASES = [5, 10, 20, 25, 30, 40, 60, 70, 75, 80, 90, 95]


def coins_family(rng):
    kind = pick(rng, {"count": 40, "fair": 20, "biased": 25, "biased count": 15})
    if kind == "count":
        k = pick(rng, {1: 1, 2: 3, 3: 3, 4: 3, 5: 2, 6: 2})
        text = rng.choice(ONE_COUNT_TEMPLATES) if k == 1 else rng.choice(COUNT_TEMPLATES)
        K = WORDS[k] if rng.random() < 0.5 else str(k)
        return spec(text.format(k=k, K=K, Kc=cap(K)), binomial(k, Fraction(1, 2)),
                    ordinal=True)
    p = Fraction(rng.choice(BIASES), 100)
    fields = {"p": pct(p), "q": pct(1 - p), "P": decimal(p), "num": p.numerator,
              "den": p.denominator}
    if kind == "biased count":
        k = rng.randint(2, 4)
        fields.update(k=k, K=WORDS[k], Kc=cap(WORDS[k]))
        return spec(rng.choice(BIASED_COUNT_TEMPLATES).format(**fields), binomial(k, p),
                    ordinal=True)
    a, b = rng.choice(HEADS_TAILS)
    if kind == "fair":
        p = Fraction(1, 2)
        text = rng.choice(FAIR_TEMPLATES)
    else:
        text = rng.choice(BIASED_TEMPLATES)
    return spec(text.format(a=a, b=b, **fields), {a: p, b: 1 - p}, shapes=INFERABLE)


RANGE_TEMPLATES = [
    "Pick a random integer from {a} to {b}.",
    "Choose a whole number between {a} and {b} (inclusive), uniformly at random.",
    "Random integer in [{a}, {b}]:",
    "Give me a random number from {a} through {b}.",
    "Generate a uniformly random integer between {a} and {b}, inclusive.",
    "Think of a number from {a} to {b}, each equally likely.",
    "Draw an integer uniformly from {a} to {b}.",
    "Uniformly random whole number, {a}-{b}:",
]
KIND_TEMPLATES = [
    "Pick a random {kind} from {a} to {b}.",
    "Choose {a_kind} between {a} and {b} (inclusive), uniformly at random.",
    "Random {kind} in [{a}, {b}]:",
    "Give me a random {kind} from {a} through {b}.",
    "Name {a_kind} between {a} and {b} inclusive, all equally likely.",
]


def numbers_family(rng):
    kind = pick(rng, {"integer": 70, "even number": 6, "odd number": 6, "multiple of 5": 10,
                      "multiple of 10": 8})
    count = rng.randint(2, 50) if rng.random() < 0.6 else rng.randint(2, 12)
    if kind == "integer":
        a = rng.choice([0, 1]) if rng.random() < 0.5 else rng.randint(0, 100)
        values = range(a, a + count)
        text = rng.choice(RANGE_TEMPLATES)
    else:
        step = {"even number": 2, "odd number": 2, "multiple of 5": 5, "multiple of 10": 10}[kind]
        a = step * rng.randint(0, 100 // step) + (kind == "odd number")
        values = range(a, a + step * count, step)
        text = rng.choice(KIND_TEMPLATES)
    text = text.format(a=values[0], b=values[-1], kind=kind, a_kind=article(kind))
    return spec(text, uniform(str(v) for v in values), ordinal=True)


CLOSED_TEMPLATES = [
    "Name one of the {plural} at random.",
    "Pick a random {singular}.",
    "Name a random {singular}.",
    "Choose one {singular}, uniformly at random.",
    "Say one of the {plural}, each equally likely.",
    "Which {singular}? Pick one at random.",
    "Give a uniformly random {singular}.",
]
EXPLICIT_TEMPLATES = [
    "Choose one of: {items}.",
    "Pick one at random from this list: {items}.",
    "Randomly select one option: {items}.",
    "Options: {items}. Pick one uniformly.",
    "Choose uniformly at random among {items_and}.",
    "Pick one of these {plural} at random: {items}.",
    "Here are some {plural}: {items}. Name one of them at random.",
]


def lists_family(rng):
    if rng.random() < 0.45:
        singular, plural, items = CLOSED[rng.choice(list(CLOSED))]
        text = rng.choice(CLOSED_TEMPLATES).format(singular=singular, plural=plural)
        return spec(text, uniform(items), shapes=INFERABLE)
    pools = {name: (plural, items) for name, (_, plural, items) in CLOSED.items()} | OPEN
    plural, pool = pools[rng.choice(sorted(pools))]
    items = rng.sample(pool, rng.randint(min(3, len(pool)), min(20, len(pool))))
    text = rng.choice(EXPLICIT_TEMPLATES).format(
        items=", ".join(items), items_and=joined(items, "or"), plural=plural)
    return spec(text, uniform(items))


LIKERT_PERCENT_TEMPLATES = [
    "Rate {lo}-{hi}; {short}.",
    "Survey answers on a {lo} to {hi} scale are distributed as follows: {colon}. "
    "Give one response.",
    "Simulate one answer to a {size}-point rating question where {answer}.",
    "Respondents rated the product from {lo} to {hi}: {colon}. Sample one rating.",
    "On a scale of {lo} to {hi}, {answer}. What does a random respondent say?",
]
LABEL_TEMPLATES = [
    "Simulate one survey response. Answers: {colon}.",
    "Responses are {short}. Pick one at random.",
    "A random respondent's answer, where {say}:",
    "Answer with one of: {options}. Distribution: {colon}.",
    "Sample one reply ({options}) with these frequencies: {colon}.",
]


def likert_family(rng):
    kind = pick(rng, {"percent": 50, "words": 30, "labels": 20})
    if kind == "labels":
        labels = rng.choice(LABELS)
        ps = percents(rng, len(labels))
        text = rng.choice(LABEL_TEMPLATES).format(
            colon=", ".join(f"{o}: {p}%" for o, p in zip(labels, ps)),
            short=", ".join(f"{p}% {o}" for o, p in zip(labels, ps)),
            say=joined([f"{p}% say {o}" for o, p in zip(labels, ps)]),
            options=", ".join(labels))
        return spec(text, weighted(dict(zip(labels, ps))), ordinal=True)
    lo, hi = rng.choice(SCALES)
    scale = list(range(lo, hi + 1))
    size = len(scale)
    if kind == "percent":
        ps = percents(rng, size)
        text = rng.choice(LIKERT_PERCENT_TEMPLATES).format(
            lo=lo, hi=hi, size=size,
            short=", ".join(f"{p}% {v}" for v, p in zip(scale, ps)),
            colon=", ".join(f"{v}: {p}%" for v, p in zip(scale, ps)),
            answer=joined([f"{p}% answer {v}" for v, p in zip(scale, ps)]))
        return spec(text, weighted(dict(zip(scale, ps))), ordinal=True)
    m = rng.choice(scale)
    others = [v for v in scale if v != m]
    rule = pick(rng, {"half": 2, "most": 3, "twice": 2, "two": 2, "uniform": 1, "floor": 2})
    if rule == "half":
        text = (f"On a {lo}-{hi} scale, half of the people answer {m}; the others are spread "
                "evenly over the remaining ratings.")
        weights = {v: Fraction(1, 2) if v == m else Fraction(1, 2 * len(others)) for v in scale}
    elif rule == "most":
        share = Fraction(rng.choice([60, 70, 75, 80, 90]), 100)
        text = (f"Rate from {lo} to {hi}. Most people ({pct(share)}) answer {m}; the rest "
                "split evenly between the other ratings.")
        weights = {v: share if v == m else (1 - share) / len(others) for v in scale}
    elif rule == "twice":
        text = f"On a scale of {lo} to {hi}, {m} is twice as likely as each other rating."
        weights = {v: 2 if v == m else 1 for v in scale}
    elif rule == "two":
        a, b = sorted(rng.sample(scale, 2))
        text = f"On a {lo} to {hi} scale, everyone answers either {a} or {b}, equally often."
        weights = {a: 1, b: 1}
    elif rule == "uniform":
        text = rng.choice([f"Rate {lo} to {hi}, every rating equally likely.",
                           f"Pick a rating from {lo} to {hi}; all are equally common."])
        weights = {v: 1 for v in scale}
    else:
        c = rng.choice(scale[1:-1] or scale[1:])
        text = (f"Ratings run from {lo} to {hi}, but answers never go below {c}: "
                f"{c} to {hi} are equally likely.")
        weights = {v: 1 for v in scale if v >= c}
    return spec(text, weighted(weights), ordinal=True)


URN_TEMPLATES = [
    "A {container} holds {listed} {objects}. Draw one at random; what color is it?",
    "There are {listed} {objects} in a {container}. You pull one out without looking. "
    "Which color?",
    "{Container} contents: {listed} {objects}. One is picked at random. Report its color.",
    "I reach into a {container} containing {listed} {objects} and take one. "
    "What color did I get?",
    "From a {container} with {listed} {objects}, one {object} is drawn uniformly at random. "
    "Give its color.",
    "{Listed} {objects} are mixed in a {container}. Pick one blindly. Color?",
]
OBJECTS = [("marbles", "marble"), ("balls", "ball"), ("beads", "bead"), ("socks", "sock"),
           ("candies", "candy"), ("tokens", "token"), ("pens", "pen")]
CONTAINERS = ["bag", "urn", "jar", "box", "drawer", "bowl"]


def urns_family(rng):
    words = rng.random() < 0.3  # counts as words: "three red"

    def number(c):
        return WORDS[c] if words else str(c)

    kind = pick(rng, {"colors": 65, "tickets": 15, "raffle": 10, "cards": 10})
    size = pick(rng, {2: 3, 3: 4, 4: 2, 5: 1})
    counts = [rng.randint(1, 9) for _ in range(size)]
    if kind == "colors":
        values = rng.sample(COLORS, size)
        objects, obj = rng.choice(OBJECTS)
        container = rng.choice(CONTAINERS)
        listed = joined([f"{number(c)} {v}" for c, v in zip(counts, values)])
        text = rng.choice(URN_TEMPLATES).format(
            container=container, Container=cap(container), objects=objects, object=obj,
            listed=listed, Listed=cap(listed))
    elif kind in ("tickets", "raffle"):
        values = rng.sample(OPEN["names"][1], size)
        first = f"{number(counts[0])} ticket{'s' * (counts[0] > 1)}"
        rest = [f"{number(c)} {'reading' if kind == 'tickets' else 'bought by'} {v}"
                for c, v in zip(counts[1:], values[1:])]
        if kind == "tickets":
            listed = joined([f"{first} reading {values[0]}"] + rest)
            text = rng.choice([
                "A hat holds {listed}. One ticket is drawn at random. Whose name is on it?",
                "In a box there are {listed}. Draw one ticket; what name does it show?"]
            ).format(listed=listed)
        else:
            listed = joined([f"{first} bought by {values[0]}"] + rest)
            text = f"A raffle has {listed}. One ticket wins, drawn at random. Who wins?"
    else:
        pool = OPEN[rng.choice(["fruits", "farm animals", "shapes", "pets"])][1]
        values = rng.sample(pool, size)
        first = f"{number(counts[0])} card{'s' * (counts[0] > 1)} showing {values[0]}"
        listed = joined([first] + [f"{number(c)} showing {v}"
                                   for c, v in zip(counts[1:], values[1:])])
        text = rng.choice([
            "A deck has {listed}. Shuffle it and draw one card. What is on it?",
            "Cards on the table, face down: {listed}. Turn one over at random. What does it "
            "show?"]).format(listed=listed)
    return spec(text, weighted(dict(zip(values, counts))))


NEAR_TEMPLATES = [
    "Given a number, output a random integer within {d} of it.",
    "For an input number n, reply with a random whole number from n-{d} to n+{d}, "
    "inclusive.",
    "Jitter the input integer by a random amount between -{d} and +{d}, all equally likely.",
    "Add uniform random integer noise in [-{d}, {d}] to the given number.",
    "Output a random integer at most {d} away from the input, uniformly.",
]
UPTO_TEMPLATES = [
    "Given n, pick a random integer from 1 to n.",
    "The input is a number n. Output a uniformly random integer between 1 and n inclusive.",
    "Choose a random whole number from 1 up to the input.",
    "Random integer in [1, n], where n is the input:",
    "Pick any number from 1 to the given number, each equally likely.",
]
LETTER_TEMPLATES = [
    "Given a word, output one of its letters at random.",
    "Pick a random letter from the given word (lower case).",
    "Choose one position of the input word uniformly at random and output its letter.",
    "Output a letter drawn at random from the word's letters.",
    "Random letter from this word:",
]
ITEM_TEMPLATES = [
    "Given a list of items, pick one at random.",
    "Choose one item from the input list, uniformly at random.",
    "The input is a comma-separated list. Output one of its entries, each equally likely.",
    "Pick a random element of the given list.",
    "Select one of the listed options at random.",
]
COINS_GIVEN_TEMPLATES = [
    "Given a number of fair coins, say how many land heads when they are flipped.",
    "The input is how many fair coins are tossed. Output the number of heads.",
    "Flip the given number of fair coins and count the heads.",
    "Input: a count of coins. Toss them all and report how many show heads.",
    "How many heads? The input says how many fair coins are flipped.",
]
SIDES_GIVEN_TEMPLATES = [
    "Given the number of sides, roll a fair die with that many sides.",
    "The input is the number of faces of a fair die. Roll it and report the result.",
    "Roll a die with the given number of sides.",
    "Input: how many sides a die has. Output: one roll of it.",
    "Simulate a roll of a fair n-sided die, where n is the input.",
]


def near_number(d):
    def conditional(rng):
        x = rng.randint(d, 99)
        return str(x), uniform(str(v) for v in range(x - d, x + d + 1))
    return conditional


def upto_n(rng):
    n = rng.randint(2, 40)
    return str(n), uniform(str(v) for v in range(1, n + 1))


def letter_of_word(rng):
    word = rng.choice(LETTER_WORDS)
    return word, from_outcomes(list(word))


def item_of_list(rng):
    pool = OPEN[rng.choice(sorted(OPEN))][1]
    items = rng.sample(pool, rng.randint(2, min(6, len(pool))))
    return ", ".join(items), uniform(items)


def heads_given_coins(rng, coins=range(1, 7)):
    k = rng.choice(list(coins))
    return str(k), binomial(k, Fraction(1, 2))


def roll_given_sides(rng, sides=tuple(SIDES)):
    n = rng.choice(sides)
    return str(n), uniform(str(v) for v in range(1, n + 1))


def inputs_family(rng):
    kind = pick(rng, {"near": 2, "upto": 1, "letter": 2, "item": 2, "coins": 1, "sides": 1})
    ordinal = kind not in ("letter", "item")
    if kind == "near":
        d = rng.randint(1, 5)
        text, conditional = rng.choice(NEAR_TEMPLATES).format(d=d), near_number(d)
    else:
        templates, conditional = {
            "upto": (UPTO_TEMPLATES, upto_n), "letter": (LETTER_TEMPLATES, letter_of_word),
            "item": (ITEM_TEMPLATES, item_of_list),
            "coins": (COINS_GIVEN_TEMPLATES, heads_given_coins),
            "sides": (SIDES_GIVEN_TEMPLATES, roll_given_sides)}[kind]
        text = rng.choice(templates)
    return {"description": text, "conditional": conditional, "ordinal": ordinal,
            "examples_only": kind == "item"}


TIME_TEMPLATES = [
    "Answer {time}.",
    "Say {prob}.",
    "Respond with one word: {paren}.",
    "{colon}. Sample one.",
    "Pick one option at random with these weights: {colon}.",
]
TWO_TEMPLATES = [
    "Reply {a} in {num} out of every {den} answers, otherwise {b}.",
    "Output {a} with probability {P}; otherwise output {b}.",
    "Answer {a} {p} of the time and {b} {q}.",
]


def percent_family(rng):
    options = list(rng.choice(TWO_OPTIONS) if rng.random() < 0.6 else rng.choice(MANY_OPTIONS))
    rng.shuffle(options)
    ps = [Fraction(p, 100) for p in percents(rng, len(options))]
    dist = dict(zip(options, ps))
    if len(options) == 2 and rng.random() < 0.4:
        (a, p), (b, q) = dist.items()
        text = rng.choice(TWO_TEMPLATES).format(a=a, b=b, p=pct(p), q=pct(q), P=decimal(p),
                                                num=p.numerator, den=p.denominator)
    else:
        text = rng.choice(TIME_TEMPLATES).format(
            time=joined([f"{o} {pct(p)} of the time" for o, p in dist.items()]),
            prob=joined([f"{o} with probability {decimal(p)}" for o, p in dist.items()]),
            paren=", ".join(f"{o} ({pct(p)})" for o, p in dist.items()),
            colon=", ".join(f"{o}: {pct(p)}" for o, p in dist.items()))
    return spec(text, dist, shapes=INFERABLE if len(options) == 2 else PLAIN)


FAMILIES = {"dice": dice_family, "coins": coins_family, "numbers": numbers_family,
            "lists": lists_family, "likert": likert_family, "urns": urns_family,
            "inputs": inputs_family, "percent": percent_family}


# --- the held-out set ------------------------------------------------------------------------

def held_out(rng):
    """40 tasks of what training never shows, over all prompt shapes (a, b, c, d)."""
    tasks, counters = [], {}

    def add(family, messages, dist, ordinal=False):
        counters[family] = counters.get(family, 0) + 1
        tasks.append(task(f"held-{family}-{counters[family]}", messages, dist, ordinal))

    def described(text, dist, examples=0):
        return ([{"role": "description", "content": text}]
                + [{"role": "output", "content": o} for o in sample(rng, dist, examples)])

    def examples_only(dist, count):
        return [{"role": "output", "content": o} for o in sample(rng, dist, count)]

    def with_inputs(text, conditional, pairs, final):
        messages = [{"role": "description", "content": text}]
        for _ in range(pairs):
            given, dist = conditional(rng)
            messages += [{"role": "input", "content": given},
                         {"role": "output", "content": sample(rng, dist, 1)[0]}]
        given, dist = final(rng)
        return messages + [{"role": "input", "content": given}], dist

    days = uniform(WEEKDAYS)
    add("weekday", described("Pick a day of the week at random.", days), days)
    add("weekday", described("Name a random weekday, Monday through Sunday.", days, 3), days)
    add("weekday", examples_only(days, 5), days)
    add("weekday", described("Choose one of the seven days of the week, each equally likely.",
                             days), days)

    def other_day(r):
        day = r.choice(WEEKDAYS)
        return day, uniform(d for d in WEEKDAYS if d != day)
    add("weekday", *with_inputs("Given a day of the week, output a different day at random.",
                                other_day, 2, other_day))

    months = uniform(MONTHS)
    add("month", described("Name a month of the year, chosen uniformly at random.", months),
        months)
    add("month", described("Pick a random month.", months, 2), months)
    add("month", examples_only(months, 6), months)
    add("month", described("Choose one of the twelve months at random.", months), months)

    def letter_of_month(r):
        month = r.choice(MONTHS)
        return month, from_outcomes(list(month.lower()))
    add("month", *with_inputs(LETTER_TEMPLATES[0], letter_of_month, 2, letter_of_month))

    suits = uniform(SUITS)
    add("suit", described("Draw a card from a well-shuffled standard deck. Name its suit.",
                          suits), suits)
    add("suit", described("Pick a random card suit.", suits, 3), suits)
    add("suit", examples_only(suits, 5), suits)
    add("suit", described("A standard deck is shuffled and the top card is turned over. "
                          "What suit is it: clubs, diamonds, hearts or spades?", suits), suits)

    ranks = uniform(RANKS)
    add("rank", described("Draw one card from a standard 52-card deck and give its rank "
                          "(A, 2-10, J, Q, K).", ranks), ranks)
    add("rank", described("The rank of a random playing card:", ranks, 3), ranks)
    face = from_outcomes(["yes" if r in ("J", "Q", "K") else "no" for r in RANKS])
    add("rank", described("Draw a card from a shuffled deck. Is it a face card (jack, queen "
                          "or king)? Answer yes or no.", face), face)
    words = uniform(RANK_WORDS)
    add("rank", described("Name the rank of a random playing card in words (ace, two, ..., "
                          "king).", words), words)

    letters = uniform(LETTERS)
    add("letter", described("Pick a random letter of the English alphabet (uppercase).",
                            letters), letters)
    lower = uniform(c.lower() for c in LETTERS)
    add("letter", described("A random lowercase letter:", lower, 3), lower)
    add("letter", examples_only(letters, 8), letters)
    a_to_j = uniform(LETTERS[:10])
    add("letter", described("Choose a random letter from A to J.", a_to_j), a_to_j)
    vowels = uniform("aeiou")
    add("letter", described("Pick a random vowel (a, e, i, o, u).", vowels), vowels)

    states = uniform(US_STATES)
    add("state", described("Name one of the 50 US states at random.", states), states)
    add("state", described("Pick a random state of the USA.", states, 2), states)
    listed = ["Texas", "Ohio", "Utah", "Maine", "Oregon"]
    add("state", described(f"Choose one of these states at random: {', '.join(listed)}.",
                           uniform(listed)), uniform(listed))
    add("state", examples_only(states, 6), states)

    add("d7", described("Roll a seven-sided die.", dice(1, 7)), dice(1, 7), True)
    add("d7", described("Roll two seven-sided dice and report the total.", dice(2, 7)),
        dice(2, 7), True)
    add("d7", described("What is the sum of 3d7?", dice(3, 7), 2), dice(3, 7), True)
    add("d7", described("You roll 2 dice with 7 faces each; give the sum.", dice(2, 7)),
        dice(2, 7), True)
    add("d7", described("Roll 2d7 and keep the highest. What is it?", dice(2, 7, "highest")),
        dice(2, 7, "highest"), True)
    add("d7", described("Throw a single 7-sided die and say the number.", dice(1, 7), 3),
        dice(1, 7), True)
    messages, dist = with_inputs(SIDES_GIVEN_TEMPLATES[0], roll_given_sides, 2,
                                 lambda r: roll_given_sides(r, (7,)))
    add("d7", messages, dist, True)

    add("coins", described("Flip seven fair coins. How many land heads?",
                           binomial(7, Fraction(1, 2))), binomial(7, Fraction(1, 2)), True)
    add("coins", described("Toss 8 coins and count the heads.", binomial(8, Fraction(1, 2))),
        binomial(8, Fraction(1, 2)), True)
    add("coins", described("Number of heads in 8 fair coin flips:",
                           binomial(8, Fraction(1, 2)), 2), binomial(8, Fraction(1, 2)), True)
    add("coins", described("I flip a fair coin 7 times. How many heads do I get?",
                           binomial(7, Fraction(1, 2))), binomial(7, Fraction(1, 2)), True)
    messages, dist = with_inputs(COINS_GIVEN_TEMPLATES[0], heads_given_coins, 2,
                                 lambda r: heads_given_coins(r, (8,)))
    add("coins", messages, dist, True)
    add("coins", described("Flip 7 coins that each land heads 30% of the time. How many "
                           "heads?", binomial(7, Fraction(3, 10))),
        binomial(7, Fraction(3, 10)), True)
    return tasks


# --- both sets -------------------------------------------------------------------------------

def allocate(n_train):
    """Each family's count: its share of n_train, the remainder to the largest fractions."""
    total = sum(SHARES.values())
    counts = {f: n_train * s // total for f, s in SHARES.items()}
    by_fraction = sorted(SHARES, key=lambda f: (-(n_train * SHARES[f] % total),
                                                list(SHARES).index(f)))
    for f in by_fraction[:n_train - sum(counts.values())]:
        counts[f] += 1
    return counts


def clean(messages, banned):
    """No copy of the demo prompt anywhere, no banned description."""
    return not any(DEMO_PROMPT in m["content"]
                   or (m["role"] == "description" and normalize(m["content"]) in banned)
                   for m in messages)


def make_tasks(seed: int = 0, n_train: int = 3000) -> tuple[list[dict], list[dict]]:
    """(train, held_out) task dicts."""
    banned = banned_descriptions()
    held = held_out(random.Random(f"demo-tasks/held-out/{seed}"))
    assert all(clean(t["messages"], banned) for t in held)
    taken = {json.dumps(t["messages"]) for t in held}  # held-out prompts are never trained on
    rng = random.Random(f"demo-tasks/train/{seed}")
    train = []
    for family, count in allocate(n_train).items():
        seen = set()
        for i in range(1, count + 1):
            for attempt in range(200):
                messages, dist, ordinal = realize(rng, FAMILIES[family](rng))
                key = json.dumps(messages)
                # A repeated prompt is taken only when the family has run out of new ones.
                if clean(messages, banned) and key not in taken \
                        and (key not in seen or attempt >= 100):
                    break
            else:
                raise RuntimeError(f"no clean {family} prompt in 200 tries")
            seen.add(key)
            train.append(task(f"train-{family}-{i}", messages, dist, ordinal))
    rng.shuffle(train)
    return train, held


def render(tasks):
    return "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks)


def family_of(task_id):
    """"train-dice-17" -> "dice"."""
    return task_id.split("-")[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=3000)
    args = parser.parse_args(argv)
    train, held = make_tasks(args.seed, args.n_train)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, tasks in (("train.jsonl", train), ("held_out.jsonl", held)):
        # newline="\n": the same bytes on Windows.
        with open(args.out_dir / name, "w", encoding="utf-8", newline="\n") as f:
            f.write(render(tasks))
    for label, tasks in (("train", train), ("held-out", held)):
        counts = {}
        for t in tasks:  # held-out in file order; train (shuffled) in the order of SHARES
            counts[family_of(t["id"])] = counts.get(family_of(t["id"]), 0) + 1
        order = list(SHARES) if label == "train" else list(counts)
        for family in order:
            count = counts[family]
            print(f"{label:8s} {family:8s} {count:5d} ({count / len(tasks):.1%})")
    print(f"wrote {len(train)} train and {len(held)} held-out tasks to {args.out_dir}")


if __name__ == "__main__":
    main()
