"""serve: one model loaded behind HTTP (the app is ``spectrum_local.server``)."""

from __future__ import annotations

import click

from ..errors import InputError, SpectrumError
from .common import load_model
from .options import local_model_options


@click.command(epilog="""
\b
Examples:
  spectrum-local serve                                   # http://127.0.0.1:8717/
  spectrum-local serve --model spectrum-gemma-3-12b-v1-Q4_K_M.gguf --api-key s3cret
  spectrum-local serve --ollama-port 11434             # also where Ollama clients look
  curl -s localhost:8717/spectrum/v1/score --json '{"messages": [{"role": "description",
    "content": "Roll two six-sided dice. What is the sum of their values?"}],
    "candidates": "2..12"}'
""")
@local_model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback exposes the model to the network: "
                   "give it an --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8717, show_default=True)
@click.option("--api-key", envvar="SPECTRUM_LOCAL_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on every API route "
                   "(env: SPECTRUM_LOCAL_API_KEY).")
@click.option("--cors-origin", multiple=True, metavar="ORIGIN",
              help="Let pages from ORIGIN call the API (repeatable; e.g. an Electron or Tauri "
                   "app's origin). Default: no cross-origin access.")
@click.option("--allowed-host", multiple=True, metavar="NAME",
              help="Accept requests whose Host header is NAME (repeatable; '*' for any). "
                   "Default: on a loopback --host, only this machine's names (localhost, "
                   "*.localhost, 127.x.x.x, [::1]), so a web page that re-points its own name "
                   "at this machine (DNS rebinding) is refused; on a network --host, any.")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, metavar="SECONDS",
              help="Seconds a client has to send a request's headers, and again its body; "
                   "slower connections are closed (a slow body gets a 408).")
@click.option("--ollama-port", type=click.IntRange(1, 65535), metavar="PORT",
              help="Also listen on PORT, e.g. 11434 for tools that assume Ollama's port (the "
                   "Ollama API is at /api/ on --port too).")
@click.option("--served-model-name", metavar="NAME",
              help="The model id clients see and send (/v1/models, the \"model\" field). "
                   "Default: the file name without .gguf; its file name is accepted too.")
@click.option("--grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="On Ctrl-C or SIGTERM, seconds to let requests in flight finish.")
def serve(model, format_name, gpu_layers, threads, ctx, lora, no_lora, host, port,
          api_key, cors_origin, allowed_host, request_timeout, ollama_port, served_model_name,
          grace):
    """Keep one model loaded and answer HTTP: the native API, the OpenAI-compatible
    /v1/completions and /v1/chat/completions, the Ollama API under /api/, and a web page at /
    that charts scores, top tokens, enumerations and samples.

    In chat, the system message is the description, user messages are inputs and assistant
    messages are outputs (examples); the reply is a sample of the next output.

    Concurrent requests share decodes: samples advance together, scores go into one batch,
    and a prompt prefix already in the cache is not evaluated again. Needs the serve extra:
    pip install 'spectrum-local[serve]'.
    """
    try:
        import fastapi  # noqa: F401  the extra's packages, checked before the model loads
        import uvicorn  # noqa: F401

        from ..server import check_address, is_loopback, serve as run_server
    except ImportError as e:
        raise SpectrumError(f"serve needs its extra: pip install 'spectrum-local[serve]' ({e})") \
            from None
    check_address(host, port)
    if ollama_port is not None:
        if ollama_port == port:
            raise InputError(f"--ollama-port {ollama_port} is --port already: the Ollama API "
                             "is on --port anyway (under /api/); give another port or leave it out")
        check_address(host, ollama_port)
    if not is_loopback(host) and not api_key:
        click.echo(f"warning: binding {host} without --api-key: anyone who can reach this "
                   "machine can use the model", err=True)
    run_server(load_model(model, format_name, gpu_layers, threads, ctx, lora, no_lora), host=host,
               port=port, api_key=api_key, cors_origins=tuple(cors_origin),
               allowed_hosts=tuple(allowed_host), timeout=request_timeout, grace=grace,
               model_name=served_model_name, ollama_port=ollama_port)


COMMANDS = [serve]
