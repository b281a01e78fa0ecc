"""Process groups, the parallel pieces of the model and its state, and the megatron-core compatibility layers."""

from cpmtp_dist.parallel.megatron_import import import_megatron

import_megatron()  # before any module here imports megatron (see megatron_import.py)
