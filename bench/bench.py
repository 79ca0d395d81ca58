"""make bench: spectrum-local against the naive approaches, measured in one process on the
default model. Reports ratios of medians (several runs each), never absolute pass/fail, under a
header naming the CPU: quantized kernels, and so the ratios, differ between CPUs."""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import naive as reference  # noqa: E402
from naive import DEFAULT_LORA, naive_llama, sequence_logprob  # noqa: E402

import spectrum_local  # noqa: E402
from spectrum_local.llama import cpu_name, use_extra_buffer_types  # noqa: E402

# Runs per case: 5, 3 for the slow ones. SPECTRUM_LOCAL_BENCH_REPEATS=N caps every case at N
# runs (bench_serve.py's and the converter's too): the same work measured, fewer runs for the
# medians, for a busy machine where one `make bench` would take an hour.
MAX_REPEATS = int(os.environ.get("SPECTRUM_LOCAL_BENCH_REPEATS", "5"))
if MAX_REPEATS < 1:
    raise SystemExit("SPECTRUM_LOCAL_BENCH_REPEATS is a number of runs, at least 1")
REPEATS = min(5, MAX_REPEATS)


def runs(wanted: int) -> int:
    """``wanted`` runs, capped by SPECTRUM_LOCAL_BENCH_REPEATS."""
    return min(wanted, MAX_REPEATS)


DICE = [{"role": "description", "content": "Roll two six-sided dice. What is the sum of their "
                                           "values? Answer with the number only."}]
DICE += [{"role": "output", "content": v} for v in ("7", "5", "9", "6", "11", "8")]
CANDIDATES = [str(n) for n in range(2, 13)]
# A prompt whose samples run to 24 tokens on the base model (the demo adapter's outputs are one
# or two tokens long whatever the prompt).
STORY = [{"role": "description", "content": "Write a long story, at least a hundred words."},
         {"role": "output", "content": "Once upon a time, in a land of tall mountains and deep "
          "green valleys, there lived an old dragon who guarded a cave full of gold, and every "
          "night the villagers below would hear him singing songs about the stars, the rivers "
          "and the long winters of his youth, when the world was young and wild."}]


