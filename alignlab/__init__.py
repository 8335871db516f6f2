"""alignlab: recipe-driven alignment and PEFT for language models."""

import logging

__version__ = "0.1.0"

# bitsandbytes logs a warning at import on CPUs with AVX512-BF16 when the optional `kernels` package (a hub download)
# is missing, then falls back to its own kernel, which works (QLoRA trains on CPU). Drop that one line of noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")
)
