"""Convert a PEFT LoRA adapter to a GGUF LoRA adapter that llama.cpp applies to a base GGUF.

    from spectrum_local.convert.lora import convert_lora
    convert_lora("my-adapter", "spectrum-gemma-3-12b-v1-Q4_K_M.gguf", "my-adapter.gguf")

The file is what llama.cpp's loader (src/llama-adapter.cpp) requires: general.type "adapter",
adapter.type "lora", adapter.lora.alpha, the base model's general.architecture, and for each
adapted base tensor NAME the pair NAME.lora_a [r, in] and NAME.lora_b [out, r] (numpy order,
F32 or F16). llama.cpp then computes W x + alpha / r * B (A x), r being each pair's own rank.

The adapter is mapped and checked against the base GGUF itself (architecture, tensor names,
shapes, head counts), so one conversion serves every quantization of the base. PEFT's scaling
is kept exactly: rsLoRA (alpha / sqrt(r)) is written as alpha * sqrt(r), and modules whose
alpha_pattern or rank_pattern give another scale than the file's one alpha have the ratio
folded into their B. What llama.cpp cannot apply is refused in one line: DoRA and the other
LoRA variants, full weights (modules_to_save), trained biases, embedding LoRA on a model with
tied embeddings.
"""

from __future__ import annotations

import math
import os
import re
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.utility import LocalTensor, SafetensorsLocal

from spectrum_local.errors import InputError

from . import files
from .checkpoint import _check_tensor, read_json
from .families import FAMILIES, Family, TensorPlan, Transform, _natural_key
from .writer import read_index, validate, write_gguf

Q = gguf.GGMLQuantizationType
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# PEFT's saved names: base_model.model.<module path>.<part>
KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\."
                 r"(?P<part>lora_[AB]\.weight|lora_embedding_[AB])")
LINEAR, EMBEDDING = ("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")
TOKEN_EMBD, OUTPUT = "token_embd.weight", "output.weight"
# Config fields that make an adapter more than W + s * B A (VeLoRA and MiCA change only
# training and initialisation: they are plain LoRA here).
UNSUPPORTED = {
    "use_dora": "DoRA", "use_qalora": "QA-LoRA", "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA", "arrow_config": "Arrow routing",
    "alora_invocation_tokens": "activated LoRA",  # only llama.cpp's server activates it
    "lora_bias": "trained LoRA biases", "modules_to_save": "full trained weights",
    "trainable_token_indices": "trained token embeddings", "layer_replication": "layer replication",
}
# Initialisations that train the adapter against a modified (residual) base model.
RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
MERGE_HINT = ("merge the adapter into its base model (PEFT's merge_and_unload) and convert that "
              "with spectrum-local convert")


@dataclass(frozen=True)
class LoraResult:
    path: Path
    arch: str
    alpha: float        # adapter.lora.alpha as written
    n_pairs: int        # base tensors the adapter changes
    n_skipped: int      # vision-tower modules left out: the GGUF model is text-only
    file_size: int
    seconds: float

    def summary(self) -> str:
        skipped = (f"; {self.n_skipped} vision-tower modules left out (the model is text-only)"
                   if self.n_skipped else "")
        return (f"wrote {self.path} ({self.arch} LoRA adapter, alpha {self.alpha:g}): "
                f"{self.n_pairs} adapted tensors, {self.file_size / 1e6:.3g} MB in "
                f"{self.seconds:.1f} s{skipped}")