def medians(*fns, repeats: int = REPEATS) -> list[float]:
    """Each function's median time over ``repeats`` rounds; the functions take turns within a
    round, so a slow spell of the machine touches all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs(repeats)):
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def long_prompt(final_input: str) -> list[dict]:
    cities = ["Paris", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Tokyo", "Accra", "Hanoi",
              "Rome", "Seoul", "Bern", "Dakar", "Kyiv", "Lagos", "Minsk", "Nairobi", "Riga"]
    messages = [{"role": "description", "content": "Given a capital city, name a famous dish "
                                                   "from its country. Answer with the dish only."}]
    for city in cities:
        messages += [{"role": "input", "content": f"The capital city is {city}, where I am going."},
                     {"role": "output", "content": f"A dish people love in {city}"}]
    return messages + [{"role": "input", "content": final_input}]


def main() -> None:
    model = spectrum_local.load()
    engine = model.engine
    naive = naive_llama(model.path, lora_path=DEFAULT_LORA)
    rows = []

    progress("score", rows)
    # 1-2. score 11 candidates, cold cache each time.
    prompt = model.prompt_tokens(DICE)

    def ours_score():
        engine.clear()
        model.score(DICE, CANDIDATES)

    candidate_tokens = [engine.tokenize(c) + [model.end_of_output_id] for c in CANDIDATES]

    def naive_score():
        for tokens in candidate_tokens:
            sequence_logprob(naive, prompt, tokens)

    all_tokens = prompt + [t for tokens in candidate_tokens for t in tokens[:-1]]

    def raw_decode():
        # The floor: one llama_decode of the prompt and every candidate token, logits only at
        # the candidate positions (what scoring needs), no Python around it.
        engine.clear()
        engine._decoder.decode(all_tokens, range(len(all_tokens)), [(0,)] * len(all_tokens),
                               [i >= len(prompt) - 1 for i in range(len(all_tokens))])

    t_ours, t_naive, t_raw = medians(ours_score, naive_score, raw_decode)
    rows.append((f"score 11 candidates, {len(prompt)}-token prompt",
                 "Llama(logits_all) per candidate", t_ours, t_naive, "speed-up", ">= 8x",
                 t_naive / t_ours))
    rows.append(("same", f"one raw llama_decode of {len(all_tokens)} tokens", t_ours, t_raw,
                 "ours / raw", "<= 1.25", t_ours / t_raw))

    progress("sample", rows)
    # 3-4. sample n=8, 24 new tokens, prompt already cached in all three. The demo adapter's
    # outputs end after one or two tokens on any prompt, while the raw baseline always runs
    # every step: so these rows run the base model alone on every side (no adapter in ours or
    # in Llama) with a prompt whose samples run to max_tokens, and compare time per decoded
    # token (the tokens each variant decoded are counted and shown; equal when all run out).
    rows += sample_rows()

    progress("prefix cache", rows)
    # 5. long prompt, then the same prompt with a new final input.
    first_messages = long_prompt("The capital city is Lisbon, where I am going.")
    second_messages = long_prompt("The capital city is Vienna, where I am going.")
    first_len = len(model.prompt_tokens(first_messages))

    def first_call():
        engine.clear()
        model.score(first_messages, CANDIDATES)

    def second_call():
        first_call()
        start = time.perf_counter()
        model.score(second_messages, CANDIDATES)
        second_times.append(time.perf_counter() - start)

    second_times: list[float] = []
    t_first, _ = medians(first_call, second_call)
    t_second = statistics.median(second_times)
    rows.append((f"score, {first_len}-token prompt, then a new final input", "the first call",
                 t_second, t_first, "second / first", "<= 0.35", t_second / t_first))

    progress("batch job", rows)
    # 6. a batch job whose lines share the long prompt: the cached prefix vs none.
    import json
    import tempfile

    from spectrum_local.batch import run_batch

    finals = [f"The capital city is {c}, where I am going." for c in
              ("Lisbon", "Vienna", "Prague", "Athens", "Havana", "Manila", "Doha", "Baku")]
    lines = [{"id": i, "messages": long_prompt(text)[-1:]} for i, text in enumerate(finals)]
    shared = long_prompt("")[:-1]

    with tempfile.TemporaryDirectory() as folder:
        src = Path(folder, "in.jsonl")
        src.write_text("".join(json.dumps(line) + "\n" for line in lines))

        def batch_job():
            engine.clear()
            Path(folder, "out.jsonl").unlink(missing_ok=True)
            run_batch(model, "score", str(src), str(Path(folder, "out.jsonl")),
                      defaults={"candidates": CANDIDATES}, shared_messages=shared, resume=False,
                      strict=False, report=print, progress=False)

        def no_prefix_cache():
            for line in lines:
                engine.clear()
                model.score(shared + line["messages"], CANDIDATES)

        t_batch, t_cold = medians(batch_job, no_prefix_cache, repeats=3)
    rows.append((f"--batch of {len(lines)} lines sharing a {first_len}-token prefix",
                 "the same lines with no prefix cache", t_batch, t_cold, "speed-up", "> 1",
                 t_cold / t_batch))

    progress("eval steerability", rows)
    # 7. eval's steerability pass (one read per ordering) vs each k scored as its own prompt:
    # by the naive path (a full evaluation per prompt), and by our own score with no cache.
    from spectrum_local.eval import evaluate, load_tasks, run_task

    suite = load_tasks(suite="basic")
    coin = next(t for t in suite if t.id == "biased-coin")
    prompts = []  # (prompt, output + end-of-output) per ordering and k
    for examples in coin.orders(0):
        messages = coin.messages(examples)
        outputs = [i for i, m in enumerate(messages) if m["role"] == "output"]
        prompts += [(messages[:outputs[k]], messages[outputs[k]]["content"]) for k in coin.k]

    def steerability_pass():
        engine.clear()
        run_task(model, coin)

    def naive_each_k():
        for messages, output in prompts:
            reference.naive_score(model, naive, messages, output)

    def score_each_k():
        for messages, output in prompts:
            engine.clear()
            model.score(messages, [output])

    t_pass, t_naive, t_alone = medians(steerability_pass, naive_each_k, score_each_k, repeats=3)
    case = f"eval steerability, {coin.orderings} orderings x k {list(coin.k)}"
    rows.append((case, "each k's prompt: Llama(logits_all)", t_pass, t_naive, "speed-up",
                 ">= 3x", t_naive / t_pass))
    rows.append(("same", "each k's prompt: our score, no cache", t_pass, t_alone, "speed-up",
                 "", t_alone / t_pass))

    progress("eval suite", rows)
    # 8. the whole built-in suite, once (its wall time is the number; no baseline).
    engine.clear()
    start = time.perf_counter()
    evaluate(model, suite, progress=False)
    rows.append((f"eval --suite basic ({len(suite)} tasks)", "-", time.perf_counter() - start,
                 "-", "wall time", "", "-"))

    progress("tune step", rows)
    # 9. a tune step's loss and gradients: the packed pass (the prompt once, candidates as
    # masked branches, logits only where a candidate token is predicted) vs the plain way, each
    # candidate's sequence on its own with every position's logits.
    rows.append(tune_row(model, suite))

    progress("score over the trie, enumerate", rows)
    # 10-14. score over a token trie; enumerate against sampling (see bench_exact.py).
    import bench_exact

    rows += bench_exact.score_rows(model, medians)
    rows += bench_exact.enumerate_rows(model)

    progress("converter", rows)
    # 15-16. the converter against llama.cpp's own (its own processes; see bench_convert.py).
    import bench_convert

    rows += bench_convert.rows()

    progress("done", rows)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; llama.cpp extra CPU buffer types "
          f"{'on' if use_extra_buffer_types() else 'off'}; medians of {REPEATS} runs "
          f"({runs(3)} for the batch job, the steerability pass, the tune step and the "
          f"converter); spectrum_local from "
          f"{Path(spectrum_local.__file__).parent}\n")
    print_table(rows)


_START = time.perf_counter()
_shown = 0


def progress(what: str, rows: list = ()) -> None:
    """Which case runs, on stderr, after the rows measured since the last call (so that a run
    stopped part-way still leaves its finished rows; the table comes at the end)."""
    global _shown
    for case, base, _, _, measure, _, ratio in rows[_shown:]:
        ratio = ratio if isinstance(ratio, str) else f"{ratio:.2f}"
        print(f"  {case} | {base} | {measure} {ratio}", file=sys.stderr)
    _shown = max(_shown, len(rows))
    print(f"[{time.perf_counter() - _START:5.0f} s] {what}", file=sys.stderr, flush=True)


def per_token_medians(*fns, repeats: int = REPEATS) -> list[tuple[float, float, float]]:
    """Like ``medians`` for functions that return the number of tokens they decoded: each
    one's (median seconds per decoded token, median seconds, mean tokens per run)."""
    times: list[list[float]] = [[] for _ in fns]
    tokens: list[list[int]] = [[] for _ in fns]
    for _ in range(runs(repeats)):
        for fn, fn_times, fn_tokens in zip(fns, times, tokens):
            start = time.perf_counter()
            decoded = fn()
            fn_times.append(time.perf_counter() - start)
            fn_tokens.append(decoded)
    return [(statistics.median(t / n for t, n in zip(ts, ns)), statistics.median(ts),
             statistics.mean(ns)) for ts, ns in zip(times, tokens)]


