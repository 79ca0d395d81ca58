"""The converter holds up: bad input is one line and an exit code, Ctrl-C exits at once, SIGKILL
and a full disk never leave a complete-looking file that is not one.

Everything runs the real `spectrum-local convert` (and llama.cpp's real quantizer) in
subprocesses. Two checkpoints: the tiny Gemma 3 (600-token vocabulary, converts in ~0.3 s) for
bad input, and a wider one (126 M parameters, 250 MB bf16; F16 ~1 s, Q8_0 ~2 s, Q4_K_M ~8 s on
2 cores) slow enough to be interrupted halfway.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest

from spectrum_local.convert import convert
from spectrum_local.errors import SpectrumError

sys.path.insert(0, str(Path(__file__).parent))
import tiny_checkpoints  # noqa: E402

CLI = [sys.executable, "-m", "spectrum_local", "convert"]
WIDE_LAYERS = 8


@pytest.fixture(scope="session")
def small(tmp_path_factory) -> Path:
    return tiny_checkpoints.build_gemma3(tmp_path_factory.mktemp("robust") / "gemma3")


@pytest.fixture(scope="session")
def wide(small, tmp_path_factory) -> Path:
    return tiny_checkpoints.build_gemma3_wide(small, tmp_path_factory.mktemp("wide") / "wide",
                                              WIDE_LAYERS)


def run(*args, limit: int | None = None) -> subprocess.CompletedProcess:
    """`spectrum-local convert ARGS`, with a file size limit if given."""
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300,
                          preexec_fn=file_size_limit(limit) if limit else None)


def file_size_limit(limit: int):
    """A preexec_fn: files cannot grow past ``limit`` bytes, as on a full disk; SIGXFSZ is
    ignored (else the kernel kills the process) so that the write fails with EFBIG instead."""
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return preexec


def assert_fails(proc: subprocess.CompletedProcess, code: int, pattern: str) -> None:
    """Exit ``code``, one `Error: ...` line matching ``pattern``, no traceback."""
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error: ")]
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1, proc.stderr
    assert re.search(pattern, errors[0]), errors[0]


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def quantizer_children(marker: Path) -> list[int]:
    """Live llama.cpp quantizer processes working on files under ``marker`` (Linux /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
            state = (proc / "stat").read_text().split(")")[-1].split()[0] if cmdline else "Z"
        except OSError:
            continue
        if state != "Z" and b"convert.quantize" in cmdline and str(marker).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def wait_for(condition, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


# --- bad input, through the command line -------------------------------------------------------

def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def _read_header(shard: Path) -> tuple[dict, bytes]:
    """A safetensors file's JSON header and its tensor data."""
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _rewrite_header(folder: Path, edit) -> None:
    shard = folder / "model.safetensors"
    header, tensors = _read_header(shard)
    edit(header)
    raw = json.dumps(header).encode()
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw + tensors)


def _index_with_missing_shard(folder: Path) -> None:
    first = folder / "model-00001-of-00002.safetensors"
    (folder / "model.safetensors").rename(first)
    weight_map = {name: first.name for name in _read_header(first)[0] if name != "__metadata__"}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


BAD_CHECKPOINTS = {
    "missing_config": (lambda f: (f / "config.json").unlink(), "no config.json"),
    "config_not_json": (lambda f: (f / "config.json").write_text('{"architectures": ['),
                        r"config.json: not valid JSON \(Expecting value at line 1"),
    "config_not_an_object": (lambda f: (f / "config.json").write_text("[1, 2]"),
                             "config.json: expected a JSON object, found list"),
    "config_missing_a_key": (lambda f: _edit_config(f, num_hidden_layers=None),
                             "config.json has no 'num_hidden_layers'"),
    "unsupported_architecture": (lambda f: _edit_config(f, architectures=["MistralForCausalLM"]),
                                 "unsupported architecture MistralForCausalLM; supported: Gemma3"),
    "index_names_a_missing_shard": (_index_with_missing_shard,
                                    "shard model-00002-of-00002.safetensors listed in .* missing"),
    # the header claims more tensor bytes than the file has (an interrupted download)
    "truncated_shard": (lambda f: os.truncate(f / "model.safetensors",
                                              (f / "model.safetensors").stat().st_size // 2),
                        r"model.safetensors: truncated: tensor .* ends at byte \d+ but the file "
                        r"has \d+ bytes"),
    # cut inside the header itself
    "truncated_header": (lambda f: os.truncate(f / "model.safetensors", 100),
                         "not a valid safetensors file .*Need \\d+ bytes, got 100"),
    "header_entry_without_offsets": (
        lambda f: _rewrite_header(f, lambda h: h["model.norm.weight"].pop("data_offsets")),
        "not a valid safetensors file .*data_offsets"),
    "tensor_size_not_its_shape": (
        lambda f: _rewrite_header(f, lambda h: h["model.norm.weight"].update(shape=[3])),
        "tensor model.norm.weight has 1024 bytes, its shape \\[3\\] in F32 needs 12"),
    # found on the way: this used to convert "fine" into a GGUF that llama.cpp cannot load
    "checkpoint_missing_a_tensor": (
        lambda f: _rewrite_header(f, lambda h: h.pop("model.layers.2.mlp.up_proj.weight")),
        "lacks tensors of its 6-layer gemma3 model .*: blk.2.ffn_up.weight"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_is_one_line_and_exit_2(case, small, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(small, folder)
    break_it, message = BAD_CHECKPOINTS[case]
    break_it(folder)
    out = tmp_path / "out"
    out.mkdir()
    assert_fails(run(folder, "-o", out / "x.gguf"), 2, message)
    assert files_in(out) == []


@pytest.mark.parametrize("parent", ["missing", "a_file"])
def test_output_folder_that_is_not_one_creates_nothing(parent, small, tmp_path):
    if parent == "a_file":
        (tmp_path / "a_file").write_text("not a folder")
    before = files_in(tmp_path)
    expected = "does not exist" if parent == "missing" else "is not a folder"
    assert_fails(run(small, "-o", tmp_path / parent / "x.gguf"), 2,
                 f"output folder {tmp_path / parent} {expected}")
    assert files_in(tmp_path) == before


def test_output_gets_normal_permissions(small, tmp_path):
    # found on the way: the output kept mkstemp's 0600, unreadable by other users
    result = convert(small, tmp_path / "x.gguf", progress=False)
    umask = os.umask(0)
    os.umask(umask)
    assert result.path.stat().st_mode & 0o777 == 0o666 & ~umask


# --- the read-back check ----------------------------------------------------------------------

def test_read_back_check_agrees_with_gguf_reader_and_catches_damage(small, tmp_path):
    """The check after writing reads only the header (not the vocabulary, as gguf.GGUFReader
    would): it finds what GGUFReader finds, and a lost tail, tensor or key."""
    from spectrum_local.convert.writer import read_index, validate
    path = convert(small, tmp_path / "x.gguf", "f16", progress=False).path
    fields, tensors, data_start = read_index(path)
    reader = gguf.GGUFReader(path)
    assert sorted(fields) == sorted(k for k in reader.fields if not k.startswith("GGUF."))
    for key, value in fields.items():  # arrays as their length
        field = reader.fields[key]
        array = field.types[0] == gguf.GGUFValueType.ARRAY
        assert value == (len(field.contents()) if array else field.contents()), key
    assert reader.data_offset == data_start
    for t in reader.tensors:
        assert tensors[t.name] == (t.tensor_type, tuple(reversed(t.shape.tolist())),
                                   t.data_offset - data_start)
    expected = {name: (t, shape) for name, (t, shape, _) in tensors.items()}
    assert validate(path, expected, set(fields))["general.name"] == "gemma3"
    with pytest.raises(SpectrumError, match="missing \\['blk.9.attn_q.weight'\\]"):
        validate(path, {**expected, "blk.9.attn_q.weight": expected["blk.0.attn_q.weight"]},
                 set(fields))
    with pytest.raises(SpectrumError, match="metadata keys missing: \\['spectrum.other'\\]"):
        validate(path, expected, {*fields, "spectrum.other"})
    os.truncate(path, path.stat().st_size - 40)  # padding after a tensor is under 32 bytes
    with pytest.raises(SpectrumError, match="truncated"):
        validate(path, expected, set(fields))
    os.truncate(path, 1000)
    with pytest.raises(SpectrumError, match="does not read back as GGUF"):
        validate(path, expected, set(fields))


# --- Ctrl-C ------------------------------------------------------------------------------------

def start(*args) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *map(str, args)], stderr=subprocess.PIPE, text=True)


def interrupt(proc: subprocess.Popen) -> tuple[int, float, str]:
    """SIGINT (what Ctrl-C sends); the exit code, the seconds it took to exit, the stderr."""
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stderr = proc.stderr.read()
    return proc.wait(timeout=60), time.monotonic() - sent, stderr


def test_ctrl_c_while_writing_tensors(wide, tmp_path):
    proc = start(wide, "-o", tmp_path / "x.gguf", "--outtype", "f16")
    # the temporary file appears when the header is written; tensors follow at once
    assert wait_for(lambda: any(n.endswith(".part") for n in files_in(tmp_path)), 30)
    code, seconds, stderr = interrupt(proc)
    assert code == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert "wrote" not in stderr  # it was stopped, not finished
    assert seconds < 2
    assert files_in(tmp_path) == []


def test_ctrl_c_during_llama_cpp_quantization_is_prompt(wide, tmp_path):
    """llama.cpp's quantizer (~8 s here, minutes on a real model) is one C call: in-process, a
    Ctrl-C would wait for it. It runs in a child process that is killed instead."""
    proc = start(wide, "-o", tmp_path / "x.gguf", "--outtype", "q4_k_m")
    for line in proc.stderr:
        if line.startswith("quantizing"):
            break
    time.sleep(0.5)  # well inside the quantization
    code, seconds, stderr = interrupt(proc)
    assert code == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr and "quantized" not in stderr
    assert seconds < 2
    assert files_in(tmp_path) == []  # neither the output nor the intermediate, nor temporaries
    assert wait_for(lambda: not quantizer_children(tmp_path))


# --- SIGKILL -----------------------------------------------------------------------------------

def test_sigkill_at_any_moment_never_leaves_an_incomplete_file(wide, tmp_path):
    """Killed at 10 moments spread over a Q8_0 conversion (writing the intermediate, quantizing,
    checking, renaming), the final path is absent or a complete GGUF. What may remain is only
    the hidden `.NAME.*.part` temporaries (SIGKILL cannot be caught, so nothing can remove them
    at that moment): the next run for the same target removes them (test below)."""
    ref = tmp_path / "ref"
    ref.mkdir()
    started = time.monotonic()
    assert run(wide, "-o", ref / "x.gguf", "--outtype", "q8_0").returncode == 0
    duration = time.monotonic() - started
    n_tensors = len(gguf.GGUFReader(ref / "x.gguf").tensors)

    rng = random.Random(0)
    outcomes = []
    for i in range(10):  # one random moment in each tenth of the run (stretched: timing varies)
        delay = duration * 1.25 * (i + rng.random()) / 10
        folder = tmp_path / f"kill{i}"
        folder.mkdir()
        proc = subprocess.Popen([*CLI, wide, "-o", folder / "x.gguf", "--outtype", "q8_0"],
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        final = folder / "x.gguf"
        if final.exists():
            assert len(gguf.GGUFReader(final).tensors) == n_tensors
            assert final.stat().st_size == (ref / "x.gguf").stat().st_size
        leftovers = [n for n in files_in(folder) if n != "x.gguf"]
        assert all(n.startswith((".x.gguf.", ".x.BF16.gguf.")) and n.endswith(".part")
                   for n in leftovers), leftovers
        # the quantizer child dies with its parent (PR_SET_PDEATHSIG), no orphan keeps writing
        assert wait_for(lambda: not quantizer_children(folder)), f"orphan after kill {i}"
        outcomes.append((round(delay, 2), final.exists(), leftovers))
    print(f"run {duration:.1f} s; kills (delay, finished, leftovers): {outcomes}")
    assert any(not done and leftovers for _, done, leftovers in outcomes)  # some hit mid-run


def test_next_run_removes_stale_temporaries_but_not_a_live_runs(small, tmp_path):
    stale = [tmp_path / ".x.gguf.dead1234.part", tmp_path / ".x.F32.gguf.dead5678.part"]
    live = tmp_path / ".x.gguf.live9999.part"
    unrelated = tmp_path / ".y.gguf.other.part"
    for p in (*stale, live, unrelated):
        p.write_bytes(b"GGUF partial")
    with open(live, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # what a running conversion holds on its temporary file
        convert(small, tmp_path / "x.gguf", outtype="q8_0", progress=False)
    assert files_in(tmp_path) == sorted([live.name, unrelated.name, "x.gguf"])


# --- a full disk -------------------------------------------------------------------------------

@pytest.mark.parametrize("limit", [1000, 3_000_000])  # in the header; in the tensor data
def test_disk_full_while_writing(limit, small, tmp_path):
    """The write fails with EFBIG (Python's write) or a short write (numpy's tofile, no errno)."""
    proc = run(small, "-o", tmp_path / "x.gguf", "--outtype", "f16", limit=limit)
    assert_fails(proc, 1, f"no space left on the device or file too large while writing "
                          f"{tmp_path / 'x.gguf'}")
    assert files_in(tmp_path) == []


def test_disk_full_while_writing_the_intermediate(wide, tmp_path):
    proc = run(wide, "-o", tmp_path / "x.gguf", "--outtype", "q8_0", limit=30_000_000)
    assert_fails(proc, 1, f"no space left .* while writing {tmp_path / 'x.BF16.gguf'}")
    assert files_in(tmp_path) == []


def test_disk_full_in_llama_cpp_quantizer(small, tmp_path):
    """A per-file size limit cannot stop the converter's own, larger, intermediate and then the
    smaller quantized file, so the quantizer step runs alone here, on a finished F32 GGUF.
    llama.cpp 0.3.36 does not abort on a failed write: it returns 1 ("iostream error")."""
    source = convert(small, tmp_path / "src.gguf", outtype="f32", progress=False).path
    out = tmp_path / "out"
    out.mkdir()
    code = ("import sys\nfrom pathlib import Path\n"
            "from spectrum_local.convert.files import staged\n"
            "from spectrum_local.convert.quantize import quantize\n"
            "from spectrum_local.errors import SpectrumError\n"
            "target = Path(sys.argv[2])\n"
            "try:\n"
            "    with staged(target) as tmp:\n"
            "        quantize(Path(sys.argv[1]), tmp, 'q8_0', target, False)\n"
            "except SpectrumError as e:\n"
            "    sys.exit(f'Error: {e}')\n")
    proc = subprocess.run([sys.executable, "-c", code, source, out / "x.gguf"], capture_output=True,
                          text=True, timeout=120, preexec_fn=file_size_limit(500_000))
    assert_fails(proc, 1, f"no space left .* while writing {out / 'x.gguf'} \\(llama.cpp's "
                          f"quantizer failed: .*iostream error\\)")
    assert files_in(out) == []
