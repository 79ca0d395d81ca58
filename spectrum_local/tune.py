"""spectrum-local tune: train a LoRA adapter that makes a model match target distributions.

    from spectrum_local.tune import TuneSettings, tune
    result = tune("tasks.jsonl", "my-adapter", settings=TuneSettings(steps=200))  # default base
    # my-adapter/adapter.gguf: spectrum-local score --lora my-adapter/adapter.gguf ...

The input is the ``distribution`` tasks of ``eval``'s task format (messages, candidates,
target_probs). The objective is the paper's: for each prompt, the target-weighted negative
log-likelihood of every candidate followed by the end-of-output token,

    loss = - sum_i target_i * log P(candidate_i, end-of-output | prompt),

which is at least the target's entropy H(target), with equality exactly when the model's
distribution over whole outputs is the target; the log reports the excess over H.

How it is computed (the reason tuning a 270M model takes minutes on a laptop CPU):
- The token sequences are the runtime's own (``SpectrumModel.candidate_reads``, what
  ``score`` reads, tokenizer merges at the boundary included), so the adapter is trained on
  exactly what it will be asked.
- One forward pass per task: the prompt once, then every candidate as a branch that sees the
  prompt and itself only (a 4-D attention mask and explicit positions), as llama.cpp's
  sequences share the prompt's cells.
- Logits only where a candidate token is predicted (``logits_to_keep``): the 262k-token
  output layer would otherwise dominate a small model's cost.

The weights are the GGUF's own (transformers dequantizes gemma3/llama/qwen3 GGUFs), or a
checkpoint folder / hub id (``weights``) when the GGUF is quantized and its float original
is at hand. The run writes to its folder: the PEFT adapter, its GGUF (``convert-lora``),
``log.jsonl`` (one line per logged step), ``checkpoint.pt`` (resume with ``resume=True``)
and ``report.json`` (held-out tasks before and after, with ``eval``'s metrics, measured by
llama.cpp on the base GGUF with and without the new adapter).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import InputError, SpectrumError
from .eval import DistributionTask, load_tasks, run_task
from .metrics import means
from .model import Reads, SpectrumModel, load

# The projections of every attention and MLP block: the same names in all three families.
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECKPOINT, LOG, REPORT, GGUF = "checkpoint.pt", "log.jsonl", "report.json", "adapter.gguf"
# A torch model that disagrees with llama.cpp on the base by more than this on a candidate is
# not the GGUF's model. On F32 they agree to 1e-5; on the default Q4_K_M model by up to 0.5
# nats on a candidate whose end-of-output token is 30 nats unlikely (llama.cpp rounds the
# activations to 8 bits for quantized matmuls, torch multiplies the dequantized weights).
SAME_MODEL_NATS = 2.0


@dataclass(frozen=True)
class TuneSettings:
    rank: int = 16
    alpha: float = 32.0
    learning_rate: float = 1e-3
    steps: int = 200
    batch_size: int = 8          # tasks per optimiser step
    warmup: int = 10             # steps of linear warm-up, then cosine decay to 0
    held_out: float = 0.1        # fraction of the tasks kept out of training (no held-out file)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 50


@dataclass
class TuneResult:
    out: Path
    steps: int
    seconds: float
    train_tasks: int
    held_out_tasks: int
    excess_first: float          # mean excess over the first logged window
    excess_last: float           # ... and over the last one
    before: dict = field(default_factory=dict)  # held-out means: base model
    after: dict = field(default_factory=dict)   # ... base + the new adapter
    agreement: float | None = None  # max |log p| difference, torch+PEFT vs llama.cpp+GGUF

    def summary(self) -> str:
        lines = [f"trained {self.steps} steps on {self.train_tasks} tasks in "
                 f"{self.seconds / 60:.1f} min; excess over the target's entropy "
                 f"{self.excess_first:.3f} -> {self.excess_last:.3f} nats"]
        if self.before:
            lines.append(f"held-out ({self.held_out_tasks} tasks), base -> adapter:")
            for key in self.before:
                lines.append(f"  {key:<16} {self.before[key]:.4g} -> {self.after[key]:.4g}")
        if self.agreement is not None:
            lines.append(f"adapter GGUF vs PEFT on the held-out candidates: max |d log p| "
                         f"{self.agreement:.2g} nats")
        lines.append(f"wrote {self.out / GGUF} (use it with --lora {self.out / GGUF})")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Example:
    """One task as token sequences: the prompt, and the continuations that give each
    candidate's log-probability (``reads.continuations``, combined by ``reads.combine``)."""
    id: str
    tokens: list[int]
    reads: Reads
    target: list[float]
    entropy: float