def sample_rows(n: int = 8, new_tokens: int = 24) -> list[tuple]:
    """Sampling n sequences of ``new_tokens`` over a cached prompt: ours (one batch per step)
    against n sequential Llama.create_completion calls and against the bare batched decode
    steps. The default model's base alone on every side, loaded here and closed after."""
    model = spectrum_local.load(no_lora=True)
    engine = model.engine
    naive = naive_llama(model.path)
    prompt = model.prompt_tokens(STORY)
    rounds = itertools.count()

    def ours_sample():
        samples = model.sample(STORY, n=n, max_tokens=new_tokens, seed=next(rounds))
        return sum(s.n_tokens for s in samples)

    def naive_sample():
        return sum(naive.create_completion(
            prompt, max_tokens=new_tokens, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
            repeat_penalty=1.0, seed=i)["usage"]["completion_tokens"] for i in range(n))

    def raw_steps():
        engine.prompt_logits(prompt)
        context = engine._ctx
        for seq in range(1, n + 1):
            context.seq_cp(0, seq)
        for step in range(new_tokens):
            engine._decoder.decode([prompt[-1]] * n, [len(prompt) + step] * n,
                                   [(seq,) for seq in range(1, n + 1)], [True] * n)
        for seq in range(1, n + 1):  # drop the scratch sequences
            context.seq_rm(seq)
        return n * new_tokens

    try:
        model.sample(STORY, n=1, max_tokens=1)  # warm the prompt caches
        naive.create_completion(prompt, max_tokens=1)
        ours, theirs, raw = per_token_medians(ours_sample, naive_sample, raw_steps)
    finally:
        naive.close()
        model.close()
    return [
        (f"sample n={n}, {new_tokens} new tokens, base model (tokens per sample: ours "
         f"{ours[2] / n:.1f}, Llama {theirs[2] / n:.1f})", f"{n} sequential "
         "Llama.create_completion", ours[1], theirs[1], "speed-up per token", ">= 1.8x",
         theirs[0] / ours[0]),
        ("same", f"{new_tokens} raw batched llama_decode steps, no sampling", ours[1], raw[1],
         "ours / raw per token", "<= 1.25", ours[0] / raw[0]),
    ]


