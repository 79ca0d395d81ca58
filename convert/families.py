"""The supported architectures: their GGUF hyper-parameters and tensor layout.

Facts follow llama.cpp's own converter (convert_hf_to_gguf.py) and loader: Gemma's RMSNorm
weights are stored as (1 + w), Llama's Q/K rows are permuted from Hugging Face's rotate-half
layout to llama.cpp's interleaved rope, Llama 3's rope scaling becomes a ``rope_freqs`` tensor.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import gguf
import numpy as np
from gguf.utility import LocalTensor

from spectrum_local.errors import InputError

from .checkpoint import Checkpoint

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: where its data comes from and how it is changed on the way."""

    name: str                      # GGUF name, e.g. blk.0.attn_q.weight
    shape: tuple[int, ...]         # numpy order (rows first)
    source: LocalTensor | None     # None for tensors the converter computes (``data``)
    data: np.ndarray | None = None
    transform: Transform | None = None  # applied in float32
    keep_f32: bool = False         # llama.cpp wants 1-D tensors and norms in F32

    @property
    def n_params(self) -> int:
        return math.prod(self.shape)


class _Config(dict):
    """Hyper-parameters: a key missing from config.json is the checkpoint's fault, said so in one
    line, not a KeyError traceback from wherever it is first read."""

    def __missing__(self, key: str):
        raise InputError(f"config.json has no {key!r}, which this architecture needs")


