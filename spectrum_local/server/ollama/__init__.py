"""The Ollama API (``/api/*``), for the desktop tools whose only local provider is "Ollama":
version, tags, ps, show, generate and chat, streamed as NDJSON by default, with ``options``,
``logprobs`` and ``top_logprobs``, and Ollama's counts and durations.

- ``protocol.py``   the request bodies and their checks (``options`` mapped to the sampler)
- ``routes.py``     the routes, thin: the plan and the generation are the chat route's
  (``openai.serving``), the answers Ollama's shapes

Where this server differs from Ollama, it says so:

- Roles map as on /v1/chat/completions: system is the description, user an input, assistant an
  output; spectrum's own roles are accepted. A final assistant message is continued (as Ollama
  does). /api/generate's ``prompt`` is an input and ``system`` the description; with ``raw``
  the prompt is the whole prompt, its control-token markers parsed.
- Sampling defaults are untruncated (temperature 1, no top_k, top_p or min_p): the model's own
  distribution (Ollama's defaults are 0.8, 40 and 0.9). ``num_predict`` defaults to the rest of
  the context. ``num_ctx`` above the loaded context is refused (the context is set when the
  server starts, ``--ctx``); at or below it, it changes nothing.
- Options with no llama.cpp sampler here (presence/frequency penalties, typical_p, tfs_z,
  mirostat, a repeat_last_n other than 64) are a 400 naming them; loading options are ignored.
- One model, loaded once: pull, push, copy, create, delete and embeddings are refused with a
  400 saying so; ``keep_alive`` is ignored; /api/ps lists the model as never expiring.
- The model's name is the served name with ``:latest``; the name alone and the file name are
  accepted too. Its digest names the file (name, size, time) without hashing it.
- Errors are Ollama's ``{"error": message}``, with the status a refusal has on every route.
"""

from .routes import router

__all__ = ["router"]
