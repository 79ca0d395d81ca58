"""What quantization costs a spectrum model: a random-weight Gemma 3 checkpoint, wide enough
for quantization to mean something (hidden 1024, intermediate 4096, llama.cpp's K-quant
block sizes), converted to F32, Q8_0 and Q4_K_M, and each quantized GGUF compared with the F32
one on the built-in suite (``spectrum-local eval --suite basic --vs``).

Per quantized type, one row of a Markdown table on stdout:
- size: the GGUF file;
- logit error: RMS change of the first output token's logits (each row centred: logits are
  defined up to a constant) relative to the F32 logits' spread, averaged over the tasks; a
  scale-free measure, the one that carries over best to a trained model (see below);
- JS(F32, q): Jensen-Shannon divergence between the two models' candidate distributions,
  mean and max over the distribution tasks;
- first-token KL(F32 || q): over both models' top-20 tokens, mean over all tasks;
- |Δ JS to target|: how much quantization moves the distribution tasks' score;
- |Δ log coverage|: the change of the probability mass on the candidates, in log space
  (a random model's coverages are tiny);
- |Δ loss|: steerability tasks, the loss of the last example given the others, in nats;
- same samples: generation tasks, the share of the samples that are the same text under the
  same seed (the fraction of valid answers is printed under the table: a random model's
  answers are rarely valid);
- time: wall time of the comparison (both models, every task).

Caveat: at the default depth a random model is close to uniform (its first-token entropy,
printed under the table, is near ln(vocabulary); logits spread by well under a nat), so the
absolute divergences are much smaller than a trained, peaked model's would be at the same
logit error. Its Gaussian weights also lack the outliers of trained weights, which widen a
block's scale and so quantize worse: both flatter quantization here.

    .venv/bin/python scripts/quantization_report.py [--layers N] [--work DIR]

--work keeps the checkpoint and the GGUFs in DIR (a new or empty folder); by default they are
made in a temporary folder and deleted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import tiny_checkpoints  # noqa: E402 - the test helpers build the checkpoint

import spectrum_local  # noqa: E402
from spectrum_local.backend import logsumexp  # noqa: E402
from spectrum_local.convert import convert  # noqa: E402
from spectrum_local.llama import cpu_name  # noqa: E402
from spectrum_local.eval import evaluate, load_tasks, task_prompt  # noqa: E402

QUANTIZED = ("q8_0", "q4_k_m")
CTX = 2048
COLUMNS = ("type", "size (MiB)", "logit error", "JS(F32, q) mean / max", "first-token KL",
           "\\|Δ JS to target\\|", "\\|Δ log coverage\\|", "\\|Δ loss\\| (nats)", "same samples",
           "time (s)")


def build(work: Path, n_layers: int) -> tuple[Path, dict[str, Path]]:
    """The wide checkpoint (seeded, with the small Gemma 3's trained tokenizer) and its GGUFs."""
    small = tiny_checkpoints.build_gemma3(work / "gemma3-small")
    wide = tiny_checkpoints.build_gemma3_wide(small, work / "gemma3-wide", n_layers)
    ggufs = {}
    for outtype in ("f32", *QUANTIZED):
        ggufs[outtype] = work / f"gemma3-wide-{outtype}.gguf"
        convert(wide, ggufs[outtype], outtype, progress=False)
    return wide, ggufs


def shape_line(folder: Path) -> str:
    from safetensors import safe_open

    c = json.loads((folder / "config.json").read_text())
    with safe_open(folder / "model.safetensors", "np") as f:
        params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    return (f"checkpoint: random-weight Gemma 3 (seed {tiny_checkpoints.SEED}), "
            f"{c['num_hidden_layers']} layers, hidden {c['hidden_size']}, intermediate "
            f"{c['intermediate_size']}, {c['num_attention_heads']} heads "
            f"({c['num_key_value_heads']} KV) of {c['head_dim']}, vocabulary {c['vocab_size']}, "
            f"{params / 1e6:.1f} M parameters")


def first_token_logits(model, tasks) -> list[np.ndarray]:
    return [model.engine.prompt_logits(model.prompt_tokens(task_prompt(t))).astype(np.float64)
            for t in tasks]


def logit_error(reference: list[np.ndarray], rows: list[np.ndarray]) -> float:
    errors = [np.sqrt(np.mean((r - r.mean() - (f - f.mean())) ** 2)) / f.std()
              for f, r in zip(reference, rows)]
    return float(np.mean(errors))


def same_samples(record: dict) -> float:
    """The share of samples with the same text in both models' answers (a histogram overlap;
    with the same seed, samples that agree token by token)."""
    counts = [Counter({x["text"]: x["count"] for x in record[side]["answers"]})
              for side in ("a", "b")]
    return sum((counts[0] & counts[1]).values()) / record["a"]["n"]


def table_row(outtype: str, size: int, error: float, d: dict, seconds: float) -> list[str]:
    by_type = {kind: [r for r in d["tasks"] if r["type"] == kind]
               for kind in ("distribution", "generation", "steerability")}
    dist = by_type["distribution"]
    js = [r["js_between"] for r in dist]
    log_coverage = [abs(float(logsumexp(np.array(r["b"]["logprobs"])))
                        - float(logsumexp(np.array(r["a"]["logprobs"])))) for r in dist]
    return [outtype.upper(), f"{size / 2**20:.1f}", f"{error:.3f}",
            f"{np.mean(js):.2e} / {max(js):.2e}",
            f"{np.mean([r['first_token_kl'] for r in d['tasks']]):.2e}",
            f"{np.mean([abs(r['diff']['js_divergence']) for r in dist]):.2e}",
            f"{np.mean(log_coverage):.3f}",
            f"{np.mean([abs(r['diff']['last_loss']) for r in by_type['steerability']]):.3f}",
            f"{np.mean([same_samples(r) for r in by_type['generation']]):.0%}",
            f"{seconds:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    parser.add_argument("--work", type=Path, help="keep the checkpoint and GGUFs in this new "
                                                  "or empty folder")
    args = parser.parse_args()
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    if args.work and args.work.exists() and any(args.work.iterdir()):
        parser.error(f"{args.work} is not empty")
    work = args.work or Path(tempfile.mkdtemp(prefix="quantization-report-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        print(f"building and converting the checkpoint in {work} ...", file=sys.stderr)
        wide, ggufs = build(work, args.layers)
        tasks = load_tasks(suite="basic")
        reference = spectrum_local.load(str(ggufs["f32"]), ctx=CTX)
        reference_rows = first_token_logits(reference, tasks)
        rows, valid = [], {}
        for outtype in QUANTIZED:
            print(f"comparing F32 with {outtype.upper()} ...", file=sys.stderr)
            quantized = spectrum_local.load(str(ggufs[outtype]), ctx=CTX)
            error = logit_error(reference_rows, first_token_logits(quantized, tasks))
            began = time.perf_counter()
            d = evaluate(reference, tasks, vs=quantized, progress=False).to_dict()
            seconds = time.perf_counter() - began
            rows.append(table_row(outtype, ggufs[outtype].stat().st_size, error, d, seconds))
            generation = d["summary"]["generation"]
            valid.setdefault("F32", generation["a"]["valid_fraction"])
            valid[outtype.upper()] = generation["b"]["valid_fraction"]
            quantized.close()  # frees its weights before the next one loads

        lse = [logsumexp(f) for f in reference_rows]
        entropy = np.mean([-np.sum(np.exp(f - z) * (f - z)) for f, z in zip(reference_rows, lse)])
        print(f"machine: {cpu_name()}")
        print(shape_line(wide))
        print(f"F32: {ggufs['f32'].stat().st_size / 2**20:.1f} MiB; {len(tasks)} tasks of the "
              "basic suite, default settings (seed 0, end-of-output token)")
        print()
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "|".join("---" if c == "type" else "---:" for c in COLUMNS) + "|")
        for cells in rows:
            print("| " + " | ".join(cells) + " |")
        print()
        print("generation, mean valid fraction: "
              + ", ".join(f"{name} {value:.2f}" for name, value in valid.items()))
        print(f"F32 first-token entropy {entropy:.2f} nats (uniform: "
              f"{np.log(len(reference_rows[0])):.2f}), logit spread (std) "
              f"{np.mean([f.std() for f in reference_rows]):.2f} nats")
        print(f"total: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
