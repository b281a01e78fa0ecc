"""megatron-core and DeepSpeed, imported without what they import for features we do not use: about 6 s
less start-up for every training process (measured on 2 cores, medians of 3).

- megatron-core decorates its fused kernels (bias-GeLU, bias-SwiGLU, bias-dropout-add, ...) with
  `torch.compile` at import, which imports torch._dynamo and inductor although no kernel runs: our trunk turns
  every megatron fusion off (`model/trunk.py`: `bias_activation_fusion=False` and the rest). `import_megatron`
  imports megatron.core once with `torch.compile` standing in as a no-op decorator and puts the real one back
  (importing the trainer: 5.7 s instead of 9.2 s). Each package that uses megatron (`parallel`, `model`,
  `inference`) calls it in its `__init__`, before any of its modules imports megatron.
- DeepSpeed's autotuner (unused here) imports MLflow when it is installed, as it is for our tracking, which runs
  in a process of its own (`training/tracking_worker.py`). `import_deepspeed` imports deepspeed with `mlflow`
  hidden, then lets it be imported normally again (importing deepspeed: 0.7 s instead of 2.0-3.6 s). Every
  function that imports deepspeed calls it first.

A later `torch.compile` or `import mlflow` of our own is untouched.
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


def import_deepspeed() -> None:
    """Import deepspeed (once per process) while `import mlflow` fails."""
    if "deepspeed" in sys.modules:
        return
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # makes `import mlflow` raise ImportError
    try:
        import deepspeed  # noqa: F401
    finally:
        if hide:
            del sys.modules["mlflow"]
