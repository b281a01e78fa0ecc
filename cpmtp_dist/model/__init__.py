"""The CP head, the trunk and the whole model."""

from cpmtp_dist.parallel.megatron_import import import_megatron

import_megatron()  # before any module here imports megatron (see megatron_import.py)
