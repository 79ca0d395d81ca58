"""The OpenAI-compatible routes, as vLLM serves them: ``POST /v1/completions``,
``POST /v1/chat/completions``, ``GET /v1/models``, ``POST /tokenize``, ``POST /detokenize`` and
``GET /tokenizer_info``.

- ``protocol.py``   the request bodies and their validators (vLLM's fields, checks and wording;
  the sampling bounds shared with the native routes come from ``ops``)
- ``serving.py``    the plan (checks that need the model, prompts tokenised) and the generation
- ``logprobs.py``, ``responses.py``   the answers in vLLM's shapes, whole or streamed
- ``routes.py``     the routes, thin

A client written for a vLLM server works against this one unchanged: the request fields, the
response shapes, the streaming chunks, the error bodies and their wording follow vLLM's own
sources (vllm/entrypoints/openai/completion/{protocol,serving}.py, .../engine/protocol.py,
vllm/entrypoints/serve/tokenize/, vllm/sampling_params.py, vllm/logprobs.py,
vllm/v1/engine/logprobs.py, vllm/renderers/params.py). Where this server differs, it says so:

- Sampling defaults are untruncated (temperature 1, top_p 1, top_k off, min_p 0): exactly the
  model's distribution, which is what a spectrum-tuned model is for. (vLLM takes defaults from
  the model's generation_config.json; a GGUF has none.)
- The bounds of n, temperature, top_p, min_p and repetition_penalty, and their messages, are
  those of ``spectrum-local sample`` and /spectrum/v1/sample (``ops.SampleOptions``), e.g.
  "temperature must be at least 0, got -1" (vLLM: "temperature must be non-negative, got
  -1.0."); n × prompts <= ops.SERVER_MAX_N (vLLM: 16384); logprobs and prompt_logprobs <= 20
  (vLLM's default --max-logprobs, same message). ``owned_by`` is "spectrum-local".
- The model id is the served name: ``--served-model-name``, or the GGUF's file name without
  ``.gguf`` (vLLM: the --model argument), so no answer shows a local path; the file name with
  ``.gguf`` is accepted as an alias. Any other non-empty ``model`` is a 404, as in vLLM; an
  absent or empty one means the loaded model.
- Chat's roles are spectrum's: system and developer are the description, user an input,
  assistant an output (an example), and spectrum's own roles pass as they are; content is a
  string or text parts (joined by newlines, as vLLM joins them), never control tokens. The
  reply is a sample of the next output turn, ending at its end-of-output token; with
  ``continue_final_message`` (and ``add_generation_prompt: false``), or with
  ``add_generation_prompt: false`` alone, it continues a final assistant message instead
  (a spectrum prompt always ends in a turn, so the two mean the same here). max_tokens
  defaults to the rest of the context, as in vLLM. Tools, function calls, images, echo,
  prompt_logprobs and chat_template are a 400 naming them.
- /tokenizer_info's ``eos_token`` is the end of an output turn (the token a reply ends on),
  its ``chat_template`` the spectrum template of the GGUF, ``tokenizer_class`` "GGUFTokenizer"
  (llama.cpp's own, from the GGUF; vLLM: the Hugging Face class).
- vLLM options this server cannot honour (beam search, penalties other than
  repetition_penalty, logit_bias, structured outputs, ...) are a 400 naming the option when set
  to anything but their default, rather than silently ignored. Unknown fields are ignored.
- ``repetition_penalty`` maps to llama.cpp's repeat penalty (over the last 64 tokens).
- As in vLLM, a stop token (the model's end-of-generation tokens, stop_token_ids) counts in
  token_ids, usage and logprobs but not in the text; its stop_reason is its id when it came
  from stop_token_ids, else None. A choice whose client went away ends "abort".
- A token's text in ``logprobs`` is its piece as llama.cpp spells it (control tokens as their
  marker, as HF ``decode([id])`` does); /tokenize's ``token_strs`` are those pieces too (vLLM:
  the raw vocabulary entries, e.g. "▁Hello").
"""

from .routes import router

__all__ = ["router"]
