"""Expected GGUF sizes per quantization, computed from tensor shapes and llama.cpp's type rules.

llama.cpp's quantizer (src/llama-quant.cpp, llama_tensor_get_type) does not use one type for
every tensor: norms stay F32, the output matrix (or the tied embedding) gets Q6_K, and the
"_M" mixes give attn_v and ffn_down Q6_K in about a third of the layers. ``tensor_type`` follows
those rules for the types the converter offers; a test checks it against real quantized files.

    python -m spectrum_local.convert.sizes      # docs/convert.md's table for the released models
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import gguf

Q = gguf.GGMLQuantizationType
BASE_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q6_k": Q.Q6_K,
              "q5_k_m": Q.Q5_K, "q4_k_m": Q.Q4_K, "q4_0": Q.Q4_0}
# What llama.cpp falls back to when a row length is not a multiple of the block size.
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order: rows, then the row length
    keep_f32: bool = False


def _more_bits(i: int, n: int) -> bool:
    # llama.cpp's use_more_bits: the first and last eighth, and every third layer between.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(t: Tensor, outtype: str, n_layers: int, tied: bool) -> Q:
    base = BASE_TYPES[outtype]
    if t.keep_f32 or len(t.shape) < 2:
        return Q.F32
    if base in (Q.F32, Q.F16, Q.BF16):
        return base
    cols = t.shape[-1]
    new = base
    if t.name == "output.weight" or (tied and t.name == "token_embd.weight"):
        if cols % gguf.GGML_QUANT_SIZES[base][0] != 0 or base == Q.Q8_0:
            new = Q.Q8_0
        else:
            new = Q.Q6_K
    elif outtype in ("q4_k_m", "q5_k_m"):
        layer = re.match(r"blk\.(\d+)\.(attn_v|ffn_down)\.", t.name)
        if layer and _more_bits(int(layer.group(1)), n_layers):
            new = Q.Q6_K
    if cols % gguf.GGML_QUANT_SIZES[new][0] != 0:
        new = FALLBACK.get(new, new)
        if cols % gguf.GGML_QUANT_SIZES[new][0] != 0:
            new = Q.F16
    return new


def tensor_nbytes(t: Tensor, qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(t.shape) // block * size


def data_nbytes(tensors: list[Tensor], outtype: str, n_layers: int) -> int:
    """Bytes of tensor data llama.cpp writes for ``outtype`` (the header adds a few MB)."""
    tied = not any(t.name == "output.weight" for t in tensors)
    return sum(tensor_nbytes(t, tensor_type(t, outtype, n_layers, tied)) for t in tensors)


@dataclass(frozen=True)
class Architecture:
    """The text model's shapes, from the released checkpoints' config.json."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ff: int
    vocab: int
    tied: bool
    qk_norm: bool
    post_norms: bool  # Gemma's extra norms after attention and after the MLP

    def tensors(self) -> list[Tensor]:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out = [Tensor("token_embd.weight", (self.vocab, h)), Tensor("output_norm.weight", (h,))]
        if not self.tied:
            out.append(Tensor("output.weight", (self.vocab, h)))
        for i in range(self.layers):
            b = f"blk.{i}."
            out += [Tensor(b + "attn_q.weight", (q, h)), Tensor(b + "attn_k.weight", (kv, h)),
                    Tensor(b + "attn_v.weight", (kv, h)), Tensor(b + "attn_output.weight", (h, q)),
                    Tensor(b + "ffn_gate.weight", (self.ff, h)), Tensor(b + "ffn_up.weight", (self.ff, h)),
                    Tensor(b + "ffn_down.weight", (h, self.ff)),
                    Tensor(b + "attn_norm.weight", (h,)), Tensor(b + "ffn_norm.weight", (h,))]
            if self.qk_norm:
                out += [Tensor(b + "attn_q_norm.weight", (self.head_dim,)),
                        Tensor(b + "attn_k_norm.weight", (self.head_dim,))]
            if self.post_norms:
                out += [Tensor(b + "post_attention_norm.weight", (h,)),
                        Tensor(b + "post_ffw_norm.weight", (h,))]
        return out

    @property
    def n_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors())


RELEASED = (
    Architecture("spectrum-Llama-3.1-8B", hidden=4096, layers=32, heads=32, kv_heads=8,
                 head_dim=128, ff=14336, vocab=128256, tied=False, qk_norm=False, post_norms=False),
    Architecture("spectrum-gemma-3-12b", hidden=3840, layers=48, heads=16, kv_heads=8,
                 head_dim=256, ff=15360, vocab=262208, tied=True, qk_norm=True, post_norms=True),
    Architecture("spectrum-Qwen3-14B", hidden=5120, layers=40, heads=40, kv_heads=8,
                 head_dim=128, ff=17408, vocab=151936, tied=False, qk_norm=True, post_norms=False),
)
TABLE_TYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")


def table() -> str:
    rows = ["| model | parameters | " + " | ".join(t.upper() for t in TABLE_TYPES) + " |",
            "|---|---:|" + "---:|" * len(TABLE_TYPES)]
    for a in RELEASED:
        sizes = [data_nbytes(a.tensors(), t, a.layers) / 1e9 for t in TABLE_TYPES]
        rows.append(f"| {a.name} | {a.n_params / 1e9:.2f} B | "
                    + " | ".join(f"{s:.1f} GB" for s in sizes) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
