"""Start-up messages of optional backends that tell a PersonaFuse user nothing, dropped where they are logged.

Imported first by ``personafuse/__init__.py``, before anything can import the backend.
"""

from __future__ import annotations

import logging

# peft imports bitsandbytes whenever it is installed, so every run that builds a trainer loads it, quantized or
# not. On a CPU with AVX512-BF16, bitsandbytes then asks Hugging Face's `kernels` package to fetch an optional
# 4-bit kernel from the Hub and logs the failure (no such package, or this repo's own kernels/ folder under that
# name in a clone). PersonaFuse never downloads, and bitsandbytes' built-in CPU path is used instead.
DROPPED = {"bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",)}


class DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``; everything else passes."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


for _name, _prefixes in DROPPED.items():
    logging.getLogger(_name).addFilter(DropMessages(_prefixes))
