"""spectrum-local: run spectrum-tuned language models offline on llama.cpp.

    import spectrum_local
    model = spectrum_local.load()          # or load("model.gguf", gpu_layers=..., ctx=...)
    model.score([{"role": "description", "content": "Roll two dice. The sum?"}],
                [str(n) for n in range(2, 13)])
"""

from .errors import InputError, SpectrumError
from .model import SpectrumModel, load
from .results import CandidateScore, Sample, ScoreResult, TokenProb

__all__ = ["load", "SpectrumModel", "Sample", "TokenProb", "CandidateScore", "ScoreResult",
           "SpectrumError", "InputError"]
