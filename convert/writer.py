"""Writing a GGUF tensor by tensor, and checking the file written.

The header (metadata and every tensor's name, shape and type) is written first from the plan;
then each tensor is read from its shard, converted and appended in blocks of a few MB, so
memory holds no whole tensor (only tensors a family transforms are loaded whole).
"""

from __future__ import annotations

import math
import struct
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np
from gguf.utility import LocalTensor
from tqdm import tqdm

from spectrum_local.errors import SpectrumError
from spectrum_local.ggufheader import read_header

from .checkpoint import ITEMSIZE, RAW_TYPES, load_tensor, to_float32
from .families import TensorPlan

Q = gguf.GGMLQuantizationType
NUMPY_TYPES = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}
SOURCE_TYPES = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16}
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.BF16: gguf.LlamaFileType.MOSTLY_BF16}
V = gguf.GGUFValueType
U64 = struct.Struct("<Q")
BLOCK = 1 << 20  # values read, cast and written at a time: small enough to stay in the CPU cache
AHEAD = 2  # blocks converted ahead of the one being written


def tensor_type(plan: TensorPlan, qtype: Q) -> Q:
    return Q.F32 if plan.keep_f32 else qtype


def tensor_nbytes(plan: TensorPlan, qtype: Q) -> int:
    return plan.n_params * np.dtype(NUMPY_TYPES[tensor_type(plan, qtype)]).itemsize