class Family:
    """Base for one Hugging Face architecture family."""

    arch: gguf.MODEL_ARCH
    format: str                      # the spectrum format of its released fine-tunes
    hf_architectures: tuple[str, ...]
    tokenizer: str                   # "spm" (SentencePiece) or "bpe" (byte-level BPE)
    # every block's GGUF tensors (suffixes of blk.N.), checked so that a checkpoint missing one
    # fails here rather than writing a GGUF that llama.cpp refuses to load
    layer_tensors: tuple[str, ...] = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                      "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
    bpe_pre: str | None = None       # llama.cpp's pre-tokenizer name for BPE vocabularies
    defaults: dict[str, Any] = {}    # config values transformers assumes when a key is absent
    default_rope_theta = 10000.0

    def __init__(self, config: dict[str, Any]):
        text_config = config.get("text_config", config)
        if not isinstance(text_config, dict):
            raise InputError("config.json: text_config is not an object")
        self.hp = _Config({**self.defaults, **text_config})
        self.n_layers: int = self.hp["num_hidden_layers"]
        self.n_head: int = self.hp["num_attention_heads"]
        self.n_head_kv: int = self.hp.get("num_key_value_heads", self.n_head)
        self.head_dim: int = self.hp.get("head_dim") or self.hp["hidden_size"] // self.n_head
        self.tied: bool = self.hp.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
        self.name_map = gguf.get_tensor_name_map(self.arch, self.n_layers)

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    # --- hyper-parameters -----------------------------------------------------------------

    def rope(self) -> dict[str, Any]:
        """Rope settings of the global-attention layers: rope_theta plus any scaling keys."""
        params = self.hp.get("rope_parameters") or self.hp.get("rope_scaling") or {}
        params = dict(params.get("full_attention", params))
        params.setdefault("rope_theta", self.hp.get("rope_theta", self.default_rope_theta))
        params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
        return params

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        hp = self.hp
        w.add_block_count(self.n_layers)
        w.add_context_length(hp["max_position_embeddings"])
        w.add_embedding_length(hp["hidden_size"])
        w.add_feed_forward_length(hp["intermediate_size"])
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_key_length(self.head_dim)
        w.add_value_length(self.head_dim)
        w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
        rope = self.rope()
        w.add_rope_freq_base(rope["rope_theta"])
        if rope["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        elif rope["rope_type"] not in self.rope_types():
            raise InputError(f"rope scaling {rope['rope_type']!r} is not supported for "
                             f"{self.arch_name} (supported: {', '.join(self.rope_types())})")

    def rope_types(self) -> tuple[str, ...]:
        return ("default", "linear")

    # --- tensors --------------------------------------------------------------------------

    def text_name(self, name: str) -> str | None:
        """The checkpoint name as a plain causal-LM name, or None for tensors to leave out."""
        return name

    def transform(self, hf_name: str) -> Transform | None:
        return None

    def extra_tensors(self) -> list[tuple[str, np.ndarray]]:
        return []

    def plan(self, ckpt: Checkpoint) -> list[TensorPlan]:
        plans = [TensorPlan(name, data.shape, None, data, keep_f32=True)
                 for name, data in self.extra_tensors()]
        for ckpt_name, tensor in ckpt.tensors.items():
            hf_name = self.text_name(ckpt_name)
            if hf_name is None or (hf_name == "lm_head.weight" and self.tied):
                continue  # tied output: llama.cpp reuses token_embd
            name = self.name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise InputError(f"unexpected tensor {ckpt_name} in a {self.arch_name} checkpoint")
            keep_f32 = len(tensor.shape) <= 1 or name.endswith("_norm.weight")
            plans.append(TensorPlan(name, tuple(tensor.shape), tensor,
                                    transform=self.transform(hf_name), keep_f32=keep_f32))
        names = {p.name for p in plans}
        if "token_embd.weight" not in names:
            raise InputError("the checkpoint has no token embedding (model.embed_tokens.weight)")
        if not self.tied and "output.weight" not in names:
            raise InputError("config says tie_word_embeddings=false but there is no lm_head.weight")
        self._check_complete(names)
        return sorted(plans, key=lambda p: _natural_key(p.name))

    def _check_complete(self, names: set[str]) -> None:
        expected = {"output_norm.weight"} | {f"blk.{i}.{t}.weight" for i in range(self.n_layers)
                                             for t in self.layer_tensors}
        # (tensors of layers beyond n_layers already fail the name map above)
        missing = sorted(expected - names, key=_natural_key)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise InputError(f"the checkpoint lacks tensors of its {self.n_layers}-layer "
                             f"{self.arch_name} model (GGUF names): {', '.join(missing[:3])}{more}")

    def n_vocab(self, plans: list[TensorPlan]) -> int:
        return next(p.shape[0] for p in plans if p.name == "token_embd.weight")


def _natural_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


class Llama(Family):
    arch = gguf.MODEL_ARCH.LLAMA
    format = "llama3"
    hf_architectures = ("LlamaForCausalLM",)
    tokenizer = "bpe"
    bpe_pre = "llama-bpe"

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_vocab_size(self.hp["vocab_size"])
        w.add_rope_dimension_count(self.head_dim)

    def rope_types(self) -> tuple[str, ...]:
        return ("default", "linear", "llama3")

    def transform(self, hf_name: str) -> Transform | None:
        # Hugging Face stores Q/K rows for rotate-half rope; llama.cpp rotates adjacent pairs.
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return lambda w: _unpermute(w, self.n_head)
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return lambda w: _unpermute(w, self.n_head_kv)
        return None

    def extra_tensors(self) -> list[tuple[str, np.ndarray]]:
        rope = self.rope()
        if rope["rope_type"] != "llama3":
            return []
        return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                 llama3_rope_factors(rope, self.head_dim))]


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama3_rope_factors(rope: dict[str, Any], dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling (transformers' _compute_llama3_parameters)."""
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_ctx / high, 1.0,
                       np.where(wavelen > old_ctx / low, factor,
                                1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


class Qwen3(Family):
    arch = gguf.MODEL_ARCH.QWEN3
    format = "qwen3"
    hf_architectures = ("Qwen3ForCausalLM",)
    tokenizer = "bpe"
    bpe_pre = "qwen2"
    layer_tensors = (*Family.layer_tensors, "attn_q_norm", "attn_k_norm")


class Gemma3(Family):
    arch = gguf.MODEL_ARCH.GEMMA3
    format = "gemma3"
    hf_architectures = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
    tokenizer = "spm"
    layer_tensors = (*Qwen3.layer_tensors, "post_attention_norm", "post_ffw_norm")
    # Gemma3TextConfig's defaults: multimodal checkpoints leave these out of text_config.
    defaults = {
        "vocab_size": 262208, "head_dim": 256, "num_attention_heads": 8, "num_key_value_heads": 4,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256,
        "sliding_window": 4096, "sliding_window_pattern": 6, "rope_local_base_freq": 10000.0,
        "tie_word_embeddings": True,
    }
    default_rope_theta = 1_000_000.0
    # transformers 5 saves the text tower as language_model.model.*, 4.x as model.language_model.*
    _text_prefixes = {"language_model.model.": "model.", "model.language_model.": "model.",
                      "language_model.lm_head.": "lm_head."}
    _vision_prefixes = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                        "model.multi_modal_projector.")

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        hp = self.hp
        if hp.get("use_bidirectional_attention") or hp.get("attn_logit_softcapping"):
            raise InputError("bidirectional or soft-capped attention is not a Gemma 3 causal LM")
        # llama.cpp scales attention by 1/sqrt(head_dim) (27B: 1/sqrt(hidden/heads)).
        expected = hp["hidden_size"] // self.n_head if self.n_layers == 62 else self.head_dim
        if hp["query_pre_attn_scalar"] != expected:
            raise InputError(f"query_pre_attn_scalar={hp['query_pre_attn_scalar']} is not "
                             f"supported by llama.cpp's gemma3 (it uses {expected})")

    def is_sliding(self) -> list[bool]:
        if "layer_types" in self.hp:
            return [t == "sliding_attention" for t in self.hp["layer_types"]]
        pattern = self.hp["sliding_window_pattern"]
        return [(i + 1) % pattern != 0 for i in range(self.n_layers)]

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        hp = self.hp
        local = (hp.get("rope_parameters") or {}).get("sliding_attention", {})
        w.add_rope_freq_base_swa(local.get("rope_theta", hp["rope_local_base_freq"]))
        if any(self.is_sliding()):
            w.add_sliding_window(hp["sliding_window"])
            w.add_sliding_window_pattern(self.is_sliding())
        if hp.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(hp["final_logit_softcapping"])

    def text_name(self, name: str) -> str | None:
        if name.startswith(self._vision_prefixes):
            return None
        for prefix, plain in self._text_prefixes.items():
            if name.startswith(prefix):
                return plain + name[len(prefix):]
        return name

    def transform(self, hf_name: str) -> Transform | None:
        # Gemma3RMSNorm computes x * (1 + w); llama.cpp's norm computes x * w.
        return (lambda w: w + 1.0) if hf_name.endswith("norm.weight") else None


FAMILIES: tuple[type[Family], ...] = (Gemma3, Llama, Qwen3)


def family_for(config: dict[str, Any]) -> Family:
    architectures = config.get("architectures") or []
    for cls in FAMILIES:
        if any(a in cls.hf_architectures for a in architectures):
            return cls(config)
    supported = ", ".join(a for cls in FAMILIES for a in cls.hf_architectures)
    found = ", ".join(architectures) or "none listed in config.json"
    raise InputError(f"unsupported architecture {found}; supported: {supported}")
