"""The converter against llama.cpp's own convert_hf_to_gguf.py: a 0.4B-parameter bf16 Qwen3
checkpoint in 3 shards to F16, wall time and peak memory (RSS), the median of several runs,
each conversion in its own process.

Both inputs are made on first use and cached under ~/.cache/spectrum-local-bench/: the
checkpoint (random weights, Qwen3's real tokenizer, built with transformers from the test
helpers) and llama.cpp's converter, taken from the llama-cpp-python sdist of the installed
version (fetched with pip) and run with its own gguf-py. Ours includes what llama.cpp's does
not do: flushing the file to disk (fsync) and reading it back before renaming it.

    python bench/bench_convert.py     # prints the two rows
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from spectrum_local.convert.writer import read_index  # noqa: E402

# SPECTRUM_LOCAL_BENCH_REPEATS=N caps the runs (see bench.py).
REPEATS = min(3, int(os.environ.get("SPECTRUM_LOCAL_BENCH_REPEATS", "3")))
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spectrum-local-bench"
CASE = "convert 0.4B bf16 Qwen3 (3 shards) to F16"
BASELINE = "llama.cpp convert_hf_to_gguf.py"
# Qwen3-0.6B's layer shapes with 16 layers instead of 28: 0.41 B parameters, tied embeddings.
SHAPES = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=16,
              num_attention_heads=16, num_key_value_heads=8, head_dim=128)
SHARD_SIZE = "350MB"  # the 311 MB embedding and one layer, then 11 layers, then 4
# Runs a command in a fresh process, so that RUSAGE_CHILDREN's peak is that command's alone.
MEASURE = """\
import json, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
seconds = time.perf_counter() - start
if proc.returncode:
    sys.exit(f"{sys.argv[1:]} failed:\\n{proc.stderr[-3000:]}")
print(json.dumps([seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))
"""


def checkpoint() -> Path:
    """The bf16 checkpoint, built once (deterministic: a fixed seed)."""
    folder = CACHE / "qwen3-0.4b-bf16"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    import tiny_checkpoints

    print(f"building the benchmark checkpoint in {folder} ...", file=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="qwen3-", dir=CACHE))
    try:
        tiny_checkpoints.build_qwen3(tmp)  # the real tokenizer files and Qwen3's settings
        (tmp / "model.safetensors").unlink()
        config = Qwen3Config.from_pretrained(tmp)
        config.update(SHAPES)
        config.layer_types = ["full_attention"] * config.num_hidden_layers
        torch.manual_seed(tiny_checkpoints.SEED)
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
        shards = sorted(tmp.glob("model-*.safetensors"))
        assert len(shards) == 3, [s.name for s in shards]
        tmp.rename(folder)  # config.json appears under the final name only when complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def llama_cpp_converter() -> Path:
    """convert_hf_to_gguf.py (with its conversion/ package and gguf-py) of the installed
    llama-cpp-python's sdist."""
    release = f"llama-cpp-python-{version('llama-cpp-python')}"
    folder = CACHE / release
    if (folder / "convert_hf_to_gguf.py").is_file():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"fetching llama.cpp's converter from the {release} sdist ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
                        "--no-deps", "-d", tmp, release.replace("-python-", "-python==")],
                       check=True)
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extraction_filter = getattr(tarfile, "data_filter", None)  # where Python has it
            top = tar.getnames()[0].split("/")[0]
            vendor = f"{top}/vendor/llama.cpp/"
            wanted = [m for m in tar.getmembers() if m.name.startswith(
                (vendor + "convert_hf_to_gguf.py", vendor + "conversion/", vendor + "gguf-py/"))]
            tar.extractall(tmp, members=wanted)
        Path(tmp, vendor).rename(folder)
    return folder


def measure(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of ``command`` in its own process."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *command], env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    seconds, peak_mb = json.loads(out)
    return seconds, peak_mb


def compare(repeats: int = REPEATS) -> dict[str, list[tuple[float, float]]]:
    ckpt, converter = checkpoint(), llama_cpp_converter()
    env = {**os.environ, "PYTHONPATH": str(converter / "gguf-py")}
    results: dict[str, list[tuple[float, float]]] = {"ours": [], "theirs": []}
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        out = Path(tmp, "out.gguf")
        runs = {
            "ours": lambda: measure([sys.executable, "-m", "spectrum_local", "convert", str(ckpt),
                                     "-o", str(out), "--outtype", "f16"]),
            "theirs": lambda: measure([sys.executable, str(converter / "convert_hf_to_gguf.py"),
                                       str(ckpt), "--outfile", str(out), "--outtype", "f16"], env),
        }
        written = {}
        for i in range(repeats + 1):
            for name, run in runs.items():
                result = run()
                if i == 0:  # a round that warms the page cache for both, not measured
                    written[name] = {k: t[:2] for k, t in read_index(out)[1].items()}
                else:
                    results[name].append(result)
                out.unlink()
    if written["ours"] != written["theirs"]:  # else the timings would not compare the same work
        raise RuntimeError("the two converters wrote different tensors")
    return results


def rows() -> list[tuple[str, ...]]:
    """(case, baseline, ours, baseline, measure, target, result), every cell a formatted string."""
    results = compare()
    (t_ours, m_ours), (t_theirs, m_theirs) = (
        [statistics.median(values) for values in zip(*results[name])] for name in ("ours", "theirs"))
    return [
        (CASE, BASELINE, f"{t_ours:.1f} s", f"{t_theirs:.1f} s", "ours / theirs", "<= 1.0",
         f"{t_ours / t_theirs:.2f}"),
        ("same, peak memory (RSS)", BASELINE, f"{m_ours:.0f} MB", f"{m_theirs:.0f} MB",
         "ours / theirs", "<= 0.6", f"{m_ours / m_theirs:.2f}"),
    ]


if __name__ == "__main__":
    for row in rows():
        print(" | ".join(row))
