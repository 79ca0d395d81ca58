"""make bench, the server's part: ``spectrum-local serve`` on loopback against the same work done
in-process, through the CLI, one request after another, and by the peer a desktop tool would use
today (llama-cpp-python's own server). Real servers in subprocesses on free ports, the default
model's base on every side (checked: the dice log-probs of every side must agree), real HTTP
clients; ratios of medians (several runs each, the variants taking turns), under
a header naming the CPU.

    python bench/bench_serve.py               # the table (6-7 minutes on 2 cores, about 3 of
                                              # them the llama-cpp-python server's 11 requests)
    python bench/bench_serve.py --skip-peer   # without that row

SPECTRUM_LOCAL_BENCH_REPEATS=N caps the runs of every case at N (see bench.py): on a busy
machine the batch jobs' 3 x 3 runs of 200 lines alone can take over half an hour.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from servers import free_port, running, serve_command  # noqa: E402

import spectrum_local  # noqa: E402
from bench import REPEATS, medians, print_table, progress, runs  # noqa: E402
from spectrum_local.backend import Path as ReadPath  # noqa: E402
from spectrum_local.batch import run_batch  # noqa: E402
from spectrum_local.llama import cpu_name, use_extra_buffer_types  # noqa: E402

DESCRIPTION = "Roll two six-sided dice. What is the sum of their values?"
DICE = [{"role": "description", "content": DESCRIPTION}]
CANDIDATES = [str(n) for n in range(2, 13)]  # what "2..12" means
# A prompt whose samples nearly all run to max_tokens (the mean is shown); every variant draws
# the same seeds, so they do the same work.
STORY = [{"role": "description", "content": "Write a long story, at least a hundred words."},
         {"role": "output", "content": "Once upon a time, in a land of tall mountains and deep "
          "green valleys, there lived an old dragon who guarded a cave full of gold, and every "
          "night the villagers below would hear him singing songs about the stars, the rivers "
          "and the long winters of his youth, when the world was young and wild."}]
CLIENTS, NEW_TOKENS = 8, 24
BATCH_LINES, BATCH_REPEATS = 200, 3
TIMEOUT = 600
# The largest |log-prob difference| allowed between two sides of a row, in nats. Our server
# and the in-process model run the same engine code on the same model; llama_cpp.server rounds
# a quantized model differently (another batch layout: docs/performance.md's ~0.5 nats on the
# -32 nat end-of-turn token). A different model is tens of nats away (the demo adapter against its
# base: 37 on the dice), so either gap stops the bench instead of reporting its ratios.
SAME_MODEL_NATS = 0.05
PEER_SAME_MODEL_NATS = 2.0
# llama-cpp-python's server with llama.cpp's extra CPU buffer types set as ours are
# (SPECTRUM_LOCAL_EXTRA_BUFTS): its settings have no option for them, and its default (on)
# dies on the first decode on CPUs with AMX, as Llama does (tests/naive.py).
PEER_SERVER = """\
import os, llama_cpp
api, on = llama_cpp.llama_cpp, os.environ["SPECTRUM_LOCAL_EXTRA_BUFTS"] == "1"
default_params = api.llama_model_default_params
def model_params():
    params = default_params()
    params.use_extra_bufts = on
    return params
