"""spectrum-local: run spectrum-tuned language models offline on llama.cpp.

    import spectrum_local
    model = spectrum_local.load()          # or load("model.gguf", gpu_layers=..., ctx=...)
    # or a server: spectrum-local serve, or vLLM (the remote extra)
    # model = spectrum_local.connect("http://gpu-box:8000")
    model.score([{"role": "description", "content": "Roll two dice. The sum?"}],
                [str(n) for n in range(2, 13)])
"""

from .errors import InputError, SpectrumError
from .model import SpectrumModel, load
from .results import (CandidateScore, EnumeratedOutput, EnumerateResult, Sample, ScoreResult,
                      TokenProb)


def connect(urls, **options):
    """A model on a server (see ``remote.connect``); imported here only when used, so the base
    install needs no HTTP client."""
    from .remote import connect as connect_remote

    return connect_remote(urls, **options)


__all__ = ["load", "connect", "SpectrumModel", "Sample", "TokenProb", "CandidateScore",
           "ScoreResult", "EnumeratedOutput", "EnumerateResult", "SpectrumError", "InputError"]
