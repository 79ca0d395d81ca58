"""The built-in eval suite (spectrum_local/suites/basic.jsonl): it is what scripts/make_suite.py
writes, every line has the task format, and a few targets agree with an independent computation
(numpy, scipy, the calendar module, trial division) rather than the script's own."""

import calendar
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "spectrum_local" / "suites" / "basic.jsonl"
SCRIPT = ROOT / "scripts" / "make_suite.py"

ROLES = {"description", "input", "output"}
FIELDS = {
    "distribution": ({"id", "type", "messages", "candidates", "target_probs"}, {"ordinal"}),
    "generation": ({"id", "type", "messages", "n", "max_tokens"}, set()),
    "steerability": ({"id", "type", "examples", "k", "orderings", "optimal_loss"},
                     {"description"}),
}
VALIDATORS = {"valid", "regex", "int_range"}


def load():
    return [json.loads(line) for line in SUITE.read_text(encoding="utf-8").splitlines()]


TASKS = load()
BY_ID = {t["id"]: t for t in TASKS}


def description_of(task):
    (text,) = [m["content"] for m in task["messages"] if m["role"] == "description"]
    return text


def test_file_is_what_the_script_writes(tmp_path):
    out = tmp_path / "basic.jsonl"
    subprocess.run([sys.executable, str(SCRIPT), str(out)], check=True, capture_output=True)
    assert out.read_bytes() == SUITE.read_bytes(), \
        "basic.jsonl differs from the script's output: edit scripts/make_suite.py and rerun it"


def test_required_tasks_are_there():
    assert {"one-die", "two-dice-sum", "coin-flip", "integer-1-10", "weekday", "month",
            "us-state", "urn-color", "card-suit", "likert-1-7", "us-state-gen",
            "prime-under-100-gen", "weekday-gen", "biased-coin"} <= set(BY_ID)
    types = [t["type"] for t in TASKS]
    assert types.count("distribution") <= 16
    assert description_of(BY_ID["two-dice-sum"]) == \
        "Roll two six-sided dice. What is the sum of their values?"  # the product's demo
    validators = {v for t in TASKS if t["type"] == "generation" for v in VALIDATORS & set(t)}
    assert validators == VALIDATORS  # each validator is exercised


def test_ids_are_unique_slugs():
    ids = [t["id"] for t in TASKS]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", i) for i in ids)


def check_messages(messages):
    assert isinstance(messages, list) and messages
    for m in messages:
        assert set(m) == {"role", "content"}
        assert m["role"] in ROLES and isinstance(m["content"], str) and m["content"]


@pytest.mark.parametrize("task", TASKS, ids=[t["id"] for t in TASKS])
def test_task_format(task):
    required, optional = FIELDS[task["type"]]
    keys = set(task)
    if task["type"] == "generation":
        assert len(keys & VALIDATORS) == 1, "exactly one validator"
        keys -= VALIDATORS
    assert required <= keys <= required | optional

    if task["type"] == "distribution":
        check_messages(task["messages"])
        cands, probs = task["candidates"], task["target_probs"]
        assert all(isinstance(c, str) and c for c in cands)
        assert len(cands) == len(set(cands)) == len(probs)
        assert all(isinstance(p, float) and p >= 0 for p in probs)
        assert abs(math.fsum(probs) - 1) <= 1e-9
        assert task.get("ordinal", True) is True  # only ever written as true
    elif task["type"] == "generation":
        check_messages(task["messages"])
        assert type(task["n"]) is int and task["n"] > 0
        assert type(task["max_tokens"]) is int and 0 < task["max_tokens"] <= 16
        if "valid" in task:
            valid = task["valid"]
            assert valid and len(valid) == len(set(valid))
            assert all(isinstance(v, str) and v == v.strip() and v for v in valid)
        elif "regex" in task:
            re.compile(task["regex"])
        else:
            lo, hi = task["int_range"]
            assert type(lo) is int and type(hi) is int and lo <= hi
    else:
        assert isinstance(task.get("description", ""), str)
        examples, k = task["examples"], task["k"]
        for e in examples:
            assert set(e) in ({"output"}, {"input", "output"})
            assert all(isinstance(v, str) and v for v in e.values())
        assert k == sorted(set(k)) and all(type(n) is int and n >= 0 for n in k)
        assert len(examples) >= max(k) + 1  # example k+1 is scored
        assert type(task["orderings"]) is int and task["orderings"] > 0
        assert isinstance(task["optimal_loss"], float) and task["optimal_loss"] >= 0


def probs(task_id):
    t = BY_ID[task_id]
    return t["candidates"], np.array(t["target_probs"])