api.llama_model_default_params = model_params
from llama_cpp.server.__main__ import main
main()
"""


def dice_game(k: int) -> list[dict]:
    return [{"role": "description", "content": f"Roll two six-sided dice (game {k}). What is the "
                                               "sum of their values?"}]


def check_same(what: str, ours: list[float], theirs: list[float], nats: float) -> float:
    """The largest |difference| of two sides' log-probs of the same candidates; a
    RuntimeError when it exceeds ``nats``: the two sides are not running the same model."""
    if len(ours) != len(theirs) or not ours:
        raise RuntimeError(f"{what}: {len(theirs)} log-probs against {len(ours)}")
    diff = max(abs(a - b) for a, b in zip(ours, theirs))
    if not diff <= nats:
        raise RuntimeError(f"{what}: log-probs differ by up to {diff:.3f} nats (allowed "
                           f"{nats}): the two sides do not run the same model, so their ratios "
                           f"would compare different work\n  ours:   {ours}\n  theirs: {theirs}")
    return diff


def package_env() -> dict:
    """The environment of every subprocess: this one's, with PYTHONPATH leading to the
    spectrum_local imported here (a checkout run with PYTHONPATH=... stays that checkout)."""
    env = dict(os.environ)
    root = str(Path(spectrum_local.__file__).resolve().parents[1])
    paths = env.get("PYTHONPATH", "").split(os.pathsep)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in paths if p and p != root])
    return env


def check_subprocess_package() -> None:
    found = subprocess.run([sys.executable, "-c", "import spectrum_local; "
                            "print(spectrum_local.__file__)"], env=package_env(), check=True,
                           stdout=subprocess.PIPE, text=True).stdout.strip()
    if Path(found).resolve() != Path(spectrum_local.__file__).resolve():
        raise RuntimeError(f"subprocesses import spectrum_local from {found}, this process "
                           f"from {spectrum_local.__file__}")


def post(client: httpx.Client, path: str, body: dict) -> dict:
    response = client.post(path, json=body)
    if response.status_code != 200:
        raise RuntimeError(f"POST {path} {body} -> {response.status_code}: {response.text}")
    return response.json()


@contextlib.contextmanager
def llama_cpp_server(model_path: str, threads: int):
    """llama-cpp-python's server (python -m llama_cpp.server's arguments) on a free loopback
    port: its defaults (so logits_all is on, which echo + logprobs needs), with our thread
    count and our choice of llama.cpp's extra CPU buffer types (PEER_SERVER)."""
    port = free_port()
    command = [sys.executable, "-c", PEER_SERVER, "--model", model_path, "--n_ctx", "2048",
               "--n_threads", str(threads), "--n_threads_batch", str(threads),
               "--host", "127.0.0.1", "--port", str(port), "--verbose", "False"]
    env = {**package_env(), "SPECTRUM_LOCAL_EXTRA_BUFTS": "1" if use_extra_buffer_types() else "0"}
    with running(command, port, "/v1/models", env=env) as url:
        yield url


def peer_score(model, url: str) -> tuple[float, list[float]]:
    """The dice scored through llama-cpp-python's server, the only way it can: one
    /v1/completions per candidate on the raw prompt + candidate + end-of-output, echo +
    logprobs, summing the candidate's and the end token's log-probs. Returns the wall time of
    the 11 requests and the 11 log-probabilities."""
    prompt = model.prompt_tokens(DICE)
    engine = model.engine
    jobs = []
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        for c in CANDIDATES:
            ours = prompt + engine.tokenize(c) + [model.end_of_output_id]
            # The raw text of the same tokens. llama_cpp.server tokenises a text prompt with
            # control tokens parsed and adds BOS itself, so the text leaves BOS out.
            bos = engine.tokenize("", bos=True)
            text = engine.detokenize(ours[len(bos):], special=True)
            theirs = post(client, "/extras/tokenize", {"input": text})["tokens"]
            if theirs != ours:
                raise RuntimeError(f"llama_cpp.server tokenises {text!r} as {theirs}, ours is "
                                   f"{ours}")
            jobs.append((c, text, len(ours), len(ours) - len(prompt)))
        answers = []
        start = time.perf_counter()
        for _, text, _, _ in jobs:
            # max_tokens 0 means "up to the context" in llama-cpp-python, so 1.
            answers.append(post(client, "/v1/completions", {
                "prompt": text, "echo": True, "logprobs": 1, "max_tokens": 1,
                "temperature": 0})["choices"][0]["logprobs"])
        seconds = time.perf_counter() - start
    logprobs = []
    for (candidate, _, n_all, n_scored), answer in zip(jobs, answers):
        # The echoed tokens start after BOS: entry i is the prompt's token i + 1.
        scored = slice(n_all - 1 - n_scored, n_all - 1)
        if not "".join(answer["tokens"][scored]).startswith(candidate):
            raise RuntimeError(f"llama_cpp.server echoed {answer['tokens']} for {candidate!r}")
        logprobs.append(math.fsum(answer["token_logprobs"][scored]))
    return seconds, logprobs