def tune_row(model, suite) -> tuple:
    import torch

    from spectrum_local import tune
    from spectrum_local.eval import DistributionTask

    tasks = [t for t in suite if isinstance(t, DistributionTask)][:4]
    examples = [tune._example(model, t) for t in tasks]
    _, peft = tune.lora_model(model, None, tune.TuneSettings(), None, lambda line: None)

    def packed():
        peft.zero_grad()
        for example in examples:
            tune._loss(torch, peft, example).backward()

    def plain():
        peft.zero_grad()
        for example in examples:
            sums = []
            for start, tokens in example.reads.continuations:
                ids = example.tokens[:start] + tokens
                logprobs = torch.log_softmax(peft(input_ids=torch.tensor([ids])).logits[0], -1)
                sums.append(logprobs[torch.arange(start - 1, len(ids) - 1), tokens].sum())
            loss = -sum(w * lp for w, lp in zip(example.target, example.reads.combine(sums)))
            loss.backward()

    t_packed, t_plain = medians(packed, plain, repeats=3)
    n = sum(len(t.candidates) for t in tasks)
    return (f"tune: loss + gradients, {len(tasks)} suite tasks ({n} candidates), default model",
            "each candidate alone, all logits", t_packed, t_plain, "speed-up", "", t_plain / t_packed)


def print_table(rows) -> None:
    """Rows of (case, baseline, ours, baseline value, measure, target, ratio); times in seconds
    are shown in ms, ratios with two decimals, strings as they are."""
    def ms(value) -> str:
        return value if isinstance(value, str) else f"{value * 1e3:.1f} ms"

    def ratio_text(value) -> str:
        return value if isinstance(value, str) else f"{value:.2f}"

    header = ("case", "baseline", "ours", "baseline", "measure", "target", "result")
    table = [header] + [(case, base, ms(ours), ms(ref), what, target, ratio_text(ratio))
                        for case, base, ours, ref, what, target, ratio in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


if __name__ == "__main__":
    main()