def write_gguf(path: Path, plans: list[TensorPlan], qtype: Q,
               add_metadata: Callable[[gguf.GGUFWriter], None], arch: str,
               progress: bool) -> set[str]:
    """Write the GGUF; returns the metadata keys written (for ``validate``)."""
    w = _Writer(None, arch)
    add_metadata(w)
    w.add_file_type(FILE_TYPES[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for p in plans:
        t = tensor_type(p, qtype)
        w.add_tensor_info(p.name, p.shape, np.dtype(NUMPY_TYPES[t]), tensor_nbytes(p, qtype),
                          raw_dtype=t)
    total = sum(w.ggml_pad(tensor_nbytes(p, qtype), w.data_alignment) for p in plans)
    # The bar exists before the temporary file does: a Ctrl-C inside tqdm's constructor would
    # leave a half-built bar whose finalizer prints a traceback.
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {qtype.name}",
               file=sys.stderr, disable=not progress)
    try:
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        out = w.fout[0]
        w.write_padding(out, out.tell())
        # A worker thread reads and converts the next blocks while this one writes (numpy and
        # file I/O release the GIL): the two halves of the work overlap on two cores.
        pool = ThreadPoolExecutor(1)
        pending: deque[Future] = deque()
        try:
            for job in _jobs(plans, qtype, w.data_alignment):
                pending.append(pool.submit(job))
                if len(pending) > AHEAD:
                    bar.update(out.write(pending.popleft().result()))
            while pending:
                bar.update(out.write(pending.popleft().result()))
        finally:
            pool.shutdown(cancel_futures=True)  # after an error or Ctrl-C: no new block starts
    finally:
        bar.close()
        w.close()
    return set(w.kv_data[0])


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that packs long string and number arrays (tokens, merges, token types, scores)
    in one go: its own _pack_val packs them an item at a time, about 1 s for Qwen3's vocabulary."""

    def _pack_val(self, val: Any, vtype: V, add_vtype: bool, sub_type: V | None = None) -> bytes:
        item = None
        if vtype == V.ARRAY and sub_type is None and isinstance(val, (list, tuple)) and val:
            item = V.get_type(val[0])
        if item == V.STRING:
            data = b"".join(U64.pack(len(b)) + b for b in (
                v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val))
        elif item in (V.INT32, V.FLOAT32):
            data = np.array(val, dtype="<i4" if item == V.INT32 else "<f4").tobytes()
        else:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = struct.pack("<IIQ", V.ARRAY, item, len(val))
        return (head if add_vtype else head[4:]) + data


def _jobs(plans: list[TensorPlan], qtype: Q, alignment: int) -> Iterator[Callable[[], Any]]:
    """Every piece of the tensor data section in file order, as calls returning its bytes.
    Blocks reuse AHEAD + 1 sets of buffers in turn: no more are ever in flight."""
    slots = [_Buffers() for _ in range(AHEAD + 1)]
    n = 0
    for p in plans:
        t = tensor_type(p, qtype)
        if p.source is not None and p.transform is None:
            size = p.source.data_range.size // ITEMSIZE[p.source.dtype]
            for start in range(0, size, BLOCK):
                slot = slots[n % len(slots)]
                n += 1
                yield partial(slot.convert, p.source, start, min(BLOCK, size - start), t)
        else:
            yield partial(_whole_tensor, p, t)
        nbytes = tensor_nbytes(p, qtype)
        if pad := -nbytes % alignment:
            yield partial(bytes, pad)


def _whole_tensor(plan: TensorPlan, qtype: Q) -> np.ndarray:
    """A computed tensor, or one a family transforms, in ``qtype``."""
    if plan.source is None:
        return cast(plan.data, qtype)
    raw = load_tensor(plan.source)
    return cast(plan.transform(to_float32(raw, plan.source.dtype)), qtype)


class _Buffers:
    """Reused buffers for one block of values read from a shard and converted."""

    def __init__(self) -> None:
        self.arrays: dict[tuple[str, np.dtype], np.ndarray] = {}

    def get(self, name: str, dtype, n: int) -> np.ndarray:
        a = self.arrays.get((name, dtype))
        if a is None:
            a = self.arrays[name, dtype] = np.empty(BLOCK, dtype)
        return a[:n]

    def convert(self, tensor: LocalTensor, start: int, n: int, qtype: Q) -> np.ndarray:
        src = self.get("src", RAW_TYPES[tensor.dtype], n)
        with open(tensor.data_range.filename, "rb", buffering=0) as f:
            f.seek(tensor.data_range.offset + start * src.itemsize)
            view = memoryview(src).cast("B")
            while view:
                got = f.readinto(view)
                if not got:
                    raise SpectrumError(f"{f.name} ended early (changed while converting?)")
                view = view[got:]
        if SOURCE_TYPES[tensor.dtype] == qtype:
            return src
        out = self.get("out", NUMPY_TYPES[qtype], n)
        if tensor.dtype == "BF16" and qtype == Q.F16:
            return bf16_to_f16(src, out, self.get("scratch", np.uint16, n))
        if tensor.dtype == "BF16" and qtype == Q.F32:  # bfloat16 is the top half of a float32
            np.left_shift(src, 16, out=out.view(np.uint32), dtype=np.uint32)
            return out
        out[:] = cast(to_float32(src, tensor.dtype), qtype)
        return out


# bfloat16 bit patterns of normal float16 values: exponent 113 to 142 (|x| in [2^-14, 2^16))
F16_NORMAL_LOW, F16_NORMAL_SPAN = 113 << 7, (143 - 113) << 7


def bf16_to_f16(src: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """bfloat16 bits to float16, as float32 -> float16 rounds (numpy's cast is a scalar loop,
    several times slower): a normal float16 holds a bfloat16 exactly, so its bits are moved
    with integer ops; the rare rest (zeros, tiny values, overflow, nan) goes through numpy."""
    bits = out.view(np.uint16)
    np.add(src, 16 << 7, out=bits)  # exponent - 112 (the bias change) mod 32, in its low 5 bits
    np.left_shift(bits, 3, out=bits)  # drops the sign and the exponent's high bits
    np.bitwise_and(src, 0x8000, out=scratch)
    np.bitwise_or(bits, scratch, out=bits)
    np.bitwise_and(src, 0x7FFF, out=scratch)
    np.subtract(scratch, F16_NORMAL_LOW, out=scratch)  # wraps: one compare tests both ends
    rest = np.flatnonzero(scratch >= F16_NORMAL_SPAN)
    if len(rest):
        out[rest] = to_float32(src[rest], "BF16").astype(np.float16)
    return out


def cast(x: np.ndarray, qtype: Q) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if qtype == Q.BF16:  # round to nearest even, as ggml does
        u = x.view(np.uint32)
        return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    return x.astype(NUMPY_TYPES[qtype])


def validate(path: Path, tensors: dict[str, tuple[Q, tuple[int, ...]]] | list[str],
             keys: set[str]) -> dict[str, Any]:
    """Reopen a written GGUF: the planned tensors (with their types and shapes when they are
    known) laid out within the file, and the metadata ``keys``. Returns the scalar metadata."""
    try:
        fields, found, data_start = read_index(path)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as e:  # a corrupt file
        raise SpectrumError(f"the written file {path} does not read back as GGUF: {e}") from None
    names = list(tensors)
    if sorted(found) != sorted(names):
        missing, extra = set(names) - set(found), set(found) - set(names)
        raise SpectrumError(f"{path}: tensors differ from the plan (missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(extra)[:3]})")
    if isinstance(tensors, dict):
        wrong = [n for n, expected in tensors.items() if found[n][:2] != expected]
        if wrong:
            (t, shape), (want_t, want_shape) = found[wrong[0]][:2], tensors[wrong[0]]
            raise SpectrumError(f"{path}: {wrong[0]} is {t.name} {list(shape)}, expected "
                                f"{want_t.name} {list(want_shape)}")
    if missing_keys := keys - set(fields):
        raise SpectrumError(f"{path}: metadata keys missing: {sorted(missing_keys)[:3]}")
    end = 0
    alignment = fields.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
    for name, (t, shape, offset) in sorted(found.items(), key=lambda item: item[1][2]):
        block, size = gguf.GGML_QUANT_SIZES[t]
        if offset < end or offset % alignment:
            raise SpectrumError(f"{path}: tensor {name} overlaps another or is misaligned")
        end = offset + math.prod(shape) // block * size
    if data_start + end > path.stat().st_size:
        raise SpectrumError(f"{path}: truncated: its tensors need {data_start + end} bytes, "
                            f"the file has {path.stat().st_size}")
    return fields


def read_index(path: Path) -> tuple[dict[str, Any], dict[str, tuple[Q, tuple[int, ...], int]], int]:
    """``ggufheader.read_header`` with the tensor types as gguf's enum."""
    fields, tensors, data_start = read_header(path)
    return fields, {name: (Q(t), shape, offset) for name, (t, shape, offset) in tensors.items()}, \
        data_start

