"""scripts/demo_tasks.py, the training and held-out tasks of the demo adapter: reproducible,
in the task format, exact targets (dice re-derived here by brute force, stated percentages
read back from the prompts), the demo prompt and the withheld entities kept out of training."""

import collections
import importlib.util
import itertools
import json
import math
import random
import re
import string
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from spectrum_local.eval import load_tasks

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "demo_tasks.py"
DEMO = "Roll two six-sided dice. What is the sum of their values?"
FAMILIES = {"dice", "coins", "numbers", "lists", "likert", "urns", "inputs", "percent"}
HELD_FAMILIES = {"weekday", "month", "suit", "rank", "letter", "state", "d7", "coins"}
WITHHELD = {name.lower() for name in
            ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday",
             "January", "February", "March", "April", "May", "June", "July", "August",
             "September", "October", "November", "December",
             "hearts", "diamonds", "clubs", "spades",
             "Alabama", "Alaska", "Arizona", "Arkansas", "California", "Colorado",
             "Connecticut", "Delaware", "Florida", "Georgia", "Hawaii", "Idaho", "Illinois",
             "Indiana", "Iowa", "Kansas", "Kentucky", "Louisiana", "Maine", "Maryland",
             "Massachusetts", "Michigan", "Minnesota", "Mississippi", "Missouri", "Montana",
             "Nebraska", "Nevada", "New Hampshire", "New Jersey", "New Mexico", "New York",
             "North Carolina", "North Dakota", "Ohio", "Oklahoma", "Oregon", "Pennsylvania",
             "Rhode Island", "South Carolina", "South Dakota", "Tennessee", "Texas", "Utah",
             "Vermont", "Virginia", "Washington", "West Virginia", "Wisconsin", "Wyoming"]}


def _load_script():
    spec = importlib.util.spec_from_file_location("demo_tasks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo_tasks = _load_script()


@pytest.fixture(scope="module")
def sets():
    return demo_tasks.make_tasks(seed=0, n_train=3000)


def family(task):
    return task["id"].split("-")[1]


def descriptions(task):
    return [m["content"] for m in task["messages"] if m["role"] == "description"]


def norm(text):
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def render(tasks):
    return "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks)


def test_reproducible_through_the_cli(sets, tmp_path):
    train, held = sets
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True,
                         text=True, check=True)
    # A fresh process (another hash seed) writes the same bytes.
    assert (tmp_path / "train.jsonl").read_text(encoding="utf-8") == render(train)
    assert (tmp_path / "held_out.jsonl").read_text(encoding="utf-8") == render(held)
    for name in FAMILIES:
        assert re.search(rf"^train\s+{name}\s+\d+", run.stdout, re.M), run.stdout
    other_train, other_held = demo_tasks.make_tasks(seed=1, n_train=3000)
    assert render(other_train) != render(train)
    assert render(other_held) != render(held)
    assert len(other_train) == 3000


def test_every_task_loads(sets, tmp_path):
    for name, tasks in zip(("train", "held_out"), sets):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(render(tasks), encoding="utf-8")
        loaded = load_tasks(str(path))
        assert [t.id for t in loaded] == [t["id"] for t in tasks]


def test_targets_are_full_support_distributions(sets):
    for task in itertools.chain(*sets):
        assert set(task) <= {"id", "type", "messages", "candidates", "target_probs", "ordinal"}
        assert task["type"] == "distribution" and task.get("ordinal", True) is True
        candidates, target = task["candidates"], task["target_probs"]
        assert len(candidates) == len(set(candidates)) == len(target), task["id"]
        assert 2 <= len(candidates) <= 60, task["id"]
        assert all(isinstance(c, str) and c for c in candidates), task["id"]
        assert all(p > 0 for p in target), task["id"]
        assert abs(math.fsum(target) - 1) < 1e-9, task["id"]


def test_prompts_are_short_and_shaped(sets):
    train, held = sets
    shapes = collections.defaultdict(collections.Counter)
    for task in train + held:
        roles = [m["role"] for m in task["messages"]]
        assert sum(len(m["content"]) for m in task["messages"]) <= 400, task["id"]
        assert "description" in roles or "output" in roles, task["id"]
        if "input" in roles:
            assert roles[-1] == "input", task["id"]
            shape = "d"
        elif roles[0] != "description":
            assert 3 <= len(roles) <= 8, task["id"]
            shape = "c"
        else:
            assert len(roles) <= 7, task["id"]
            shape = "b" if len(roles) > 1 else "a"
        shapes["held" if task["id"].startswith("held-") else family(task)][shape] += 1
    assert set(shapes["held"]) == {"a", "b", "c", "d"}
    assert {f for f in FAMILIES if shapes[f]["c"]} == {"coins", "lists", "percent"}
    assert {f for f in FAMILIES if shapes[f]["d"]} == {"inputs"}
    for name in FAMILIES - {"inputs"}:
        assert shapes[name]["a"] and shapes[name]["b"], name


def test_the_demo_prompt_is_nowhere(sets):
    for tasks in sets:
        assert DEMO not in render(tasks)
        assert norm(DEMO) not in {norm(d) for t in tasks for d in descriptions(t)}
    # Training never asks for "the sum of their values", in any wording.
    assert "sum of their values" not in render(sets[0]).lower()


# Seven-sided dice, 7 or 8 coins: what the held-out d7 and coins prompts ask for.
SEVEN_DICE_OR_MANY_COINS = re.compile(
    r"\b(seven|7)[- ]sided|(?<![a-z])d7s?\b|\b(seven|7) (faces|sides)\b|numbered 1 to 7\b"
    r"|\b(seven|7|eight|8) (fair )?coin|\bcoin (seven|7|eight|8) times")


