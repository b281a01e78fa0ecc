"""cpmtp_dist: distributed pretraining with rank-r CP multi-token prediction heads."""

__version__ = "0.1.0"
