"""The llama.cpp layer: the only code that imports ``llama_cpp``.

``native`` owns the C objects (one small class each), ``cache`` the KV sequences and the room,
``reads`` the token-trie reads, ``sampling`` the sampling jobs, and ``engine`` is the facade the
rest of the runtime uses (a ``backend.Backend``)."""

from .engine import Engine
from .native import (cpu_has_amx, cpu_name, quantize, supports_gpu_offload, system_info,
                     use_extra_buffer_types)
from .sampling import GenerateJob

__all__ = ["Engine", "GenerateJob", "cpu_has_amx", "cpu_name", "quantize",
           "supports_gpu_offload", "system_info", "use_extra_buffer_types"]
