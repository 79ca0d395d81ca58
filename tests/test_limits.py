"""Every number a user can give reaches llama.cpp valid, or is rejected first with one line.

llama.cpp answers a value out of its range with GGML_ASSERT, which aborts the process (e.g.
`score --ctx 48` did: more sequences than a decode may output). So each example runs in a
subprocess, and the property is: no death by signal, no hang, no traceback, and a failure is a
clean `Error: ...` line (exit 2 for bad input)."""

import json
import subprocess
import sys
import textwrap

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

DICE = "Roll two dice"
# The default model's trained length: the largest --ctx accepted.
N_CTX_TRAIN = 32768

# Slow examples (a process and a model load each), so few of them and always the same ones.
sweep = settings(derandomize=True, database=None, deadline=None, max_examples=8,
                 suppress_health_check=[HealthCheck.too_slow])

ctx_values = st.one_of(st.integers(1, 300),
                       st.sampled_from([-1, 0, N_CTX_TRAIN, N_CTX_TRAIN + 1, 10**9, 2**32 + 64]))
threads_values = st.one_of(st.none(), st.integers(-1, 4), st.sampled_from([513, 10**6]))
gpu_layers_values = st.one_of(st.none(), st.integers(-3, 3), st.sampled_from([10**6, 2**40]))
# Few new tokens, so that an example is quick: "no limit" (cut at the context's end) is one
# fixed example, and candidates hold at most ~1500 words in all.
max_tokens_values = st.integers(-1, 3)
n_values = st.one_of(st.integers(-1, 66), st.sampled_from([10_001, 10**6]))


@st.composite
def candidate_shapes(draw) -> tuple[int, int]:
    """(how many candidates, words per candidate)."""
    words = draw(st.sampled_from([1, 20, 300]))
    return min(draw(st.integers(1, 100)), 1500 // words), words


def check_clean_exit(proc: subprocess.CompletedProcess, what: str) -> None:
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode >= 0, f"{what}: killed by signal {-proc.returncode}\n{err[-3000:]}"
    assert proc.returncode in (0, 2), f"{what}: exit {proc.returncode}\n{err[-3000:]}"
    if proc.returncode:
        assert "Traceback" not in err, f"{what}:\n{err}"
        assert err.strip().splitlines()[-1].startswith("Error: "), f"{what}:\n{err}"


def option(name: str, value) -> list[str]:
    return [] if value is None else [name, str(value)]


@st.composite
def cli_commands(draw) -> list[str]:
    command = draw(st.sampled_from(["score", "sample", "top"]))
    args = [command, "-d", DICE]
    if command == "score":
        count, length = draw(candidate_shapes())
        if length == 1:
            args += ["-c", f"1..{count}"]
        else:
            args += ["-c", ",".join(f"{i} " + "word " * length for i in range(count))]
    elif command == "sample":
        args += ["-n", str(draw(n_values)), "--max-tokens", str(draw(max_tokens_values)),
                 "--top-k", str(draw(st.sampled_from([0, 1, 5, 10**12])))]
        args += option("--seed", draw(st.one_of(st.none(), st.integers(-2**70, 2**70))))
    else:
        args += ["-k", str(draw(st.sampled_from([-1, 0, 1, 10, 262144, 262145, 10**12])))]
    args += option("--ctx", draw(ctx_values))
    args += option("--threads", draw(threads_values))
    args += option("--gpu-layers", draw(gpu_layers_values))
    return args


@sweep
@given(cli_commands())
# The issue's crash: every --ctx below 64 (the engine's sequence count) aborted in llama.cpp's
# context constructor.
@example(["score", "-d", DICE, "-c", "1..3", "--ctx", "48"])
@example(["score", "-d", DICE, "-c", "1..3", "--ctx", "40"])
@example(["score", "-d", DICE, "-c", "1..70", "--ctx", "63"])
@example(["sample", "-d", DICE, "-n", "66", "--max-tokens", "2", "--ctx", "33"])
# No token limit: cut where the context ends (a long prompt leaves ~40 tokens of room).
@example(["sample", "-d", "word " * 200, "-n", "2", "--max-tokens", str(10**9), "--ctx", "64"])
def test_cli_options_never_kill_the_process(args):
    proc = subprocess.run([sys.executable, "-m", "spectrum_local", *args], capture_output=True,
                          timeout=300)
    check_clean_exit(proc, " ".join(args)[:300])


def test_batch_line_values_never_kill_the_process(tmp_path):
    long_prompt = [{"role": "description", "content": "word " * 200}]
    lines = [{"n": 10**6}, {"n": 0}, {"max_tokens": -1}, {"top_k": 10**12, "max_tokens": 1},
             {"seed": -2**70, "max_tokens": 1}, {"temperature": float("nan")},
             {"top_p": float("inf")}, {"repeat_penalty": 1e-320, "max_tokens": 1},
             {"max_tokens": 10**9, "messages": long_prompt}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    proc = subprocess.run([sys.executable, "-m", "spectrum_local", "sample", "-d", DICE,
                           "--ctx", "64", "--batch", str(tmp_path / "in.jsonl"),
                           "--out", str(tmp_path / "out.jsonl")], capture_output=True, timeout=300)
    check_clean_exit(proc, "--batch")
    assert proc.returncode == 0 and "5 line(s) skipped: 1, 2, 3, 6, 7" in proc.stderr.decode()


# The Python API, many cases per process: the process prints each case before running it,
# so the case that killed it is the last one printed.
API_RUNNER = textwrap.dedent("""
    import json, sys, warnings
    import spectrum_local

    warnings.simplefilter("ignore")
    dice = [{"role": "description", "content": %r}]
    for i, case in enumerate(json.load(sys.stdin)):
        print("case", i, flush=True)
        try:
            model = spectrum_local.load(**case["load"])
            try:
                args = [case["candidates"]] if case["op"] == "score" else []
                getattr(model, case["op"])(dice, *args, **case["options"])
            finally:
                model.close()
        except spectrum_local.InputError as e:
            assert "\\n" not in str(e), str(e)
    print("done", flush=True)
""" % DICE)

floats = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0]), st.floats())  # NaN, inf, denormals