def tune(tasks: str | os.PathLike, out: str | os.PathLike, *, model: str | None = None,
         weights: str | None = None, held_out: str | os.PathLike | None = None,
         settings: TuneSettings = TuneSettings(), resume: bool = False, threads: int | None = None,
         progress: Callable[[str], None] | None = None) -> TuneResult:
    """Train a LoRA adapter on ``tasks`` (a JSONL file of distribution tasks) into the folder
    ``out``. ``model`` is the base GGUF (the default model's base when None); ``weights`` a
    checkpoint folder or hub id holding the same model in float; ``held_out`` a task file to
    report on instead of a ``settings.held_out`` fraction of ``tasks``."""
    say = progress or (lambda message: None)
    train_tasks, eval_tasks = _split(tasks, held_out, settings)
    if weights:
        _check_weights(weights)
    folder = _out_folder(out, resume)
    base = load(model, no_lora=True)
    try:
        train = [_example(base, t) for t in train_tasks]
        held = [_example(base, t) for t in eval_tasks]
        tokens = sum(len(e.tokens) + sum(len(c) for _, c in e.reads.continuations) for e in train)
        say(f"{len(train)} tasks to train on ({tokens / len(train):.0f} tokens each on "
            f"average, packed), {len(held)} held out")
        torch, peft_model = lora_model(base, weights, settings, threads, say)
        _check_same_model(torch, peft_model, base, held or train)
        run = _run_identity(base, weights, train, settings)
        started = time.monotonic()
        window = _train(torch, peft_model, train, settings, folder, run, resume, say)
        seconds = time.monotonic() - started
        peft_model.save_pretrained(str(folder))
        _write_gguf(folder, base.path, say)
        result = TuneResult(folder, settings.steps, seconds, len(train), len(held),
                            window[0], window[1])
        if held:
            say(f"evaluating {len(held)} held-out tasks with and without the adapter")
            result.before, result.after, result.agreement = _held_out_report(
                torch, peft_model, base, eval_tasks, held, folder)
        report = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
        report["settings"] = asdict(settings)
        from .convert.files import staged

        with staged(folder / REPORT) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        return result
    finally:
        base.close()


# -- inputs -----------------------------------------------------------------------------------

def _out_folder(out: str | os.PathLike, resume: bool) -> Path:
    folder = Path(out)
    if resume:
        if not (folder / CHECKPOINT).is_file():
            raise InputError(f"{folder}: no {CHECKPOINT} to resume from")
        return folder
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(f"{folder} exists and is not an empty folder; choose a new one, or "
                         "pass --resume to continue the run in it")
    if not folder.parent.is_dir():
        raise InputError(f"folder {folder.parent} does not exist")
    folder.mkdir(exist_ok=True)
    return folder


def _check_weights(weights: str) -> None:
    """A checkpoint folder, or a hub id (``owner/name``), before anything is loaded."""
    path = Path(weights).expanduser()
    if path.is_dir():
        return
    if path.exists() or weights.startswith(("/", ".", "~")):
        raise InputError(f"--weights {weights}: not a checkpoint folder (nor a hub id)")


def _split(tasks, held_out, settings: TuneSettings):
    def distribution(path) -> list[DistributionTask]:
        loaded = load_tasks(os.fspath(path))
        kept = [t for t in loaded if isinstance(t, DistributionTask)]
        if len(kept) < len(loaded):
            warnings.warn(f"{path}: {len(loaded) - len(kept)} generation/steerability tasks left "
                          "out (tune uses distribution tasks)", UserWarning, stacklevel=3)
        if not kept:
            raise InputError(f"{path}: no distribution tasks (tune uses those only)")
        return kept

    train = distribution(tasks)
    if held_out is not None:
        return train, distribution(held_out)
    if not 0 <= settings.held_out < 1:
        raise InputError(f"the held-out fraction must be in [0, 1), got {settings.held_out}")
    order = list(range(len(train)))
    random.Random(f"{settings.seed}:held-out").shuffle(order)
    n_held = round(len(train) * settings.held_out)
    if n_held >= len(train):
        raise InputError("no tasks left to train on after the held-out split")
    held = set(order[:n_held])
    return ([t for i, t in enumerate(train) if i not in held],
            [t for i, t in enumerate(train) if i in held])


def _example(base: SpectrumModel, task: DistributionTask) -> _Example:
    tokens, reads = base.candidate_reads(task.messages, task.candidates)
    if len(tokens) + sum(len(c) for _, c in reads.continuations) > base.engine.n_ctx:
        raise InputError(f"task {task.id!r}: its prompt and candidates are longer than the "
                         f"context ({base.engine.n_ctx} tokens)")
    entropy = -sum(p * math.log(p) for p in task.target if p > 0)
    return _Example(str(task.id), tokens, reads, list(task.target), entropy)