def convert_lora(adapter_dir: str | os.PathLike, base_gguf: str | os.PathLike,
                 out: str | os.PathLike | None = None, *, force: bool = False,
                 progress: bool = False) -> LoraResult:
    """Convert the PEFT adapter in ``adapter_dir`` for the model in ``base_gguf`` to a GGUF
    LoRA adapter at ``out`` (default: ``<adapter folder name>.gguf`` in the current folder)."""
    start = time.monotonic()
    folder, base = Path(adapter_dir).expanduser(), Path(base_gguf).expanduser()
    if not (folder / CONFIG).is_file():
        raise InputError(f"{folder}: no {CONFIG}; is this a PEFT adapter folder?")
    config = read_json(folder / CONFIG)
    fields, base_tensors = _read_base(base)
    family = _family(fields, base)
    _check_config(config)
    alpha = _file_alpha(config)
    note = _check_trained_base(config, family, base)
    path = _output_path(out, folder)
    if not path.parent.is_dir():
        raise InputError(f"output folder {path.parent} does not exist")
    if path.exists() and path.resolve() == base.resolve():
        raise InputError(f"{path} is the base model; choose another output path")
    if path.exists() and not force:
        raise InputError(f"{path} exists; pass --force to overwrite it")

    plans, n_skipped = _plan(config, alpha, _read_adapter(folder), family, base_tensors, base)
    # lossless: F16 stays F16; F32 and BF16 become F32 (llama.cpp takes F32/F16 adapters)
    qtype = Q.F16 if all(p.source.dtype == "F16" for p in plans) else Q.F32

    def add_metadata(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(folder.resolve().name)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)

    if progress and note:
        print(note, file=sys.stderr)
    files.remove_stale_temps(path)
    with files.staged(path) as tmp:
        keys = write_gguf(tmp, plans, qtype, add_metadata, family.arch_name, progress)
        validate(tmp, {p.name: (qtype, p.shape) for p in plans}, keys)
    result = LoraResult(path, family.arch_name, alpha, len(plans) // 2, n_skipped,
                        path.stat().st_size, time.monotonic() - start)
    if progress:
        print(result.summary(), file=sys.stderr)
    return result


# --- the base GGUF ----------------------------------------------------------------------------

def _read_base(base: Path) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The base's metadata and its tensors' numpy-order shapes (header only: no tensor data)."""
    if not base.is_file():
        raise InputError(f"{base}: no such file (--base is the base model's GGUF)")
    try:
        fields, tensors, _ = read_index(base)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise InputError(f"{base}: not a GGUF file ({e})") from None
    if fields.get(gguf.Keys.General.TYPE) == "adapter":
        raise InputError(f"{base} is an adapter, not a base model")
    return fields, {name: shape for name, (_, shape, _) in tensors.items()}


def _family(fields: dict[str, Any], base: Path) -> Family:
    """The converter's family for the base's architecture, with the hyper-parameters its tensor
    names and transforms need (layer and head counts) read from the GGUF."""
    arch = fields.get(gguf.Keys.General.ARCHITECTURE)
    cls = next((c for c in FAMILIES if gguf.MODEL_ARCH_NAMES[c.arch] == arch), None)
    if cls is None:
        supported = ", ".join(gguf.MODEL_ARCH_NAMES[c.arch] for c in FAMILIES)
        raise InputError(f"{base}: architecture {arch!r} is not supported (supported: {supported})")

    def get(key: str) -> int:
        value = fields.get(key.format(arch=arch))
        if not isinstance(value, int):
            raise InputError(f"{base}: no {key.format(arch=arch)}; not a complete {arch} GGUF")
        return value

    n_head = get(gguf.Keys.Attention.HEAD_COUNT)
    hp = {"num_hidden_layers": get(gguf.Keys.LLM.BLOCK_COUNT), "num_attention_heads": n_head,
          "num_key_value_heads": fields.get(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch),
                                            n_head),
          "hidden_size": get(gguf.Keys.LLM.EMBEDDING_LENGTH)}
    # Only the generic part of __init__: the families' own checks are of a Hugging Face
    # config.json, which this base passed when it was converted.
    family = cls.__new__(cls)
    Family.__init__(family, hp)
    return family


# --- the adapter ------------------------------------------------------------------------------

def _check_config(config: dict[str, Any]) -> None:
    """Refuse adapters that are more than plain LoRA pairs on the original base weights."""
    if config.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{CONFIG}: peft_type {config['peft_type']!r}; only LoRA adapters "
                         "convert to llama.cpp adapters")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise InputError(f"{what} ({key}: {config[key]}): llama.cpp cannot apply this as "
                             f"a LoRA adapter; {MERGE_HINT}")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(RESIDUAL_INITS):
        raise InputError(f"a {init} adapter is relative to a modified copy of its base model "
                         "(PEFT saves PiSSA, OLoRA, CorDA and LoRA-GA adapters as plain LoRA "
                         "with path_initial_model_for_weight_conversion)")


def _number(config: dict[str, Any], key: str) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{CONFIG}: {key} is {value!r}, expected a number")
    return value


def _file_alpha(config: dict[str, Any]) -> float:
    """adapter.lora.alpha: llama.cpp scales by alpha / r and knows nothing of rsLoRA, whose
    alpha / sqrt(r) is alpha * sqrt(r) / r."""
    alpha = _number(config, "lora_alpha")
    if config.get("use_rslora"):
        alpha *= math.sqrt(_number(config, "r"))
    if alpha == 0:  # llama.cpp reads alpha 0 as "no scaling", i.e. scale 1
        raise InputError(f"{CONFIG}: lora_alpha is 0, which llama.cpp reads as a scale of 1")
    return float(alpha)


def _peft_scale(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's scale of one module: its alpha_pattern entry (the first key matching the end of
    the module's name, as PEFT's get_pattern_key matches) or lora_alpha, over r or sqrt(r)."""
    patterns = config.get("alpha_pattern") or {}
    key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
    alpha = _number(patterns, key) if key is not None else _number(config, "lora_alpha")
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _read_adapter(folder: Path) -> dict[str, LocalTensor]:
    path = folder / WEIGHTS
    if not path.is_file():
        other = " (only safetensors adapters are supported)" if any(
            folder.glob("adapter_model.bin")) else ""
        raise InputError(f"{folder}: no {WEIGHTS}{other}")
    try:
        tensors = SafetensorsLocal(path).tensors
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as e:
        raise InputError(f"{path}: not a valid safetensors file ({e!r})") from None
    for name, t in tensors.items():
        _check_tensor(name, t)
    return tensors