@st.composite
def api_cases(draw) -> dict:
    case = {"load": {"ctx": draw(ctx_values), "threads": draw(threads_values),
                     "gpu_layers": draw(gpu_layers_values),
                     "batch": draw(st.one_of(st.integers(-1, 70), st.sampled_from([512, 10**9])))},
            "op": draw(st.sampled_from(["score", "sample", "top"])), "options": {}}
    if case["op"] == "score":
        count, length = draw(candidate_shapes())
        case["candidates"] = [f"{i}" + " word" * (length - 1) for i in range(count)]
    elif case["op"] == "sample":
        case["options"] = {
            "n": draw(n_values), "max_tokens": draw(max_tokens_values),
            "seed": draw(st.one_of(st.none(), st.integers(-2**70, 2**70))),
            "top_k": draw(st.sampled_from([-1, 0, 1, 5, 2**31, 10**12])),
            "temperature": draw(floats), "top_p": draw(floats), "min_p": draw(floats),
            "repeat_penalty": draw(floats)}
    else:
        case["options"] = {"k": draw(st.sampled_from([-1, 0, 1, 10, 262144, 262145, 10**12])),
                           "prefix": draw(st.sampled_from(["", "1", "word " * 400]))}
    return case


@settings(sweep, max_examples=2)
@given(st.lists(api_cases(), min_size=20, max_size=20))
def test_api_values_never_kill_the_process(cases):
    proc = subprocess.run([sys.executable, "-c", API_RUNNER], input=json.dumps(cases).encode(),
                          capture_output=True, timeout=300)
    lines = proc.stdout.decode().splitlines()
    started = [int(line.split()[1]) for line in lines if line.startswith("case ")]
    what = f"case {started[-1]}: {json.dumps(cases[started[-1]])[:500]}" if started else "start-up"
    assert proc.returncode >= 0, f"{what}: killed by signal {-proc.returncode}"
    assert proc.returncode == 0 and lines[-1] == "done", \
        f"{what}:\n{proc.stderr.decode('utf-8', 'replace')[-3000:]}"
