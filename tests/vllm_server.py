"""A real vLLM OpenAI server (its CPU build) in a subprocess on a free loopback port, for the
tests of the remote backend. vLLM lives in its own venv (`make test` builds .venv-vllm): it pins
its own torch and transformers. One server serves one checkpoint.

Start-up measured on 2 idle cores with the settings below: 26 s (the tiny Qwen3 of
tiny_checkpoints.VLLM_BUILDERS), 31 s (the Llama 3.1, 136 MB of float32 weights), 38 s for both
started at once; with vLLM's defaults 53 s, 78 s on the first start (torch.compile, warm-up pass,
a separate worker process). A server holds about 2.4 GB of memory; two fit side by side.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from servers import free_port, running

ROOT = Path(__file__).resolve().parent.parent


def vllm_python() -> str | None:
    """The python of vLLM's venv ($SPECTRUM_LOCAL_VLLM_PYTHON, else .venv-vllm), or None."""
    path = Path(os.environ.get("SPECTRUM_LOCAL_VLLM_PYTHON") or ROOT / ".venv-vllm/bin/python")
    return str(path) if path.is_file() else None


@contextlib.contextmanager
def running_vllm(checkpoint_dir: Path | str, *, max_logprobs: int = 20, max_model_len: int = 2048,
                 args: list[str] = (), timeout: float = 300):
    """Yield the base URL of vLLM serving ``checkpoint_dir`` (its model id is the folder's
    path as given); SIGTERM it after. ``args`` are extra command-line flags."""
    python = vllm_python()
    if python is None:
        raise RuntimeError("vLLM is not installed: run `make test`, or set "
                           "SPECTRUM_LOCAL_VLLM_PYTHON to the python of a venv that has it")
    port = free_port()
    env = dict(os.environ)
    # it overrides --kv-cache-memory-bytes
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    env.update(
        # The engine's worker runs inside the engine-core process: one Python start-up less.
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        # By default the worker is pinned to one core and the others are kept free; unpinned,
        # two servers share the machine's cores.
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        # The test reads the output only when the start fails, from a pipe that must not fill.
        VLLM_LOGGING_LEVEL="WARNING",
        VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")
    command = [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint_dir),
        "--host", "127.0.0.1", "--port", str(port),
        # float32 weights and activations: log-probabilities comparable to 1e-5 with others
        "--dtype", "float32",
        # no sampling defaults taken from the checkpoint's generation_config.json
        "--generation-config", "vllm",
        "--max-logprobs", str(max_logprobs),
        # Eager mode with an explicit KV cache size skips torch.compile and the warm-up pass:
        # about 50 s of the start-up on 2 cores.
        "--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20),
        "--max-model-len", str(max_model_len),
        # usage.prompt_tokens_details.cached_tokens: what the prefix cache reused
        "--enable-prompt-tokens-details",
        "--disable-log-stats", "--disable-uvicorn-access-log",
        *args]
    with running(command, port, "/health", env=env, timeout=timeout) as url:
        yield url
