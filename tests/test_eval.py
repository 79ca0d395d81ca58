"""spectrum-local eval: every metric against an independent computation (scipy, brute force),
task files and their errors, and the three task types on real models, cross-checked against a
second code path: the naive full evaluation (tests/naive.py) or separate ``score`` calls."""

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.special
import scipy.stats
from conftest import DICE, EXACT, FEW_SHOT
from hypothesis import given, settings
from hypothesis import strategies as st
from naive import sequence_logprob
from scipy.spatial.distance import jensenshannon

from spectrum_local import InputError, metrics
from spectrum_local.convert import convert
from spectrum_local.eval import (DistributionTask, GenerationTask, SteerabilityTask, Validator,
                                 compare_task, evaluate, load_tasks, run_task, task_prompt)
from spectrum_local.formats import get_format, parse_messages

LN2 = math.log(2)


def smoothed(p):
    """The paper's smoothing, written again here: + 1e-6, then renormalised."""
    p = np.asarray(p, dtype=np.float64) + 1e-6
    return p / p.sum()


def scipy_metrics(target, model) -> dict:
    p, q = smoothed(target), smoothed(model)
    # scipy gives the distance (base e); nan where rounding makes a ~0 divergence negative
    return {"js_divergence": np.nan_to_num(jensenshannon(p, q) ** 2),
            "kl_divergence": scipy.stats.entropy(p, q),
            "cross_entropy": scipy.stats.entropy(p) + scipy.stats.entropy(p, q)}


def ours(target, model) -> dict:
    return {"js_divergence": metrics.js_divergence(target, model),
            "kl_divergence": metrics.kl_divergence(target, model),
            "cross_entropy": metrics.cross_entropy(target, model)}


# --- metrics ---------------------------------------------------------------------------------

distributions = st.integers(1, 12).flatmap(lambda n: st.tuples(
    *[st.lists(st.floats(0, 1), min_size=n, max_size=n).filter(lambda v: sum(v) > 0)] * 2))


@settings(max_examples=200, deadline=None)
@given(distributions)
def test_divergences_match_scipy(pair):
    target, model = (np.array(v) / sum(v) for v in pair)
    for name, value in ours(target, model).items():
        assert value == pytest.approx(scipy_metrics(target, model)[name], abs=1e-9), name
    assert 0 <= metrics.js_divergence(target, model) <= LN2


@pytest.mark.parametrize("target, model", [
    ([0.5, 0.5, 0.0], [0.2, 0.3, 0.5]),  # a zero in the target
    ([0.2, 0.3, 0.5], [1.0, 0.0, 0.0]),  # zeros in the model: finite only thanks to smoothing
    ([1.0], [1.0]),  # one candidate
    ([0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]),  # ties, equal
    ([1.0, 0.0], [0.0, 1.0]),  # disjoint
])
def test_divergence_edge_cases_match_scipy(target, model):
    for name, value in ours(target, model).items():
        assert math.isfinite(value)
        assert value == pytest.approx(scipy_metrics(target, model)[name], abs=1e-9), name


def test_underflowing_probabilities_normalise_in_log_space():
    logprobs = [-2000.0, -2001.0, -2003.5]  # exp() of each is 0.0 in float64
    assert sum(math.exp(lp) for lp in logprobs) == 0.0
    probs = metrics.normalize_logprobs(logprobs)
    assert probs == pytest.approx(scipy.special.softmax(logprobs), rel=1e-12)
    target = [0.5, 0.3, 0.2]
    assert metrics.js_divergence(target, probs) == pytest.approx(
        scipy_metrics(target, scipy.special.softmax(logprobs))["js_divergence"], abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(distributions)
def test_representativeness_matches_scipy_wasserstein(pair):
    target, model = (np.array(v) / sum(v) for v in pair)
    n = len(target)
    positions = np.arange(n)
    expected = 1.0 if n == 1 else 1 - scipy.stats.wasserstein_distance(
        positions, positions, target, model) / (n - 1)
    assert metrics.representativeness(target, model) == pytest.approx(expected, abs=1e-9)


def test_representativeness_extremes():
    assert metrics.representativeness([1, 0, 0], [0, 0, 1]) == pytest.approx(0.0)
    assert metrics.representativeness([0.2, 0.5, 0.3], [0.2, 0.5, 0.3]) == pytest.approx(1.0)


@pytest.mark.parametrize("target, model, expected", [
    ([0.1, 0.6, 0.3], [0.2, 0.5, 0.3], 1),
    ([0.1, 0.6, 0.3], [0.5, 0.2, 0.3], 0),
    ([0.25, 0.25, 0.25, 0.25], [0.1, 0.1, 0.7, 0.1], 1),  # a tied target: any mode counts
    ([0.4, 0.4, 0.2], [0.1, 0.2, 0.7], 0),
    ([1.0], [1.0], 1),
])
def test_mode_match(target, model, expected):
    assert metrics.mode_match(target, model) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from("abcdef"), max_size=40), st.one_of(st.none(), st.integers(1, 8)))
