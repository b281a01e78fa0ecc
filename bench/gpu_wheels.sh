#!/usr/bin/env bash
# The wheels a GPU machine without network lacks, for bench/gpu_check.sh: `make gpu-wheels` fills .whl/.
#
#   bench/gpu_wheels.sh [PYTHON]      # PYTHON: an interpreter with pip, torch and setuptools (default .venv/bin/python)
#
# Target: Python 3.12 on x86-64 Linux with torch 2.11+ preinstalled (and numpy, pyyaml, packaging, psutil,
# py-cpuinfo, ninja, msgpack, einops, tqdm, nvidia-ml-py), as on the machine bench/gpu_check.sh was written
# for. Binary wheels are fetched for CPython 3.12 manylinux whatever this machine runs; DeepSpeed has no
# wheel on the registry, so its sdist is built here into a pure-Python wheel (all its ops are JIT). Every
# download is --no-deps: the list below is the closure of the four packages' Requires-Dist minus what such a
# machine already has, one version each (two versions of a package stop an offline install).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-.venv/bin/python}}
OUT=.whl

PURE=(
    webdataset==1.0.2
    braceexpand==0.1.7  # webdataset
    hjson==3.1.0        # deepspeed
    pydantic==2.14.4    # deepspeed
    annotated-types==0.8.0    # pydantic
    typing-inspection==0.4.5  # pydantic
    typing-extensions==4.16.0 # pydantic 2.14 needs >= 4.16, newer than a 2026 image may hold
)
BINARY=(
    megatron-core==0.16.1  # a cp312 manylinux wheel (its datasets carry a compiled helper)
    pydantic-core==2.50.5  # pydantic 2.14.4 pins it
)

rm -rf "$OUT" && mkdir -p "$OUT"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$OUT" "${BINARY[@]}" "${PURE[@]}"
# DeepSpeed's setup.py imports torch: build without isolation, against the interpreter's own torch (the ops
# are compiled on first use, so the wheel does not depend on that torch's version or CUDA).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$OUT" deepspeed==0.19.8

ls -1 "$OUT"
du -sh "$OUT"
