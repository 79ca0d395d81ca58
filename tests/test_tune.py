"""spectrum-local tune: the packed loss against llama.cpp, training on a tiny checkpoint, the
adapter it writes against the PEFT model it trained, resume, and refusals.

The references are independent of the packing: llama.cpp's F32 engine scoring each candidate
(the runtime's own numbers) and transformers reading each candidate's sequence on its own.
Measured on the tiny F32 checkpoints (max |d log p| per candidate, packed vs llama.cpp):
gemma3 1.5e-5, llama3 and qwen3 below 1e-6; vs unpacked transformers about 1e-6.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import spectrum_local
from spectrum_local import tune as tuning
from spectrum_local.errors import InputError

sys.path.insert(0, str(Path(__file__).parent))
from conftest import EXACT, PROMPTS  # noqa: E402

FAMILIES = ("gemma3", "llama3", "qwen3")


def dice_tasks(path: Path, n: int = 6) -> Path:
    """Distribution tasks the tiny tokenizers spell: sums of dice with various sides."""
    lines = []
    for i in range(n):
        sides = 2 + i % 4
        sums = {}
        for a in range(1, sides + 1):
            for b in range(1, sides + 1):
                sums[a + b] = sums.get(a + b, 0) + 1
        total = sides * sides
        lines.append({"id": f"dice-{i}", "type": "distribution",
                      "messages": [{"role": "description",
                                    "content": f"Roll two {sides}-sided dice; what is the sum?"}],
                      "candidates": [str(s) for s in sums],
                      "target_probs": [c / total for c in sums.values()]})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def torch_logprobs(model, peft, messages, candidates) -> list[float]:
    """The packed loss's candidate log-probabilities, on ``model``'s tokens."""
    tokens, reads = model.candidate_reads(messages, candidates)
    example = tuning._Example("x", tokens, reads, [], 0.0)
    with torch.no_grad():
        return [float(x) for x in tuning.packed_logprobs(torch, peft, example)]


@pytest.fixture(scope="module")
def torch_models(checkpoints, f32_models):
    """family -> a PEFT model (random B, so the adapter matters) on the tiny checkpoint."""
    models = {}
    for family in FAMILIES:
        base = f32_models[family]
        _, peft = tuning.lora_model(base, str(checkpoints[family]),
                                    tuning.TuneSettings(rank=4, alpha=8), None, lambda m: None)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        peft.eval()
        models[family] = peft
    return models


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_packed_logprobs_match_transformers_one_candidate_at_a_time(family, prompt, f32_models,
                                                                   torch_models):
    base, peft = f32_models[family], torch_models[family]
    messages, candidates = PROMPTS[prompt]
    packed = torch_logprobs(base, peft, messages, candidates)
    tokens, reads = base.candidate_reads(messages, candidates)
    with torch.no_grad():
        sums = []
        for start, continuation in reads.continuations:
            ids = tokens[:start] + continuation
            logprobs = torch.log_softmax(peft(input_ids=torch.tensor([ids])).logits[0], -1)
            sums.append(sum(float(logprobs[start - 1 + k, t]) for k, t in enumerate(continuation)))
    alone = reads.combine(sums)
    assert max(abs(a - b) for a, b in zip(packed, alone)) < 1e-4
    # The few-shot candidates include ones the tokenizer merges into the prompt's text.
    assert len(packed) == len(candidates)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logprobs_match_llama_cpp_on_the_base(family, f32_models, checkpoints):
    base = f32_models[family]
    _, peft = tuning.lora_model(base, str(checkpoints[family]), tuning.TuneSettings(rank=4),
                                None, lambda m: None)
    for messages, candidates in PROMPTS.values():
        packed = torch_logprobs(base, peft, messages, candidates)
        scored = [c.logprob for c in base.score(messages, candidates).candidates]
        assert max(abs(a - b) for a, b in zip(packed, scored)) < EXACT


@pytest.fixture(scope="module")
def tuned(checkpoints, f32, tmp_path_factory):
    """A real `spectrum-local tune` run on the tiny Gemma 3: 16 steps, through the CLI."""
    root = tmp_path_factory.mktemp("tune")
    tasks = dice_tasks(root / "tasks.jsonl")
    held = dice_tasks(root / "held.jsonl", n=2)
    out = root / "adapter"
    proc = subprocess.run(
        [sys.executable, "-m", "spectrum_local", "tune", str(tasks), "-o", str(out),
         "--model", str(f32["gemma3"]), "--weights", str(checkpoints["gemma3"]),
         "--held-out", str(held), "--steps", "16", "--batch-size", "3", "--lr", "0.01",
         "--rank", "4", "--alpha", "8"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_tune_loss_falls_and_writes_everything(tuned):
    out, proc = tuned
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter.gguf", "log.jsonl",
                 "checkpoint.pt", "report.json"):
        assert (out / name).is_file(), name
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 16]
    report = json.loads((out / "report.json").read_text())
    assert report["excess_last"] < 0.7 * report["excess_first"]
    assert all(r["excess"] >= 0 for r in log)  # the loss is never below the target's entropy
    # The held-out tasks are other dice of the same kind: the adapter brings them closer.
    assert report["after"]["js_divergence"] < report["before"]["js_divergence"]
    assert report["after"]["coverage"] > report["before"]["coverage"]
    assert "excess over the target's entropy" in proc.stdout
    assert "step 16/16" in proc.stderr


def test_tuned_gguf_reproduces_the_peft_model(tuned, checkpoints, f32):
    """The adapter.gguf in llama.cpp gives the trained PEFT model's log-probabilities."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = tuned
    hf = AutoModelForCausalLM.from_pretrained(checkpoints["gemma3"], dtype=torch.float32)
    peft = PeftModel.from_pretrained(hf, out).eval()
    assert any(float(p.abs().max()) > 0 for n, p in peft.named_parameters() if "lora_B" in n)
    base = spectrum_local.load(str(f32["gemma3"]), ctx=1024)
    adapted = spectrum_local.load(str(f32["gemma3"]), ctx=1024, lora=[(out / "adapter.gguf", 1)])
    try:
        moved = 0.0
        for messages, candidates in PROMPTS.values():
            packed = torch_logprobs(adapted, peft, messages, candidates)
            ours = [c.logprob for c in adapted.score(messages, candidates).candidates]
            before = [c.logprob for c in base.score(messages, candidates).candidates]
            assert max(abs(a - b) for a, b in zip(packed, ours)) < EXACT
            moved = max(moved, max(abs(a - b) for a, b in zip(ours, before)))
        assert moved > 0.05  # the adapter is not a no-op
    finally:
        base.close()
        adapted.close()
    report = json.loads((out / "report.json").read_text())
    assert report["agreement"] < EXACT