def test_generation_metrics_match_brute_force(answers, support):
    pairs = list(itertools.combinations(answers, 2))
    collisions = sum(a == b for a, b in pairs) / len(pairs) if pairs else 0.0
    assert metrics.pairwise_collision(answers) == pytest.approx(collisions, abs=1e-12)
    most = len(answers) if support is None else min(len(answers), support)
    expected = None if most < 2 else scipy.stats.entropy(
        [answers.count(a) for a in set(answers)]) / math.log(most)
    assert metrics.normalized_entropy(answers, support) == pytest.approx(expected, abs=1e-12)


def test_slope_matches_linregress():
    k, loss = [0, 1, 2, 4, 8, 16], [0.9, 0.8, 0.7, 0.62, 0.57, 0.55]
    assert metrics.slope(k, loss) == pytest.approx(scipy.stats.linregress(k, loss).slope)


@pytest.mark.parametrize("validator, valid, invalid", [
    (Validator("valid", frozenset({"Ohio", "Utah"})), ["Ohio"], ["ohio", "Ohio.", "Texas"]),
    (Validator("regex", "[0-9]{4}"), ["0042"], ["042", "00420", "a042"]),
    (Validator("int_range", (1, 100)), ["1", "100", "+7"], ["0", "101", "7.0", "seven", ""]),
])
def test_validators(validator, valid, invalid):
    assert all(validator(a) for a in valid)
    assert not any(validator(a) for a in invalid)


# --- task files ------------------------------------------------------------------------------

def task_line(**fields) -> str:
    return json.dumps(fields)


DIST = {"type": "distribution", "messages": DICE, "candidates": "2..4",
        "target_probs": [0.25, 0.5, 0.25]}
GEN = {"type": "generation", "messages": DICE, "n": 4, "max_tokens": 4, "int_range": [2, 12]}
STEER = {"type": "steerability", "description": "A random fruit.", "k": [0, 1, 2],
         "examples": [{"output": "apple"}, {"input": "red", "output": "cherry"},
                      {"output": " kiwi"}, {"output": "\n\nfig"}], "orderings": 2}


def test_bad_task_lines_are_reported_with_their_numbers(tmp_path):
    lines = [
        task_line(id="ok", **DIST),
        "{not json",
        task_line(**{**DIST, "target_probs": [0.25, 0.5, 0.2]}),
        task_line(**{**DIST, "target_probs": [0.75, 0.5, -0.25]}),
        task_line(**{**DIST, "candidates": ["2", "3", "2"]}),
        task_line(**{k: v for k, v in GEN.items() if k != "int_range"}, validator="email"),
        task_line(**GEN, valid=["2"]),
        task_line(**{**STEER, "k": [0, 8]}),
        task_line(**{**DIST, "type": "ranking"}),
        task_line(id="ok", **GEN),
        task_line(**{k: v for k, v in GEN.items() if k != "int_range"}, regex="(unclosed"),
        task_line(**{**GEN, "n": True}),
        task_line(**{**DIST, "messages": [{"role": "description", "content": "a\ud800"}]}),
        task_line(id="\udfff", **DIST),
        "[" * 100_000 + "]" * 100_000,  # deeper than the JSON parser goes
        task_line(**{**GEN, "n": 0}),
        json.dumps({**STEER, "id": "U+2028 stays inside its line: \u2028"}, ensure_ascii=False),
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputError) as error:
        load_tasks(str(path))
    reported = str(error.value).splitlines()
    assert [line.split(":")[0] for line in reported] == [f"{path} line {n}" for n in range(2, 17)]
    for needle, line in [("not valid JSON", 2), ("sum to 0.95", 3), ("negative", 4),
                         ("repeated candidate", 5), ("unknown field(s) for a generation task: "
                                                     "validator", 6),
                         ("exactly one validator", 7), ("at least 9 examples", 8),
                         ('"type" must be one of', 9), ("duplicate id 'ok'", 10),
                         ("does not compile", 11), ('"n" has the wrong type', 12),
                         ("lone surrogate U+D800", 13), ("lone surrogate U+DFFF", 14),
                         ("not valid JSON", 15), ("n must be at least 1, got 0", 16)]:
        assert needle in reported[line - 2], (needle, reported[line - 2])