class Bench:
    """The in-process model, a server on the same model and an HTTP client kept open."""

    def __init__(self, model, client: httpx.Client, pool: ThreadPoolExecutor):
        self.model, self.client, self.pool = model, client, pool
        self.rows: list[tuple] = []
        self.notes: list[str] = []
        self.t_http_dice = math.nan
        self.dice_logprobs: list[float] = []

    def dice(self) -> None:
        """The dice, 11 candidates: HTTP vs in-process vs the CLI, the same call repeated (so
        the prompt is cached wherever a cache outlives the call)."""
        model, client = self.model, self.client
        # python -m, not the console script: the package imported here (package_env).
        command = [sys.executable, "-m", "spectrum_local", "score", "--description",
                   DESCRIPTION, "--candidates", "2..12", "--json", "--no-lora"]
        env = package_env()
        over_http = []

        def http_score():
            result = post(client, "/spectrum/v1/score", {"messages": DICE,
                                                         "candidates": "2..12"})
            over_http[:] = [c["logprob"] for c in result["candidates"]]

        def inprocess_score():
            model.score(DICE, CANDIDATES)

        def cli_score():
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=env)

        http_score()  # warm: the connection, the prompt caches
        inprocess_score()
        # The three sides on the same model, checked before anything is timed.
        self.dice_logprobs = [c.logprob for c in model.score(DICE, CANDIDATES).candidates]
        diff = check_same("dice over HTTP vs in-process", self.dice_logprobs, over_http,
                          SAME_MODEL_NATS)
        self.notes.append(f"dice over HTTP vs in-process: max |logprob difference| {diff:.1e}")
        cli = json.loads(subprocess.run(command, check=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, env=env, text=True).stdout)
        diff = check_same("dice by the CLI vs in-process", self.dice_logprobs,
                          [c["logprob"] for c in cli["candidates"]], SAME_MODEL_NATS)
        self.notes.append(f"dice by the CLI vs in-process: max |logprob difference| {diff:.1e}")
        t_http, t_inproc, t_cli = medians(http_score, inprocess_score, cli_score,
                                          repeats=REPEATS)
        self.t_http_dice = t_http
        case = f"dice score, {len(CANDIDATES)} candidates, over HTTP (one client, kept open)"
        self.rows.append((case, "the same model.score in-process", t_http, t_inproc,
                          "HTTP / in-process", "<= 1.3", t_http / t_inproc))
        self.rows.append(("same", "CLI subprocess: spectrum-local score --json", t_http, t_cli,
                          "speed-up", ">= 5x", t_cli / t_http))

    def concurrent_samples(self) -> None:
        """8 clients sampling n=1 x 24 tokens at once vs one after another, against the
        in-process gain of one n=8 call over eight n=1 calls, in the same rounds. Every variant
        draws the same seeds in a round: 8r ... 8r + 7."""
        model, client, pool = self.model, self.client, self.pool
        lengths = []
        seeds = {}

        def next_seeds(variant: str) -> range:
            base = seeds.get(variant, 0)
            seeds[variant] = base + CLIENTS
            return range(base, base + CLIENTS)

        def http_sample(seed: int):
            result = post(client, "/spectrum/v1/sample", {
                "messages": STORY, "n": 1, "max_tokens": NEW_TOKENS, "seed": seed})
            lengths.append(result["samples"][0]["n_tokens"])

        def concurrent():
            list(pool.map(http_sample, next_seeds("concurrent")))

        def one_after_another():
            for seed in next_seeds("one after another"):
                http_sample(seed)

        def inprocess_n8():
            samples = model.sample(STORY, n=CLIENTS, max_tokens=NEW_TOKENS,
                                   seed=next_seeds("n=8")[0])
            lengths.extend(s.n_tokens for s in samples)

        def inprocess_8x1():
            for seed in next_seeds("8 x n=1"):
                [sample] = model.sample(STORY, n=1, max_tokens=NEW_TOKENS, seed=seed)
                lengths.append(sample.n_tokens)

        list(pool.map(http_sample, range(-CLIENTS, 0)))  # warm: connections, prompt caches
        model.sample(STORY, n=1, max_tokens=1)
        lengths.clear()
        t_conc, t_seq, t_n8, t_8x1 = medians(concurrent, one_after_another, inprocess_n8,
                                             inprocess_8x1, repeats=REPEATS)
        speed_up, gain = t_seq / t_conc, t_8x1 / t_n8
        case = (f"{CLIENTS} concurrent HTTP clients, sample n=1 x {NEW_TOKENS} tokens "
                f"(mean {statistics.mean(lengths):.1f})")
        self.rows.append((case, "the same requests one after another", t_conc, t_seq,
                          "speed-up", ">= 0.85 x gain", speed_up))
        case = f"in-process: sample n={CLIENTS} x {NEW_TOKENS} tokens (the CPU's limit)"
        self.rows.append((case, f"{CLIENTS} x sample n=1", t_n8, t_8x1, "gain", "", gain))
        self.rows.append(("concurrent speed-up vs in-process gain, same rounds", "", "", "",
                          "speed-up / gain", ">= 0.85", speed_up / gain))

    def concurrent_scores(self) -> None:
        """8 dice-style score requests with different prompts (new ones every round), at once
        vs one after another, against the in-process gain of one merged read of their 88
        candidates over 8 model.score calls (the CPU's limit), in the same rounds."""
        model, engine = self.model, self.model.engine
        games = itertools.count()

        def game_score(k: int):
            result = post(self.client, "/spectrum/v1/score", {"messages": dice_game(k),
                                                              "candidates": "2..12"})
            assert len(result["candidates"]) == len(CANDIDATES), result

        def concurrent():
            list(self.pool.map(game_score, [next(games) for _ in range(CLIENTS)]))

        def one_after_another():
            for _ in range(CLIENTS):
                game_score(next(games))

        def inprocess_merged():
            # What the scheduler does with 8 reads that arrive together: one Engine.read.
            paths = []
            for _ in range(CLIENTS):
                prompt = model.prompt_tokens(dice_game(next(games)))
                paths += [ReadPath([*prompt, *engine.tokenize(c), model.end_of_output_id],
                                   len(prompt)) for c in CANDIDATES]
            engine.read(paths)

        def inprocess_scores():
            for _ in range(CLIENTS):
                model.score(dice_game(next(games)), CANDIDATES)

        t_conc, t_seq, t_merged, t_scores = medians(concurrent, one_after_another,
                                                    inprocess_merged, inprocess_scores,
                                                    repeats=REPEATS)
        speed_up, gain = t_seq / t_conc, t_scores / t_merged
        self.rows.append((f"{CLIENTS} concurrent dice-style score requests, different prompts",
                          "the same requests one after another", t_conc, t_seq, "speed-up",
                          ">= 1.3x", speed_up))
        case = f"in-process: one Engine.read of their {CLIENTS * len(CANDIDATES)} candidates"
        self.rows.append((case, f"{CLIENTS} x model.score (the CPU's limit)", t_merged,
                          t_scores, "gain", "", gain))

    def batch_jobs(self, url: str, folder: Path) -> None:
        """A 200-line score batch (dice-style prompts, 11 candidates each) through --server with
        16 requests in flight vs one at a time, and the same job run locally, sequentially
        (today's batch job), all in this process through run_batch."""
        source = folder / "batch.jsonl"
        source.write_text("".join(json.dumps({"id": k, "messages": dice_game(k),
                                              "candidates": "2..12"}) + "\n"
                                  for k in range(BATCH_LINES)))
        runs = itertools.count()
        served = spectrum_local.connect(url)

        def job(model, parallel):
            def run():
                summary = run_batch(model, "score", str(source), str(folder / f"{next(runs)}"),
                                    defaults={}, shared_messages=[], resume=False,
                                    strict=True, report=print, parallel=parallel,
                                    progress=False)
                assert summary.done == BATCH_LINES, summary
            return run

        t_16, t_1, t_local = medians(job(served, 16), job(served, 1), job(self.model, 1),
                                     repeats=BATCH_REPEATS)
        served.close()
        case = f"{BATCH_LINES}-line score batch, --server (serve), --parallel 16"
        self.rows.append((case, "--parallel 1", t_16, t_1, "speed-up", ">= 1.3x", t_1 / t_16))
        self.rows.append(("same", "the local batch job (sequential, in-process)", t_16, t_local,
                          "remote / local", "<= 1.0", t_16 / t_local))

    def peer(self, model_path: str, threads: int) -> None:
        """llama-cpp-python's server on the dice, once (it is slow); ours is the HTTP dice
        score measured in dice()."""
        with llama_cpp_server(model_path, threads) as url:
            t_peer, peer = peer_score(self.model, url)
        diff = check_same("llama_cpp.server vs ours on the dice", self.dice_logprobs, peer,
                          PEER_SAME_MODEL_NATS)
        # Our own batch-shape noise on the same numbers, for scale: each candidate's score
        # against the prompt log-probs of its tokens evaluated in one sequence.
        prompt, engine = self.model.prompt_tokens(DICE), self.model.engine
        own = max(abs(score - math.fsum(p.logprob for p in engine.prompt_logprobs(
            prompt + engine.tokenize(c) + [self.model.end_of_output_id])[len(prompt) - 1:]))
            for c, score in zip(CANDIDATES, self.dice_logprobs))
        baseline = (f"llama_cpp.server: {len(CANDIDATES)} /v1/completions, echo + logprobs "
                    "(one run)")
        self.rows.append((f"dice score, {len(CANDIDATES)} candidates, over HTTP", baseline,
                          self.t_http_dice, t_peer, "speed-up", ">= 100x",
                          t_peer / self.t_http_dice))
        self.notes.append(f"llama_cpp.server vs ours on the dice: max |logprob difference| "
                          f"{diff:.2f} nats (ours, score vs prompt log-probs of the same tokens: "
                          f"{own:.2f})")