# -- the model --------------------------------------------------------------------------------

def lora_model(base: SpectrumModel, weights: str | None, settings: TuneSettings,
               threads: int | None, say):
    """torch, and the base in torch (its GGUF's weights, or ``weights``) with new LoRA layers
    on ``TARGET_MODULES``: what a run trains, and what the tests check the packed loss on."""
    try:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise SpectrumError(f"tune needs its extra: pip install 'spectrum-local[tune]' ({e})") \
            from None
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)
    path = Path(base.path)
    # A CUDA GPU trains in bfloat16 (an 8B model's weights then take 16 GB); the CPU in float32.
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else \
        ("cpu", torch.float32)
    say(f"loading {weights or path.name} into torch ({device}, {dtype})")
    try:
        if weights:
            hf = AutoModelForCausalLM.from_pretrained(weights, dtype=dtype)
        else:  # transformers dequantizes the GGUF's tensors to float
            hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      dtype=dtype)
    except (OSError, ValueError) as e:
        raise SpectrumError(f"transformers cannot load {weights or path}: "
                            f"{str(e).splitlines()[0]}") from None
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                        target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    return torch, get_peft_model(hf.to(device), config)


def packed_logprobs(torch, model, example: _Example) -> list:
    """Each candidate's log P(candidate, end-of-output | prompt) from one forward pass: the
    prompt's tokens up to where the first continuation starts, then each continuation as a
    branch attending to that trunk and to itself, at the positions it would have alone."""
    trunk = min(start for start, _ in example.reads.continuations)
    ids, positions, branch = list(example.tokens[:trunk]), list(range(trunk)), [-1] * trunk
    predictors, targets, owners = [], [], []
    for j, (start, tokens) in enumerate(example.reads.continuations):
        first = len(ids) + start - trunk            # where tokens[0] sits in the pack
        ids += example.tokens[trunk:start] + tokens
        positions += range(trunk, start + len(tokens))
        branch += [j] * (start - trunk + len(tokens))
        predictors += [trunk - 1 if start == trunk else first - 1] + \
            list(range(first, first + len(tokens) - 1))
        targets += tokens
        owners += [j] * len(tokens)
    branch_t, index, position_t = torch.tensor(branch), torch.arange(len(ids)), \
        torch.tensor(positions)
    allowed = (index[None, :] <= index[:, None]) & \
        ((branch_t[None, :] == -1) | (branch_t[None, :] == branch_t[:, None]))
    parameter = next(model.parameters())

    def additive(allowed):
        mask = torch.zeros(allowed.shape, dtype=parameter.dtype)
        return mask.masked_fill(~allowed, torch.finfo(parameter.dtype).min)[None, None] \
            .to(parameter.device)

    config = model.config.get_text_config()
    mask = additive(allowed)
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        # Sliding-window layers also see only the last `sliding_window` positions.
        near = position_t[:, None] - position_t[None, :] < config.sliding_window
        mask = {"full_attention": mask, "sliding_attention": additive(allowed & near)}
    kept, where = torch.unique(torch.tensor(predictors), return_inverse=True)
    device = parameter.device
    logits = model(input_ids=torch.tensor([ids], device=device),
                   position_ids=position_t[None].to(device), attention_mask=mask,
                   logits_to_keep=kept.to(device)).logits[0]
    token_logprobs = torch.log_softmax(logits.float(), dim=-1)[
        where.to(device), torch.tensor(targets, device=device)]
    sums = torch.zeros(len(example.reads.continuations), dtype=token_logprobs.dtype, device=device)
    sums = sums.index_add(0, torch.tensor(owners, device=device), token_logprobs)
    return example.reads.combine(list(sums))


def _loss(torch, model, example: _Example):
    logprobs = packed_logprobs(torch, model, example)
    return -sum(w * lp for w, lp in zip(example.target, logprobs))


def _check_same_model(torch, peft_model, base: SpectrumModel, examples: list[_Example]) -> None:
    """The torch weights must be the GGUF's model: compare one task's log-probabilities."""
    example = examples[0]
    with torch.no_grad():
        ours = [float(x) for x in packed_logprobs(torch, peft_model, example)]
    theirs = example.reads.logprobs(base.engine, example.tokens)
    gap = max(abs(a - b) for a, b in zip(ours, theirs))
    if gap > SAME_MODEL_NATS:
        raise SpectrumError(f"the torch weights disagree with {Path(base.path).name} by {gap:.2f} "
                            "nats on a candidate: --weights must hold the GGUF's own model")