def test_cli_refuses_a_bad_task_file_before_loading_a_model(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(task_line(**{**DIST, "target_probs": [0.2, 0.2, 0.2]}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "spectrum_local", "eval", str(path), "--model",
                           str(tmp_path / "missing.gguf")], capture_output=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.decode().strip() == f"Error: {path} line 1: target_probs sum to 0.6, not 1"


def test_builtin_suite_loads():
    tasks = load_tasks(suite="basic")
    kinds = {type(t) for t in tasks}
    assert kinds == {DistributionTask, GenerationTask, SteerabilityTask}
    with pytest.raises(InputError, match="unknown suite"):
        load_tasks(suite="nope")


# --- the task types, exact on F32 models ------------------------------------------------------

def naive_logprob(model, naive, messages, text, end_token=True):
    """log P(text [+ end] | messages) from one full evaluation, rendered as one string and split
    where the tokens first differ (as tests/naive.py does for score)."""
    from spectrum_local.backend import common_prefix

    fmt, parsed = get_format(model.format), parse_messages(messages)
    prompt = model.tokenize(fmt.render(parsed))
    ending = {"candidate": text} if end_token else {"output_prefix": text}
    full = model.tokenize(fmt.render(parsed, **ending))
    start = common_prefix(prompt, full)
    logprob = sequence_logprob(naive, full[:start], full[start:])
    if start < len(prompt):
        logprob -= sequence_logprob(naive, prompt[:start], prompt[start:])
    return logprob


@pytest.mark.parametrize("end_token", [True, False])
def test_distribution_task_matches_naive_and_scipy(f32_models, naive_f32, end_token):
    model, naive = f32_models["qwen3"], naive_f32["qwen3"]
    candidates = [str(n) for n in range(2, 13)]
    target = [min(s - 1, 13 - s) / 36 for s in range(2, 13)]
    task = DistributionTask("dice", DICE, candidates, target, ordinal=True)
    result = run_task(model, task, end_token=end_token)
    reference = [naive_logprob(model, naive, DICE, c, end_token) for c in candidates]
    assert result.detail["logprobs"] == pytest.approx(reference, abs=EXACT)
    probs = scipy.special.softmax(reference)
    assert result.detail["probs"] == pytest.approx(probs, abs=1e-3)
    for name, value in scipy_metrics(target, probs).items():
        assert result.metrics[name] == pytest.approx(value, abs=1e-3), name
    assert result.metrics["coverage"] == pytest.approx(np.exp(reference).sum(), rel=1e-2)
    positions = np.arange(len(candidates))
    assert result.metrics["representativeness"] == pytest.approx(
        1 - scipy.stats.wasserstein_distance(positions, positions, target, probs) / 10, abs=1e-3)


def test_without_the_end_token_a_candidate_is_more_likely(f32_models):
    model = f32_models["llama3"]
    with_end = model.score(DICE, ["7", "12"])
    without = model.score(DICE, ["7", "12"], end_token=False)
    for a, b in zip(with_end.candidates, without.candidates):
        assert b.logprob > a.logprob and b.n_tokens == a.n_tokens - 1


@pytest.mark.parametrize("family", ["gemma3", "llama3", "qwen3"])
def test_output_logprobs_equal_separate_scores_from_one_read(f32_models, naive_f32, family):
    model = f32_models[family]
    messages = FEW_SHOT + [{"role": "output", "content": "\n\nfig"},
                           {"role": "input", "content": "yellow"},
                           {"role": "output", "content": " banana"}]
    model.engine.clear()
    before = model.engine.tokens_evaluated
    logprobs = model.output_logprobs(messages)
    evaluated = model.engine.tokens_evaluated - before
    outputs = [i for i, m in enumerate(messages) if m["role"] == "output"]
    assert len(logprobs) == len(outputs)
    for lp, i in zip(logprobs, outputs):
        assert lp == pytest.approx(model.score(messages[:i], [messages[i]["content"]])
                                   .candidates[0].logprob, abs=EXACT)
        assert lp == pytest.approx(naive_logprob(model, naive_f32[family], messages[:i],
                                                 messages[i]["content"]), abs=EXACT)
    assert model.output_logprobs(messages, outputs=[3, 0]) == pytest.approx(
        [logprobs[3], logprobs[0]], abs=EXACT)
    with pytest.raises(InputError, match="output number must be between 0 and 4"):
        model.output_logprobs(messages, outputs=[5])
    # One read along the conversation (plus any re-spelled prompt ends), not a prompt per output.
    fmt = get_format(model.format)
    conversation = model.tokenize(fmt.render(parse_messages(messages), output_prefix=None))
    assert evaluated <= len(conversation) + 4


def test_steerability_task_curve(f32_models):
    model = f32_models["qwen3"]
    task = SteerabilityTask("fruit", STEER["description"], STEER["examples"], (0, 1, 2), 3, 0.5)
    result = run_task(model, task, seed=7)
    orders = task.orders(7)
    assert orders[0] == STEER["examples"][:3]  # the file's order first
    assert len({json.dumps(o) for o in task.orders(7)}) > 1
    assert task.orders(7) == orders  # seeded: the same for every model and run
    for order, losses in zip(orders, result.detail["loss_by_ordering"]):
        messages = task.messages(order)
        outputs = [i for i, m in enumerate(messages) if m["role"] == "output"]
        for k, loss in zip(task.k, losses):
            i = outputs[k]
            separate = model.score(messages[:i], [messages[i]["content"]]).candidates[0].logprob
            assert loss == pytest.approx(-separate, abs=EXACT)
    curve = np.mean(result.detail["loss_by_ordering"], axis=0)
    assert result.detail["loss"] == pytest.approx(curve)
    assert result.metrics["slope"] == pytest.approx(scipy.stats.linregress(task.k, curve).slope)
    assert result.metrics["excess_loss"] == pytest.approx(curve[-1] - 0.5)
    assert task_prompt(task) == task.messages(STEER["examples"][:2])
    shorter = SteerabilityTask("fruit", None, STEER["examples"], (0, 1))
    assert task_prompt(shorter) == [{"role": "output", "content": "apple"},
                                    {"role": "input", "content": "red"}]


def test_generation_task_counts_the_samples(f32_models):
    model = f32_models["llama3"]
    task = GenerationTask("any", DICE, 40, 3, Validator("regex", "(?s).+"))
    result = run_task(model, task, seed=11)
    answers = [s.text.strip() for s in model.sample(DICE, 40, max_tokens=3, seed=11)]
    valid = [a for a in answers if a]
    assert result.metrics["valid_fraction"] == pytest.approx(len(valid) / 40)
    assert result.metrics["unique_valid"] == len(set(valid))
    assert sum(a["count"] for a in result.detail["answers"]) == 40
    assert result.metrics["valid_set_coverage"] is None  # a regex has no finite valid set
    assert result.metrics["pairwise_collision"] == pytest.approx(
        metrics.pairwise_collision(valid))


# --- a run: resume and compare ----------------------------------------------------------------

def tasks_of(*dicts):
    return [load_tasks_from(d, i) for i, d in enumerate(dicts)]


def load_tasks_from(d, i):
    from spectrum_local.eval import parse_task
    return parse_task({"id": f"t{i}", **d}, i)


def test_resume_runs_only_the_missing_tasks(f32_models, tmp_path):
    model = f32_models["qwen3"]
    tasks = tasks_of(DIST, GEN, STEER)
    fresh = evaluate(model, tasks, seed=3, progress=False).to_dict()
    out = tmp_path / "out.jsonl"
    evaluate(model, tasks[:2], seed=3, out=str(out), progress=False)
    first_two = out.read_bytes()
    with open(out, "ab") as f:
        f.write(b'{"model": "torn')  # a killed run's last line
    with pytest.raises(InputError, match="exists; pass --resume"):
        evaluate(model, tasks, seed=3, out=str(out), progress=False)
    with pytest.raises(InputError, match="another run.*seed 3"):
        evaluate(model, tasks, seed=4, out=str(out), resume=True, progress=False)
    resumed = evaluate(model, tasks, seed=3, out=str(out), resume=True, progress=False).to_dict()
    lines = out.read_bytes().splitlines(keepends=True)
    assert b"".join(lines[:2]) == first_two and len(lines) == 3
    assert json.loads(lines[2])["id"] == "t2"
    assert_close(resumed, fresh)


def assert_close(a, b, where="report"):
    """Equal JSON, numbers within the F32 bound (the prefix cache's state differs)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-6, abs=EXACT), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def qwen3_q8_0(checkpoints, gguf_dir):
    import spectrum_local

    path = convert(checkpoints["qwen3"], gguf_dir / "qwen3-Q8_0-eval.gguf", "q8_0",
                   progress=False).path
    model = spectrum_local.load(str(path), ctx=1024)
    yield model
    model.close()


def test_compare_f32_with_q8_0(f32_models, qwen3_q8_0):
    a, b = f32_models["qwen3"], qwen3_q8_0
    task = tasks_of(DIST)[0]
    comparison = compare_task(a, b, task)
    # First-token KL from the two models' whole rows, with scipy on the union of both top-20s.
    rows = [m.engine.prompt_logits(m.prompt_tokens(DICE)).astype(np.float64) for m in (a, b)]
    union = sorted(set(np.argsort(-rows[0])[:20]) | set(np.argsort(-rows[1])[:20]))
    expected = scipy.stats.entropy(scipy.special.softmax(rows[0][union]),
                                   scipy.special.softmax(rows[1][union]))
    assert comparison.first_token_kl == pytest.approx(expected, rel=1e-6)
    assert 0 < comparison.first_token_kl < 0.5  # Q8_0 moves a random model a little
    probs_a, probs_b = comparison.a.detail["probs"], comparison.b.detail["probs"]
    assert comparison.js_between == pytest.approx(
        jensenshannon(smoothed(probs_a), smoothed(probs_b)) ** 2, abs=1e-9)
    for name, value in comparison.diff.items():
        assert value == pytest.approx(comparison.b.metrics[name] - comparison.a.metrics[name])


def test_compare_a_model_with_itself_is_zero(f32_models):
    model = f32_models["llama3"]
    for task in tasks_of(DIST, STEER):
        comparison = compare_task(model, model, task)
        assert comparison.first_token_kl == pytest.approx(0, abs=1e-9)
        assert all(v == pytest.approx(0, abs=1e-6) for v in comparison.diff.values())
        if comparison.js_between is not None:
            assert comparison.js_between == pytest.approx(0, abs=1e-9)


def test_cli_compare(f32, qwen3_q8_0, tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(task_line(id=name, **t) for name, t in
                              [("dice", DIST), ("gen", GEN), ("fruit", STEER)]) + "\n")
    cli = [sys.executable, "-m", "spectrum_local", "eval", str(path), "--model", str(f32["qwen3"]),
           "--vs", qwen3_q8_0.path]
    proc = subprocess.run(cli, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    text = proc.stdout.decode()
    for needle in ("JS(a,b)", "KL 1st tok", f"a = {f32['qwen3']}", f"b = {qwen3_q8_0.path}"):
        assert needle in text
    report = json.loads(subprocess.run([*cli, "--json"], capture_output=True, timeout=300).stdout)
    assert report["vs"] == qwen3_q8_0.path
    assert {t["type"] for t in report["tasks"]} == {"distribution", "generation", "steerability"}
    assert all(0 <= t["first_token_kl"] < 0.5 for t in report["tasks"])
    assert set(report["summary"]["distribution"]) >= {"a", "b", "diff", "js_between"}


# --- the command, on the default model --------------------------------------------------------

def test_cli_eval_on_the_default_model(tmp_path):
    path = tmp_path / "tasks.jsonl"
    dist = {**DIST, "candidates": "2..12", "ordinal": True,
            "target_probs": [min(s - 1, 13 - s) / 36 for s in range(2, 13)]}
    path.write_text("\n".join(task_line(id=name, **t) for name, t in
                              [("dice", dist), ("gen", GEN), ("fruit", STEER)]) + "\n")
    out, plot = tmp_path / "out.jsonl", tmp_path / "plot.png"
    cli = [sys.executable, "-m", "spectrum_local", "eval", str(path)]
    proc = subprocess.run([*cli, "--json", "--out", str(out), "--plot", str(plot)],
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    assert [t["id"] for t in report["tasks"]] == ["dice", "gen", "fruit"]
    dice = report["tasks"][0]
    assert 0 <= dice["metrics"]["coverage"] <= 1
    assert 0 <= dice["metrics"]["js_divergence"] <= LN2
    assert sum(dice["probs"]) == pytest.approx(1)
    assert report["summary"]["steerability"]["tasks"] == 1
    assert len(out.read_text().splitlines()) == 3
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Resumed with everything done: the same report, from the file, and the human tables.
    proc = subprocess.run([*cli, "--out", str(out), "--resume"], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    text = proc.stdout.decode()
    for needle in ("distribution", "generation", "steerability", "dice", "fruit", "mean of 1"):
        assert needle in text
