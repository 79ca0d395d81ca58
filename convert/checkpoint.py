"""A Hugging Face checkpoint (local folder or hub repo) as a config plus lazily mapped tensors.

Only the safetensors headers are read up front; each tensor's bytes are memory-mapped when it
is loaded, so converting never holds more than one tensor in memory.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.utility import LocalTensor, SafetensorsLocal

from spectrum_local.errors import InputError, SpectrumError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# What a conversion needs from a hub repo; nothing else is downloaded.
HUB_FILES = [
    "config.json", INDEX, "model*.safetensors",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "README.md",
]
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}
RAW_TYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}  # bfloat16 kept as bits
SOURCE_DTYPES = tuple(ITEMSIZE)


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    repo_id: str | None  # the hub repo it came from, if any
    config: dict[str, Any]
    tensors: dict[str, LocalTensor]

    @property
    def name(self) -> str:
        return self.repo_id.split("/")[-1] if self.repo_id else self.folder.resolve().name

    @property
    def nbytes(self) -> int:
        return sum(t.data_range.size for t in self.tensors.values())

    @property
    def dtype(self) -> str:
        """The widest float type of the weights ("F32" wins over "F16"/"BF16")."""
        dtypes = {t.dtype for t in self.tensors.values()}
        return next((d for d in ("F32", "BF16", "F16") if d in dtypes), "F32")


def open_checkpoint(source: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    path = Path(source).expanduser()
    repo_id = None
    if not path.is_dir():
        if path.exists() or not _looks_like_repo_id(str(source)):
            raise InputError(f"{source}: not a checkpoint folder or a hub repo id (owner/name)")
        repo_id = str(source)
        path = _download(repo_id, revision)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{path}: no config.json; is this a Hugging Face checkpoint folder?")
    config = read_json(config_file)
    return Checkpoint(path, repo_id, config, _index_tensors(path))


def load_tensor(tensor: LocalTensor) -> np.ndarray:
    """The tensor as a read-only view of the mapped file (BF16 stays raw, as uint16)."""
    raw = np.memmap(tensor.data_range.filename, dtype=np.uint8, mode="r",
                    offset=tensor.data_range.offset, shape=(tensor.data_range.size,))
    return raw.view(RAW_TYPES[tensor.dtype]).reshape(tensor.shape)


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything else is the caller's bad input, not a crash."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") \
            from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _looks_like_repo_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~"))


def _download(repo_id: str, revision: str | None) -> Path:
    # huggingface_hub caches, resumes, shows progress on stderr and honours HF_HUB_OFFLINE.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
        raise InputError(f"{repo_id}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    except LocalEntryNotFoundError:
        raise InputError(f"{repo_id} is not in the local cache and the hub cannot be reached "
                         "(offline?); download it once online or pass a local folder") from None
    except (OSError, HfHubHTTPError) as e:
        raise SpectrumError(f"downloading {repo_id} failed: {e}") from None


def _index_tensors(folder: Path) -> dict[str, LocalTensor]:
    if (folder / INDEX).is_file():
        weight_map = read_json(folder / INDEX).get("weight_map")
        if not (isinstance(weight_map, dict)
                and all(isinstance(f, str) for f in weight_map.values())):
            raise InputError(f"{folder / INDEX}: no weight_map of tensor names to shard files")
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise InputError(f"{folder}: no {SINGLE} or {INDEX} (only safetensors checkpoints "
                         "are supported)")
    tensors: dict[str, LocalTensor] = {}
    for name in files:
        if not (folder / name).is_file():
            raise InputError(f"{folder}: shard {name} listed in {INDEX} is missing")
        try:  # a malformed header entry surfaces as any of these
            tensors.update(SafetensorsLocal(folder / name).tensors)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as e:
            raise InputError(f"{folder / name}: not a valid safetensors file ({e!r})") from None
    for name, t in tensors.items():
        _check_tensor(name, t)
    return tensors


def _check_tensor(name: str, t: LocalTensor) -> None:
    """Catch a bad tensor now, not as a mmap error or a reshape error halfway through writing."""
    if t.dtype not in SOURCE_DTYPES:
        raise InputError(f"tensor {name} has type {t.dtype}; supported source types are "
                         f"{', '.join(SOURCE_DTYPES)} (quantized checkpoints are not)")
    r = t.data_range
    file_size = os.stat(r.filename).st_size
    if r.offset + r.size > file_size:  # e.g. an interrupted download
        raise InputError(f"{r.filename}: truncated: tensor {name} ends at byte {r.offset + r.size} "
                         f"but the file has {file_size} bytes; download it again")
    expected = math.prod(t.shape) * ITEMSIZE[t.dtype]
    if r.size != expected:
        raise InputError(f"{r.filename}: tensor {name} has {r.size} bytes, its shape "
                         f"{list(t.shape)} in {t.dtype} needs {expected}")