def _pairs(config: dict[str, Any],
           tensors: dict[str, LocalTensor]) -> dict[str, dict[str, LocalTensor]]:
    """module path -> {part: tensor} for every LoRA pair; anything else is refused."""
    pairs: dict[str, dict[str, LocalTensor]] = {}
    for key, tensor in tensors.items():
        if key.endswith(".base_layer.weight"):
            # PEFT saves the frozen embedding and lm_head it wraps: the base's own weights
            # (a resized vocabulary shows in the LoRA pair's shape, checked against the base).
            continue
        if (m := KEY.fullmatch(key)) is None:
            what = (f"a trained bias (bias: {config.get('bias')!r})" if key.endswith(".bias")
                    else "not a LoRA A/B matrix")
            raise InputError(f"{WEIGHTS}: {key} is {what}; a llama.cpp adapter holds only "
                             f"LoRA pairs; {MERGE_HINT}")
        pairs.setdefault(m["module"], {})[m["part"]] = tensor
    for module, parts in pairs.items():
        if sorted(parts) not in (list(LINEAR), list(EMBEDDING)):
            raise InputError(f"{WEIGHTS}: {module} has {', '.join(sorted(parts))}, not a LoRA pair")
    return pairs


def _plan(config: dict[str, Any], alpha: float, tensors: dict[str, LocalTensor],
          family: Family, base_tensors: dict[str, tuple[int, ...]],
          base: Path) -> tuple[list[TensorPlan], int]:
    """The GGUF tensors (each pair's lora_a and lora_b), and how many modules were skipped."""
    pairs = _pairs(config, tensors)
    tied = OUTPUT not in base_tensors
    plans: list[TensorPlan] = []
    skipped = 0
    for module, parts in pairs.items():
        hf_name = family.text_name(module + ".weight")
        if hf_name is None:
            skipped += 1
            continue
        name = family.name_map.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise InputError(f"target module {module} is not a layer of a {family.arch_name} model")
        if tied and name in (TOKEN_EMBD, OUTPUT):
            # llama.cpp's tied output projection is token_embd itself, so it would meet the
            # embedding's pair there too, in the embedding's layout: ggml aborts the process
            # (GGML_ASSERT in mul_mat, tried with llama-cpp-python 0.3.36).
            raise InputError(f"LoRA on {module}: {base.name} ties its output projection to the "
                             "token embedding, which llama.cpp cannot adapt; leave embed_tokens "
                             f"and lm_head out of target_modules or {MERGE_HINT}")
        if name not in base_tensors:
            raise InputError(f"{base.name} has no {name} (for {module}); was the adapter "
                             "trained on another model?")
        embedding = LINEAR[0] not in parts
        a, b = (parts[p] for p in (EMBEDDING if embedding else LINEAR))
        rank = a.shape[0]
        # A linear layer's W is [out, in], its A [r, in] and B [out, r]. An embedding's W is
        # [vocab, dim], its A [r, vocab] and B [dim, r], and llama.cpp wants token_embd's lora_a
        # as [vocab, r]: it gathers the token's row of A^T, then multiplies by B.
        rows, cols = base_tensors[name] if len(base_tensors[name]) == 2 else (None, None)
        want_a, want_b = ((rank, rows), (cols, rank)) if embedding else ((rank, cols), (rows, rank))
        if (a.shape, b.shape) != (want_a, want_b):
            raise InputError(f"{module}: LoRA A {list(a.shape)} and B {list(b.shape)} do not fit "
                             f"{name} {list(base_tensors[name])} of {base.name}; was the adapter "
                             "trained on another model?")
        ratio = _peft_scale(config, module, rank) * rank / alpha
        plans.append(TensorPlan(f"{name}.lora_a", (rows, rank) if embedding else a.shape, a,
                                transform=_transpose if embedding else None))
        plans.append(TensorPlan(f"{name}.lora_b", b.shape, b,
                                transform=_b_transform(family.transform(hf_name), ratio)))
    if not plans:
        raise InputError(f"{WEIGHTS} holds no LoRA pairs for the text model")
    return sorted(plans, key=lambda p: _natural_key(p.name)), skipped


