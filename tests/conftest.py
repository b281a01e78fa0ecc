"""Set-up shared by every test file: which tests see the GPUs.

The suite is a CPU suite (gloo, fp32), and most of it assumes a process that sees no CUDA device: without
one, Megatron runs through the CPU compatibility layer (`parallel/megatron_compat.py`), which the meta-device
tests redirect; with one, the trainer would pick NCCL and bf16 and Megatron would place its buffers on the
GPU. So, unless `CPMTP_TEST_GPU=1`, this file hides every GPU before any test module imports torch:
`CUDA_VISIBLE_DEVICES=""`, which the processes the tests start (torchrun ranks, CLI subprocesses,
`mp.spawn` workers, Slurm jobs) inherit. The same suite then runs on a GPU machine as on a laptop, and tests
marked `gpu` skip.

With `CPMTP_TEST_GPU=1` (`bench/gpu_check.sh` sets it) the GPUs stay visible and only `gpu`-marked tests
run; the others skip, since they assume a CPU process. On a GPU machine:

    CPMTP_TEST_GPU=1 pytest -m gpu     # the GPU tests (tests/test_gpu.py)
    pytest                             # the CPU suite, GPUs hidden
"""

from __future__ import annotations

import os

import pytest

GPU_RUN = os.environ.get("CPMTP_TEST_GPU") == "1"
if not GPU_RUN:
    # Before torch initialises CUDA (it reads the variable once, on first use).
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if GPU_RUN:
        import torch

        no_cuda = None if torch.cuda.is_available() else "CPMTP_TEST_GPU=1, but torch sees no CUDA device"
        cpu_skip = pytest.mark.skip(reason="a CPU test: run it without CPMTP_TEST_GPU=1 (GPUs hidden)")
        for item in items:
            if item.get_closest_marker("gpu") is None:
                item.add_marker(cpu_skip)
            elif no_cuda:
                item.add_marker(pytest.mark.skip(reason=no_cuda))
        return
    gpu_skip = pytest.mark.skip(
        reason="needs a GPU: GPUs are hidden unless CPMTP_TEST_GPU=1 (tests/conftest.py)"
    )
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(gpu_skip)


@pytest.fixture(scope="session")
def layout_runs(tmp_path_factory: pytest.TempPathFactory):
    """The parity runs shared by the layout and reshard tests (tests/layout_runs.py)."""
    from layout_runs import LayoutRuns

    return LayoutRuns(tmp_path_factory.mktemp("layouts"))