def test_resume_after_an_interruption_ends_where_an_uninterrupted_run_does(
        checkpoints, f32, tmp_path):
    tasks = dice_tasks(tmp_path / "tasks.jsonl")
    settings = tuning.TuneSettings(rank=4, alpha=8, steps=6, batch_size=2, learning_rate=0.01,
                                   held_out=0.0, log_every=1, checkpoint_every=3)
    common = dict(model=str(f32["gemma3"]), weights=str(checkpoints["gemma3"]), settings=settings)
    whole = tuning.tune(tasks, tmp_path / "whole", **common)

    def stop_at_step_5(line):
        if line.startswith("step 5/"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        tuning.tune(tasks, tmp_path / "cut", progress=stop_at_step_5, **common)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"] == 3
    lines = []
    resumed = tuning.tune(tasks, tmp_path / "cut", resume=True, progress=lines.append, **common)
    assert "resuming at step 3/6" in lines
    a = load_file(whole.out / "adapter_model.safetensors")
    b = load_file(resumed.out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    # A checkpoint is only resumed by the run that wrote it.
    other = tuning.TuneSettings(**{**settings.__dict__, "learning_rate": 0.02})
    with pytest.raises(InputError, match="another run"):
        tuning.tune(tasks, tmp_path / "cut", resume=True, **{**common, "settings": other})


def test_refusals(f32, tmp_path):
    tasks = dice_tasks(tmp_path / "tasks.jsonl")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not an empty folder"):
        tuning.tune(tasks, tmp_path / "full", model=str(f32["gemma3"]))
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(InputError, match="no checkpoint.pt"):
        tuning.tune(tasks, tmp_path / "new", model=str(f32["gemma3"]), resume=True)
    generation = tmp_path / "gen.jsonl"
    generation.write_text(json.dumps({"id": 1, "type": "generation", "messages": [
        {"role": "description", "content": "a state"}], "valid": ["Ohio"]}) + "\n")
    with pytest.raises(InputError, match="no distribution tasks"):
        tuning.tune(generation, tmp_path / "gen", model=str(f32["gemma3"]))


def test_weights_of_another_model_are_refused(checkpoints, f32, tmp_path):
    """The tiny Gemma's weights scaled: same shapes, another model."""
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(checkpoints["gemma3"])
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    other.save_pretrained(tmp_path / "other")
    tasks = dice_tasks(tmp_path / "tasks.jsonl")
    with pytest.raises(spectrum_local.SpectrumError, match="disagree"):
        tuning.tune(tasks, tmp_path / "out", model=str(f32["gemma3"]),
                    weights=str(tmp_path / "other"))


def test_cli_errors_are_one_line(f32, tmp_path):
    tasks = dice_tasks(tmp_path / "tasks.jsonl")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "type": "distribution"}\n')
    for args in (["--out", str(tmp_path / "full")], ["--out", str(tmp_path / "a"), "--resume"],
                 ["--out", str(tmp_path / "w"), "--weights", str(tasks)]):
        proc = subprocess.run([sys.executable, "-m", "spectrum_local", "tune", str(tasks),
                               "--model", str(f32["gemma3"]), *args],
                              capture_output=True, text=True)
        assert proc.returncode != 0
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "spectrum_local", "tune", str(bad), "-o",
                           str(tmp_path / "b")], capture_output=True, text=True)
    assert proc.returncode != 0 and "line 1" in proc.stderr and "Traceback" not in proc.stderr
