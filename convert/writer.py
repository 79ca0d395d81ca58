"""Writing a GGUF tensor by tensor, and checking the file written.

The header (metadata and every tensor's name, shape and type) is written first from the plan;
then each tensor is read from its mapped shard, converted and appended, so memory holds about
one tensor at a time.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from tqdm import tqdm

from spectrum_local.errors import SpectrumError

from .checkpoint import load_tensor, to_float32
from .families import TensorPlan

Q = gguf.GGMLQuantizationType
NUMPY_TYPES = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}
SOURCE_TYPES = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16}
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.BF16: gguf.LlamaFileType.MOSTLY_BF16}
ROWS_PER_CHUNK = 4096  # plain casts go in row blocks, so no float32 copy of a whole embedding


def tensor_type(plan: TensorPlan, qtype: Q) -> Q:
    return Q.F32 if plan.keep_f32 else qtype


def tensor_nbytes(plan: TensorPlan, qtype: Q) -> int:
    return plan.n_params * np.dtype(NUMPY_TYPES[tensor_type(plan, qtype)]).itemsize


def write_gguf(path: Path, plans: list[TensorPlan], qtype: Q,
               add_metadata: Callable[[gguf.GGUFWriter], None], arch: str, progress: bool) -> None:
    w = gguf.GGUFWriter(None, arch)
    add_metadata(w)
    w.add_file_type(FILE_TYPES[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for p in plans:
        t = tensor_type(p, qtype)
        w.add_tensor_info(p.name, p.shape, np.dtype(NUMPY_TYPES[t]), tensor_nbytes(p, qtype),
                          raw_dtype=t)
    total = sum(tensor_nbytes(p, qtype) for p in plans)
    try:
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {qtype.name}",
                  file=sys.stderr, disable=not progress) as bar:
            for p in plans:
                w.write_tensor_data(tensor_data(p, tensor_type(p, qtype)))
                bar.update(tensor_nbytes(p, qtype))
    finally:
        w.close()


def tensor_data(plan: TensorPlan, qtype: Q) -> np.ndarray:
    """The tensor's bytes in ``qtype``: a zero-copy view of the shard when nothing changes."""
    if plan.source is None:
        return cast(plan.data, qtype)
    src_type = plan.source.dtype
    raw = load_tensor(plan.source)
    if plan.transform is not None:
        return cast(plan.transform(to_float32(raw, src_type)), qtype)
    if SOURCE_TYPES[src_type] == qtype:
        return raw
    rows = raw.reshape(raw.shape[0] if raw.ndim > 1 else 1, -1)
    out = np.empty(rows.shape, dtype=NUMPY_TYPES[qtype])
    for i in range(0, rows.shape[0], ROWS_PER_CHUNK):
        out[i:i + ROWS_PER_CHUNK] = cast(to_float32(rows[i:i + ROWS_PER_CHUNK], src_type), qtype)
    return out.reshape(raw.shape)


def cast(x: np.ndarray, qtype: Q) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if qtype == Q.BF16:  # round to nearest even, as ggml does
        u = x.view(np.uint32)
        return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    return x.astype(NUMPY_TYPES[qtype])


def validate(path: Path, expected: dict[str, Q] | list[str]) -> gguf.GGUFReader:
    """Reopen a written GGUF: the same tensors, and the expected types when they are known."""
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueError/struct errors on corrupt files
        raise SpectrumError(f"the written file {path} does not read back as GGUF: {e}") from None
    found = {t.name: Q(t.tensor_type) for t in reader.tensors}
    names = list(expected)
    if sorted(found) != sorted(names):
        missing, extra = set(names) - set(found), set(found) - set(names)
        raise SpectrumError(f"{path}: tensors differ from the plan (missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(extra)[:3]})")
    if isinstance(expected, dict):
        wrong = [n for n, t in expected.items() if found[n] != t]
        if wrong:
            raise SpectrumError(f"{path}: {wrong[0]} has type {found[wrong[0]].name}, "
                                f"expected {expected[wrong[0]].name}")
    return reader
