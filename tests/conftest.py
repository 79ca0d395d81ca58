import pytest

import spectrum_local

DICE = [{"role": "description",
         "content": "Roll two six-sided dice. What is the sum of their values?"}]


@pytest.fixture(scope="session")
def model():
    """The default model: the real Gemma 3 270M Q4_K_M from PyPI (gemma3 format)."""
    m = spectrum_local.load(ctx=2048)
    yield m
    m.close()
