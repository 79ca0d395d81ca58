"""Clients that desktop tools and evaluation scripts use, unchanged, against a real
``spectrum-local serve`` on loopback: ``llm`` with a chat-model entry, langchain's
``ChatOpenAI``, and lm-evaluation-harness's ``local-chat-completions`` on a local task file.
Each one's answers must be what the ``openai`` SDK gets for the same messages: the clients
add nothing and lose nothing.

The server runs the tiny F32 Qwen3 (exact numbers on any CPU); its random weights give
arbitrary text, so the tests compare clients with each other, never with expected words.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from servers import running_server  # noqa: E402

pytestmark = pytest.mark.http

FAMILY = "qwen3"
SYSTEM = "Name a colour."
USER = "a warm one"


@pytest.fixture(scope="module")
def base_url(f32):
    with running_server(["--model", str(f32[FAMILY]), "--ctx", "1024"]) as url:
        yield url


@pytest.fixture(scope="module")
def name(f32) -> str:
    return f32[FAMILY].stem


@pytest.fixture(scope="module")
def sdk(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def sdk_reply(sdk, messages, **options) -> str:
    return sdk.chat.completions.create(model="", messages=messages,
                                       **options).choices[0].message.content


def test_llm_with_a_chat_model_entry(base_url, name, sdk, tmp_path):
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: spectrum\n  model_name: {name}\n  api_base: \"{base_url}/v1\"\n")
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path)}
    llm = [str(Path(sys.executable).parent / "llm"), "-m", "spectrum", "--system", SYSTEM,
           "-o", "seed", "3", "-o", "max_tokens", "8"]
    for streamed in (True, False):
        run = subprocess.run([*llm, *([] if streamed else ["--no-stream"]), USER], env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        want = sdk_reply(sdk, [{"role": "system", "content": SYSTEM},
                               {"role": "user", "content": USER}], seed=3, max_tokens=8)
        assert run.stdout.removesuffix("\n") == want


def test_langchain_chat_openai(base_url, name, sdk):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=f"{base_url}/v1", api_key="unused", model=name, seed=5,
                      max_tokens=10, temperature=1.0, max_retries=0)
    history = [SystemMessage(SYSTEM), HumanMessage("a warm one"), AIMessage("red"),
               HumanMessage("a cold one")]
    want = sdk_reply(sdk, [{"role": "system", "content": SYSTEM},
                           {"role": "user", "content": "a warm one"},
                           {"role": "assistant", "content": "red"},
                           {"role": "user", "content": "a cold one"}], seed=5, max_tokens=10)
    assert chat.invoke(history).content == want
    assert "".join(chunk.content for chunk in chat.stream(history)) == want
    scored = chat.bind(logprobs=True, top_logprobs=2).invoke(history)
    content = scored.response_metadata["logprobs"]["content"]
    assert "".join(entry["token"] for entry in content).startswith(want[:1])
    assert all(len(entry["top_logprobs"]) <= 2 for entry in content)


TASK = """task: spectrum_chat_check
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_lm_eval_local_chat_completions(base_url, name, sdk, tmp_path, monkeypatch):
    """lm-eval's generations are the SDK's greedy answers to the messages it sent, and its
    exact_match is the share of them equal to their target."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = [{"question": f"a colour number {i}", "answer": a}
            for i, a in enumerate(["red", "blue", "", "green"])]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "check.yaml").write_text(TASK.format(data=data))
    found = simple_evaluate(
        model="local-chat-completions",
        model_args={"model": name, "base_url": f"{base_url}/v1/chat/completions",
                    "num_concurrent": 1, "max_retries": 1},
        tasks=["spectrum_chat_check"], task_manager=TaskManager(include_path=str(
            tmp_path / "tasks")), apply_chat_template=True, system_instruction=SYSTEM,
        log_samples=True)
    samples = found["samples"]["spectrum_chat_check"]
    assert len(samples) == len(docs)
    hits = 0
    for sample in samples:
        (chat,), _ = sample["arguments"][0]  # the messages lm-eval sent, as JSON text
        messages = json.loads(chat)
        assert messages[0] == {"role": "system", "content": SYSTEM}
        want = sdk_reply(sdk, messages, temperature=0, max_tokens=6, seed=1234, stop=["\n"])
        assert sample["resps"][0][0] == want
        hits += want == sample["target"]
    assert found["results"]["spectrum_chat_check"]["exact_match,none"] == hits / len(docs)