def test_training_withholds_the_held_out_entities(sets):
    train, held = sets
    for task in held:  # the pattern is not vacuous
        if family(task) in ("d7", "coins") and "input" not in str(task["messages"]):
            assert SEVEN_DICE_OR_MANY_COINS.search(descriptions(task)[0].lower()), task["id"]
    for task in train:
        assert not WITHHELD & {c.lower() for c in task["candidates"]}, task["id"]
        assert set(task["candidates"]) != set(string.ascii_uppercase), task["id"]
        text = " ".join(descriptions(task)).lower()
        assert not SEVEN_DICE_OR_MANY_COINS.search(text), task["id"]
        if "coin" in text and all(c.isdigit() for c in task["candidates"]):
            assert max(int(c) for c in task["candidates"]) <= 6, task["id"]
        if re.search(r"\bdie\b|sides", text):  # a die's sides as the input
            assert "7" not in [m["content"] for m in task["messages"] if m["role"] == "input"]


WORD_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "six": 6, "seven": 7, "eight": 8,
                "ten": 10, "twelve": 12, "twenty": 20}


def parse_dice(text):
    """(k, n, kind) read from a dice prompt, or None."""
    t = text.lower()
    kind = ("lowest" if re.search(r"lowest|smallest|lower|disadvantage", t) else
            "highest" if re.search(r"highest|largest|higher|advantage", t) else "sum")
    m = re.search(r"\b(\d)d(\d+)\b", t)
    if m:
        return int(m[1]), int(m[2]), kind
    m = re.search(r"\b(\w+)-sided\b|\bd(\d+)s?\b|\b(\w+) (?:faces|sides)\b|numbered 1 to (\d+)",
                  t)
    if not m:
        return None
    word = next(g for g in m.groups() if g)
    n = int(word) if word.isdigit() else WORD_NUMBERS[word]
    if "twice" in t or re.search(r"\b(pair|two|2)\b", t):
        return 2, n, kind
    return (3 if re.search(r"\b(three|3)\b", t) else 1), n, kind


def brute_force(k, n, kind):
    combine = {"sum": sum, "highest": max, "lowest": min}[kind]
    counts = collections.Counter(combine(roll)
                                 for roll in itertools.product(range(1, n + 1), repeat=k))
    return {str(v): Fraction(c, n ** k) for v, c in sorted(counts.items())}


def test_dice_targets_match_brute_force(sets):
    train, held = sets
    dice = [t for t in train if family(t) == "dice"] + \
        [t for t in held if family(t) == "d7" and descriptions(t) and
         not any(m["role"] == "input" for m in t["messages"])]
    parsed = {t["id"]: parse_dice(descriptions(t)[0]) for t in dice}
    assert all(parsed.values()), [t["id"] for t in dice if not parsed[t["id"]]]
    sides = collections.Counter(n for _, n, _ in parsed.values())
    assert set(sides) == {4, 6, 7, 8, 10, 12, 20}
    assert all(n != 7 for i, (_, n, _) in parsed.items() if i.startswith("train-"))
    assert {kind for _, _, kind in parsed.values()} == {"sum", "highest", "lowest"}
    assert sum(p[:2] == (2, 6) and p[2] == "sum" for p in parsed.values()) >= 30
    sample = random.Random(0).sample(dice, 60) + [t for t in dice if family(t) == "d7"]
    for task in sample:
        truth = brute_force(*parsed[task["id"]])
        assert task["candidates"] == list(truth), task["id"]
        assert task["target_probs"] == pytest.approx([float(p) for p in truth.values()],
                                                     abs=1e-12), task["id"]
        assert task["ordinal"] is True


def test_stated_percentages_are_the_targets(sets):
    """Prompts that list "option: NN%" for every candidate get exactly those targets."""
    checked = 0
    for task in itertools.chain(*sets):
        for text in descriptions(task):
            stated = dict(re.findall(r"(?:^|, |: )([\w ]+): (\d+)%", text))
            if stated and list(stated) == task["candidates"]:
                assert task["target_probs"] == pytest.approx(
                    [int(p) / 100 for p in stated.values()], abs=1e-12), task["id"]
                checked += 1
    assert checked >= 50


def test_held_out_is_disjoint_from_train(sets):
    train, held = sets
    assert 35 <= len(held) <= 45
    assert {family(t) for t in held} == HELD_FAMILIES
    assert all(t["id"].startswith("held-") for t in held)
    assert all(re.fullmatch(r"train-[a-z]+-\d+", t["id"]) for t in train)
    assert not {t["id"] for t in held} & {t["id"] for t in train}
    train_prompts = {json.dumps(t["messages"]) for t in train}
    assert not {json.dumps(t["messages"]) for t in held} & train_prompts
    train_descriptions = {norm(d) for t in train for d in descriptions(t)}
    for task in held:
        if not any(m["role"] == "input" for m in task["messages"]):
            # Input tasks reuse a training description; the rest are new prompts.
            assert not {norm(d) for d in descriptions(task)} & train_descriptions, task["id"]


def test_family_shares(sets):
    train, _ = sets
    assert len(train) == 3000
    counts = collections.Counter(family(t) for t in train)
    assert set(counts) == FAMILIES
    total = sum(demo_tasks.SHARES.values())
    for name, count in counts.items():
        assert count >= 0.05 * len(train), name
        assert abs(count / len(train) - demo_tasks.SHARES[name] / total) < 0.01, name
    # Few repeated prompts.
    assert len({json.dumps(t["messages"]) for t in train}) >= 0.99 * len(train)
