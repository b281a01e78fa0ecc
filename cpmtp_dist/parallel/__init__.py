"""Process groups, the parallel pieces of the model and its state, and the megatron-core compatibility layers."""

from cpmtp_dist.parallel.heavy_imports import import_megatron

import_megatron()  # before any module here imports megatron (see heavy_imports.py)
