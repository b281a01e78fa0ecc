"""Decoding, sampling, evaluation and the decode benchmark."""

from cpmtp_dist.parallel.megatron_import import import_megatron

import_megatron()  # before any module here imports megatron (see megatron_import.py)
