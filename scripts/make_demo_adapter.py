"""Train the default model's demo adapter: `make demo-adapter`.

The default model is Gemma 3 270M, a base model that never ends an output turn, so on its own
it gives every candidate answer a probability near 1e-15 and the wrong shape. This script
makes synthetic distribution tasks with exact targets (scripts/demo_tasks.py: sums of dice,
coins, numbers, lists, rating scales, urns, inputs; seeded), trains a LoRA adapter on them with
`spectrum-local tune` on the base model's own (dequantized Q4_K_M) weights, and ships it as
spectrum_local/adapters/gemma3-270m-spectrum-demo.gguf.

    python scripts/make_demo_adapter.py [WORK_DIR]     # default: build/demo-adapter

The work folder keeps the task files, the PEFT adapter, log.jsonl and report.json (held-out
tasks before and after, by llama.cpp). docs/adapters.md quotes this run's log and numbers. The
product's dice prompt ("Roll two six-sided dice. What is the sum of their values?") is not in
the training data (demo_tasks.py checks it).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import demo_tasks  # noqa: E402

from spectrum_local import load  # noqa: E402
from spectrum_local.source import DEFAULT_ADAPTER  # noqa: E402
from spectrum_local.tune import TuneSettings, tune  # noqa: E402

SEED = 0
N_TRAIN = 3000
SETTINGS = TuneSettings(rank=16, alpha=32, learning_rate=1.5e-3, steps=300, batch_size=8,
                        warmup=20, seed=SEED, log_every=10, checkpoint_every=20)
DICE = [{"role": "description",
         "content": "Roll two six-sided dice. What is the sum of their values?"}]


def write_jsonl(path: Path, tasks: list[dict]) -> Path:
    path.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks),
                    encoding="utf-8")
    return path


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "demo-adapter"
    work.mkdir(parents=True, exist_ok=True)
    train, held_out = demo_tasks.make_tasks(SEED, N_TRAIN)
    tasks = write_jsonl(work / "train.jsonl", train)
    held = write_jsonl(work / "held_out.jsonl", held_out)
    out = work / "adapter"
    resume = (out / "checkpoint.pt").is_file()
    result = tune(tasks, out, held_out=held, settings=SETTINGS, resume=resume,
                  progress=lambda line: print(line, flush=True))
    print(result.summary())

    # Shipped as trained (F32, 15 MB): an F16 copy moved the dice log-probs by 0.14 nats.
    incoming = DEFAULT_ADAPTER.with_name("incoming.gguf")
    shutil.copyfile(out / "adapter.gguf", incoming)
    incoming.replace(DEFAULT_ADAPTER)
    dice = load(None).score(DICE, [str(n) for n in range(2, 13)])
    print(f"shipped {DEFAULT_ADAPTER} ({DEFAULT_ADAPTER.stat().st_size / 1e6:.1f} MB)")
    best = dice.best()
    print(f"the dice prompt with the shipped adapter: coverage {dice.coverage:.3f}, most likely "
          f"sum {best.text} ({best.normalized:.3f}): "
          + " ".join(f"{c.text}:{c.normalized:.3f}" for c in dice.candidates))


if __name__ == "__main__":
    main()