def main() -> None:
    skip_peer = "--skip-peer" in sys.argv[1:]
    # The default model's base alone, everywhere: in-process, the server and the CLI with
    # --no-lora, llama_cpp.server on the same file (it has no adapter of its own). The dice
    # log-probs of each side are checked against the in-process ones (check_same).
    model = spectrum_local.load(no_lora=True)
    model_path = model.path
    threads = os.cpu_count() or 1  # the engine's default, given to llama_cpp.server too
    check_subprocess_package()
    port = free_port()
    server_env = package_env()
    server_env.pop("SPECTRUM_LOCAL_API_KEY", None)  # the bench's clients send no key
    with running(serve_command(["--no-lora"], port), port, "/health", env=server_env) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as client, \
            ThreadPoolExecutor(CLIENTS) as pool:
        bench = Bench(model, client, pool)
        for part in (bench.dice, bench.concurrent_samples, bench.concurrent_scores):
            progress(part.__name__, bench.rows)
            part()
        progress("batch_jobs", bench.rows)
        with tempfile.TemporaryDirectory() as folder:
            bench.batch_jobs(url, Path(folder))
    if not skip_peer:
        progress("peer (llama_cpp.server)", bench.rows)
        bench.peer(model_path, threads)
    progress("done", bench.rows)

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; llama.cpp extra CPU buffer types "
          f"{'on' if use_extra_buffer_types() else 'off'}; servers on loopback; medians of "
          f"{REPEATS} runs ({runs(BATCH_REPEATS)} for the batch jobs); spectrum_local "
          f"from {Path(spectrum_local.__file__).parent}\n")
    print_table(bench.rows)
    print()
    for note in bench.notes:
        print(note)


if __name__ == "__main__":
    main()
