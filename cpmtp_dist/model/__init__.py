"""The CP head, the trunk and the whole model."""

from cpmtp_dist.parallel.heavy_imports import import_megatron

import_megatron()  # before any module here imports megatron (see heavy_imports.py)
