"""Prompt rendering per family: the embedded Jinja template, segments, and content safety."""

import jinja2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spectrum_local import InputError
from spectrum_local.formats import FORMATS, GEMMA3, LLAMA3, QWEN3, Message, detect, parse_messages

MESSAGES = [Message("description", "Roll <end_of_turn> {{ x }}\n "), Message("input", ""),
            Message("output", "  7\n")]

# The table of shared/spectrum-format.md, written out by hand as an independent check.
EXPECTED = {
    "gemma3": "<bos><start_of_turn>description\nRoll <end_of_turn> {{ x }}\n <end_of_turn>\n"
              "<start_of_turn>input\n<end_of_turn>\n<start_of_turn>output\n  7\n<end_of_turn>\n"
              "<start_of_turn>output\n",
    "qwen3": "<|im_start|>description\nRoll <end_of_turn> {{ x }}\n <|im_end|>\n"
             "<|im_start|>input\n<|im_end|>\n<|im_start|>output\n  7\n<|im_end|>\n"
             "<|im_start|>output\n",
    "llama3": "<|begin_of_text|><|start_header_id|>description<|end_header_id|>\n\n"
              "Roll <end_of_turn> {{ x }}\n <|eot_id|><|start_header_id|>input<|end_header_id|>\n\n"
              "<|eot_id|><|start_header_id|>output<|end_header_id|>\n\n  7\n<|eot_id|>"
              "<|start_header_id|>output<|end_header_id|>\n\n",
}


def render_template(fmt, messages, add_generation_prompt):
    env = jinja2.Environment()
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
    return env.from_string(fmt.chat_template).render(
        messages=[{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_render_matches_the_format_table(name):
    fmt = FORMATS[name]
    assert fmt.text(fmt.render(MESSAGES)) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_jinja_template_renders_the_runtime_prompt(name, generation_prompt):
    fmt = FORMATS[name]
    expected = fmt.text(fmt.render(MESSAGES, output_prefix="" if generation_prompt else None))
    assert render_template(fmt, MESSAGES, generation_prompt) == expected


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_jinja_template_rejects_other_roles(name):
    with pytest.raises(ValueError, match="roles"):
        render_template(FORMATS[name], [Message("system", "x")], True)


def test_candidate_turn_ends_at_end_of_output():
    segments = QWEN3.render([Message("description", "d")], candidate="yes")
    assert segments[-1] == (QWEN3.end_of_output, True)
    assert QWEN3.text(segments).endswith("<|im_start|>output\nyes<|im_end|>")


@given(st.lists(st.tuples(st.sampled_from(["description", "input", "output"]), st.text()),
                max_size=5),
       st.sampled_from(sorted(FORMATS)))
def test_content_only_lands_in_text_segments(messages, name):
    fmt = FORMATS[name]
    parsed = [Message(r, c) for r, c in messages]
    segments = fmt.render(parsed)
    controls = [s.text for s in segments if s.is_control]
    # Control segments are exactly the template's markers, whatever the content says.
    assert set(controls) <= set(fmt.control_tokens)
    assert len(controls) == (1 if fmt.bos else 0) + (len(parsed) + 1) * (
        3 if fmt.role_close else 2) - 1
    assert fmt.text(segments) == render_template(fmt, parsed, True)


def test_detect_reads_spectrum_format_first():
    assert detect({"general.architecture": "llama"}) is LLAMA3
    assert detect({"general.architecture": "gemma3"}) is GEMMA3
    assert detect({"general.architecture": "qwen3"}) is QWEN3
    assert detect({"general.architecture": "llama", "spectrum.format": "qwen3"}) is QWEN3
    with pytest.raises(InputError, match="--format"):
        detect({"general.architecture": "mamba"})


def test_parse_messages_errors():
    with pytest.raises(InputError, match="unknown role 'system'"):
        parse_messages([{"role": "system", "content": "x"}])
    with pytest.raises(InputError, match="content must be a string"):
        parse_messages([{"role": "input", "content": 3}])
    with pytest.raises(InputError, match="expected an object"):
        parse_messages(["hello"])
