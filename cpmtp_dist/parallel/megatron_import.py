"""megatron-core imported without its JIT fuser: about 3 s less start-up for every process.

At import, megatron decorates its fused kernels (bias-GeLU, bias-SwiGLU, bias-dropout-add, ...) with
`torch.compile`, which imports torch._dynamo and inductor even if no kernel is ever called (measured on 2
cores: importing the trainer took 9.3-12.0 s with them, 6.8 s without). Our trunk turns every megatron
fusion off (`model/trunk.py`: `bias_activation_fusion=False` and the rest), so those kernels never run:
`import_megatron` imports megatron.core once with `torch.compile` standing in as a no-op decorator, and puts
the real one back. Each package that uses megatron (`parallel`, `model`, `inference`) calls it in its
`__init__`, before any of its modules imports megatron; a later `torch.compile` of our own is untouched.
"""

from __future__ import annotations

import sys
from typing import Any


def _no_compile(fn: Any = None, **_options: Any) -> Any:
    """`torch.compile(fn)` and `@torch.compile(...)` alike, returning the function itself."""
    return fn if fn is not None else (lambda f: f)


def import_megatron() -> None:
    """Import megatron.core (once per process) with a no-op `torch.compile`."""
    if "megatron.core" in sys.modules:
        return
    import torch

    real = torch.compile
    torch.compile = _no_compile
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = real