def test_dice_sums_by_convolution():
    cands, p = probs("two-dice-sum")
    assert cands == [str(n) for n in range(2, 13)]
    np.testing.assert_allclose(p, np.convolve(np.ones(6) / 6, np.ones(6) / 6), rtol=0, atol=1e-15)
    cands, p = probs("two-d4-sum")
    assert cands == [str(n) for n in range(2, 9)]
    np.testing.assert_allclose(p, np.convolve(np.ones(4) / 4, np.ones(4) / 4), rtol=0, atol=1e-15)


def test_two_coins_binomial():
    cands, p = probs("two-coins-heads")
    np.testing.assert_allclose(p, stats.binom.pmf([int(c) for c in cands], 2, 0.5), atol=1e-15)


def test_urn_from_its_description():
    task = BY_ID["urn-color"]
    counts = {color: int(n) for n, color in re.findall(r"(\d+) (\w+)", description_of(task))}
    assert list(counts) == task["candidates"]
    total = sum(counts.values())
    assert task["target_probs"] == pytest.approx([counts[c] / total for c in counts], abs=1e-15)


@pytest.mark.parametrize("task_id, expected", [
    ("one-die", [str(n) for n in range(1, 7)]),
    ("integer-1-10", [str(n) for n in range(1, 11)]),
    ("likert-1-7", [str(n) for n in range(1, 8)]),
    ("coin-flip", ["heads", "tails"]),
    ("card-suit", ["hearts", "diamonds", "clubs", "spades"]),
    ("weekday", list(calendar.day_name)),
    ("month", list(calendar.month_name)[1:]),
    ("letter-with-examples", [chr(c) for c in range(65, 91)]),
])
def test_uniform_tasks(task_id, expected):
    cands, p = probs(task_id)
    assert cands == expected
    np.testing.assert_allclose(p, np.full(len(expected), 1 / len(expected)), rtol=0, atol=1e-15)


def test_candidates_are_spelled_as_the_description_asks():
    for task_id in ("coin-flip", "card-suit"):
        text = description_of(BY_ID[task_id])
        assert all(c in text for c in BY_ID[task_id]["candidates"])  # same case as the prompt
    # The letter task's example outputs are valid answers themselves.
    task = BY_ID["letter-with-examples"]
    shown = [m["content"] for m in task["messages"] if m["role"] == "output"]
    assert shown and set(shown) <= set(task["candidates"])


def test_us_states():
    states = BY_ID["us-state-gen"]["valid"]
    assert len(states) == len(set(states)) == 50
    assert set(states) == set(BY_ID["us-state"]["candidates"])
    assert {"California", "New Hampshire", "North Dakota", "West Virginia", "Hawaii"} <= set(states)
    assert not {"District of Columbia", "Puerto Rico"} & set(states)


def test_primes_by_trial_division():
    primes = [str(n) for n in range(2, 100) if all(n % d for d in range(2, n))]
    assert len(primes) == 25
    assert BY_ID["prime-under-100-gen"]["valid"] == primes


def test_generation_validators_accept_and_reject():
    assert BY_ID["weekday-gen"]["valid"] == list(calendar.day_name)
    assert BY_ID["number-1-100-gen"]["int_range"] == [1, 100]
    pin = re.compile(BY_ID["pin-code-gen"]["regex"])
    assert pin.fullmatch("0427") and pin.fullmatch("9999")
    assert not any(pin.fullmatch(s) for s in ["123", "12345", "12a4", "١٢٣٤"])  # Arabic digits


def test_biased_coin():
    task = BY_ID["biased-coin"]
    assert task["description"] == "Flip a coin."  # the bias is left to the examples
    outputs = [e["output"] for e in task["examples"]]
    assert set(outputs) == {"heads", "tails"}
    assert outputs.count("heads") / len(outputs) == 0.8  # the examples' frequency is the bias
    assert task["k"] == [0, 1, 2, 4, 8, 16] and len(outputs) >= 17
    assert task["optimal_loss"] == pytest.approx(stats.entropy([0.8, 0.2]), rel=1e-12)


def test_loaded_die():
    task = BY_ID["loaded-die"]
    outputs = [e["output"] for e in task["examples"]]
    freqs = [outputs.count(str(face)) / len(outputs) for face in range(1, 7)]
    assert freqs == [0.1] * 5 + [0.5]
    assert task["optimal_loss"] == pytest.approx(stats.entropy(freqs), rel=1e-12)


def test_add_one_is_deterministic():
    task = BY_ID["add-one"]
    assert all(int(e["output"]) == int(e["input"]) + 1 for e in task["examples"])
    assert len({e["input"] for e in task["examples"]}) == len(task["examples"])
    assert task["optimal_loss"] == 0.0
