"""Convert a spectrum checkpoint (Hugging Face safetensors) to a GGUF the runtime loads as is.

    from spectrum_local.convert import convert
    convert("tsor13/spectrum-gemma-3-12b-v1", outtype="q4_k_m")

F32/F16/BF16 are written directly. Quantized types are made by llama.cpp's own quantizer from
a lossless intermediate (the checkpoint's own float type), deleted afterwards unless asked.
Files are written under a temporary name in the target folder, read back and checked, then
renamed, so a failed or killed run never leaves a half-written model under the final name
(see files.py). llama.cpp's quantizer runs in a child process (see quantize.py).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gguf

from spectrum_local.errors import InputError, SpectrumError
from spectrum_local.formats import get_format
from spectrum_local.ops import FLOAT_TYPES, OUTTYPES, QUANTIZED_TYPES

from . import files, sizes
from .checkpoint import Checkpoint, open_checkpoint
from .families import TensorPlan, family_for
from .quantize import quantize
from .vocab import load_vocab, write_vocab
from .writer import SOURCE_TYPES, tensor_nbytes, tensor_type, validate, write_gguf

Q = gguf.GGMLQuantizationType
DIRECT = {name: Q[name.upper()] for name in FLOAT_TYPES}
FILE_TYPES = {name: gguf.LlamaFileType[f"MOSTLY_{name.upper()}"] for name in QUANTIZED_TYPES}
HEADROOM = 64 << 20  # metadata and alignment padding, generously


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    outtype: str
    format: str
    n_tensors: int
    n_params: int
    file_size: int
    seconds: float

    def summary(self) -> str:
        return (f"wrote {self.path} ({self.outtype.upper()}, format {self.format}): "
                f"{self.n_tensors} tensors, {self.n_params / 1e9:.3g} B parameters, "
                f"{self.file_size / 1e9:.3g} GB in {self.seconds:.0f} s")


def convert(source: str | os.PathLike, out: str | os.PathLike | None = None, outtype: str = "f16",
            format: str = "auto", revision: str | None = None, force: bool = False,
            keep_intermediate: bool = False, progress: bool = True) -> ConvertResult:
    """Convert ``source`` (a checkpoint folder or a hub repo id) to a GGUF at ``out``
    (default: ``<model>-<OUTTYPE>.gguf`` in the current folder)."""
    start = time.monotonic()
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise InputError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    ckpt = open_checkpoint(source, revision)
    family = family_for(ckpt.config)
    fmt = get_format(family.format if format == "auto" else format)
    path = _output_path(out, ckpt, outtype)
    if not path.parent.is_dir():  # checked before anything is written
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise InputError(f"output folder {path.parent} {what}")
    if path.exists() and not force:
        raise InputError(f"{path} exists; pass --force to overwrite it")
    plans = family.plan(ckpt)

    def add_metadata(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(ckpt.name)
        if ckpt.repo_id:
            w.add_source_repo_url(f"https://huggingface.co/{ckpt.repo_id}")
        if isinstance(license := gguf.Metadata.load_model_card(ckpt.folder).get("license"), str):
            w.add_license(license)
        family.write_hparams(w)
        vocab = load_vocab(ckpt.folder, family, family.n_vocab(plans))
        write_vocab(w, vocab, ckpt.folder, fmt)

    intermediate = path.with_name(f"{path.stem}.{SOURCE_TYPES[ckpt.dtype].name}.gguf")
    for target in (path, intermediate):  # before the disk check: they take space
        files.remove_stale_temps(target)
    if outtype in DIRECT:
        qtype = DIRECT[outtype]
        _check_disk(path.parent, _direct_nbytes(plans, qtype))
        with files.staged(path) as tmp:
            keys = write_gguf(tmp, plans, qtype, add_metadata, family.arch_name, progress)
            validate(tmp, {p.name: (tensor_type(p, qtype), p.shape) for p in plans}, keys)
    else:
        qtype = SOURCE_TYPES[ckpt.dtype]  # lossless: the quantizer reads the source's own values
        final = sizes.data_nbytes([sizes.Tensor(p.name, p.shape, p.keep_f32) for p in plans],
                                  outtype, family.n_layers)
        _check_disk(path.parent, _direct_nbytes(plans, qtype) + final)
        if keep_intermediate and intermediate.exists() and not force:
            raise InputError(f"{intermediate} exists; pass --force to overwrite it")
        if keep_intermediate:
            with files.staged(intermediate) as tmp:
                keys = write_gguf(tmp, plans, qtype, add_metadata, family.arch_name, progress)
            _quantize_into(path, intermediate, plans, outtype, keys, progress)
        else:
            # The intermediate is never renamed: a killed run then leaves only a hidden
            # temporary file, no complete-looking float GGUF that blocks the next run.
            with files.temporary(intermediate) as tmp:
                keys = write_gguf(tmp, plans, qtype, add_metadata, family.arch_name, progress)
                _quantize_into(path, tmp, plans, outtype, keys, progress)
    result = ConvertResult(path, outtype, fmt.name, len(plans), sum(p.n_params for p in plans),
                           path.stat().st_size, time.monotonic() - start)
    if progress:
        print(result.summary(), file=sys.stderr)
    return result


def _output_path(out: str | os.PathLike | None, ckpt: Checkpoint, outtype: str) -> Path:
    default = f"{ckpt.name}-{outtype.upper()}.gguf"
    if out is None:
        return Path.cwd() / default
    path = Path(out).expanduser()
    return path / default if path.is_dir() else path


def _direct_nbytes(plans: list[TensorPlan], qtype: Q) -> int:
    return sum(tensor_nbytes(p, qtype) for p in plans)


def _check_disk(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + HEADROOM:
        raise SpectrumError(f"not enough disk space in {folder}: the conversion needs about "
                            f"{(needed + HEADROOM) / 1e9:.1f} GB, {free / 1e9:.1f} GB are free")


def _quantize_into(path: Path, source: Path, plans: list[TensorPlan], outtype: str,
                   keys: set[str], progress: bool) -> None:
    with files.staged(path) as tmp:
        quantize(source, tmp, outtype, path, progress)
        # llama.cpp picks each tensor's type; the intermediate's metadata is carried over
        fields = validate(tmp, [p.name for p in plans], keys)
        file_type = fields[gguf.Keys.General.FILE_TYPE]
        if file_type != FILE_TYPES[outtype]:
            raise SpectrumError(f"{path}: file type {file_type}, expected {outtype}")


__all__ = ["convert", "ConvertResult", "OUTTYPES"]