# -- training ---------------------------------------------------------------------------------

def _run_identity(base: SpectrumModel, weights, train: list[_Example],
                  settings: TuneSettings) -> dict:
    """What a checkpoint must match to be resumed."""
    digest = hashlib.sha256(json.dumps(
        [[e.tokens, e.reads.continuations, e.target] for e in train]).encode()).hexdigest()
    return {"base": Path(base.path).name, "weights": weights, "tasks": digest,
            "settings": {k: v for k, v in asdict(settings).items()
                         if k not in ("log_every", "checkpoint_every")}}


def _schedule(settings: TuneSettings) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        done = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.5 * (1 + math.cos(math.pi * done))
    return factor


def _batches(n_tasks: int, settings: TuneSettings, step: int) -> list[int]:
    """The tasks of a step: epochs of seeded shuffles, so a resumed run sees the same ones."""
    first = step * settings.batch_size
    return [_epoch_order(n_tasks, settings.seed, i // n_tasks)[i % n_tasks]
            for i in range(first, first + settings.batch_size)]


@functools.lru_cache(maxsize=2)
def _epoch_order(n_tasks: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n_tasks))
    random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
    return order


def _train(torch, model, train: list[_Example], settings: TuneSettings, folder: Path, run: dict,
           resume: bool, say) -> tuple[float, float]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings))
    step = 0
    if resume:
        state = torch.load(folder / CHECKPOINT, weights_only=False)
        if state["run"] != run:
            raise InputError(f"{folder / CHECKPOINT} is from another run (other tasks, base or "
                             "settings); start a new folder")
        model.load_state_dict(state["adapter"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        say(f"resuming at step {step}/{settings.steps}")
    model.train()
    window: list[float] = []
    logged: list[float] = []
    started, first_step = time.monotonic(), step
    with open(folder / LOG, "a", encoding="utf-8") as log:
        while step < settings.steps:
            optimizer.zero_grad()
            losses, excesses = [], []
            for i in _batches(len(train), settings, step):
                loss = _loss(torch, model, train[i])
                (loss / settings.batch_size).backward()
                losses.append(loss.item())
                excesses.append(losses[-1] - train[i].entropy)
            optimizer.step()
            scheduler.step()
            step += 1
            window += excesses
            if step % settings.log_every == 0 or step == settings.steps:
                excess = sum(window) / len(window)
                logged.append(excess)
                per_step = (time.monotonic() - started) / (step - first_step)
                record = {"step": step, "loss": sum(losses) / len(losses), "excess": excess,
                          "lr": scheduler.get_last_lr()[0], "seconds_per_step": per_step}
                log.write(json.dumps(record) + "\n")
                log.flush()
                say(f"step {step}/{settings.steps}  excess {excess:.3f} nats  "
                    f"{per_step:.2f} s/step  about {per_step * (settings.steps - step) / 60:.0f} "
                    "min left")
                window = []
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                _save_checkpoint(torch, model, optimizer, scheduler, step, run, folder)
    model.eval()
    if not logged:  # resumed at the end: read the log
        logged = [json.loads(line)["excess"] for line in (folder / LOG).read_text().splitlines()]
    return logged[0], logged[-1]


def _save_checkpoint(torch, model, optimizer, scheduler, step, run, folder: Path) -> None:
    from .convert.files import staged

    adapter = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    with staged(folder / CHECKPOINT) as tmp:  # a kill mid-write leaves the last checkpoint
        torch.save({"step": step, "run": run, "adapter": adapter,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp)


# -- outputs ----------------------------------------------------------------------------------

def _write_gguf(folder: Path, base_path: str, say) -> None:
    from .convert.lora import convert_lora

    result = convert_lora(folder, base_path, folder / GGUF, force=True)
    say(result.summary())


def _held_out_report(torch, peft_model, base: SpectrumModel,
                     tasks: Sequence[DistributionTask], held: list[_Example],
                     folder: Path) -> tuple[dict, dict, float]:
    """eval's metrics on the held-out tasks, by llama.cpp, without and with the adapter; and
    how far the GGUF adapter's log-probabilities are from the PEFT model's."""
    tuned = load(base.path, no_lora=True, lora=[(folder / GGUF, 1.0)])
    try:
        before = [run_task(base, t) for t in tasks]
        after = [run_task(tuned, t) for t in tasks]
    finally:
        tuned.close()
    with torch.no_grad():
        gaps = [abs(float(a) - b)
                for example, result in zip(held, after)
                for a, b in zip(packed_logprobs(torch, peft_model, example),
                                result.detail["logprobs"])]
    return means([r.metrics for r in before]), means([r.metrics for r in after]), max(gaps)


