"""Decoding, sampling, evaluation and the decode benchmark."""

from cpmtp_dist.parallel.heavy_imports import import_megatron

import_megatron()  # before any module here imports megatron (see heavy_imports.py)