def _transpose(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T)


def _b_transform(rows: Transform | None, ratio: float) -> Transform | None:
    """B's transform. A family transforms a 2-D base weight only by permuting its rows (Llama's
    Q/K un-permute; Gemma's +1 is for norms, which PEFT cannot target), and the rows of B A are
    B's rows. ``ratio`` is PEFT's scale of this module over llama.cpp's alpha / r."""
    scale = None if math.isclose(ratio, 1.0, rel_tol=1e-12) else np.float32(ratio)
    if rows is None and scale is None:
        return None

    def transform(b: np.ndarray) -> np.ndarray:
        b = b if rows is None else rows(b)
        return b if scale is None else b * scale
    return transform


def _check_trained_base(config: dict[str, Any], family: Family, base: Path) -> str | None:
    """Refuse an adapter trained on another architecture than the base GGUF's, when its base
    model's config.json is on this machine (a folder, or the Hugging Face cache); else return a
    note that only tensor shapes are checked."""
    name = config.get("base_model_name_or_path")
    base_config = _local_config(name, config.get("revision")) if name else None
    if base_config is None:
        return (f"note: the adapter's base model ({name or 'not named'}) is not on this "
                f"machine, so its architecture is not checked; its tensor shapes fit {base.name}")
    architectures = base_config.get("architectures")
    if isinstance(architectures, list) and architectures and \
            not set(map(str, architectures)) & set(family.hf_architectures):
        listed = ", ".join(map(str, architectures))
        raise InputError(f"the adapter was trained on {name} ({listed}), but {base.name} is a "
                         f"{family.arch_name} model")
    return None


def _local_config(name: Any, revision: Any) -> dict[str, Any] | None:
    if not isinstance(name, str):
        return None
    if (Path(name).expanduser() / "config.json").is_file():
        return read_json(Path(name).expanduser() / "config.json")
    from huggingface_hub import try_to_load_from_cache
    try:
        cached = try_to_load_from_cache(name, "config.json",
                                        revision=revision if isinstance(revision, str) else None)
    except ValueError:  # not a hub repo id either
        return None
    return read_json(Path(cached)) if isinstance(cached, str) else None


def _output_path(out: str | os.PathLike | None, folder: Path) -> Path:
    default = f"{folder.resolve().name}.gguf"
    if out is None:
        return Path.cwd() / default
    path = Path(out).expanduser()
    return path / default if path.is_dir() else path


__all__ = ["convert_lora", "LoraResult"]
