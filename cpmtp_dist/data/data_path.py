"""`data.path`, without torch: config validation parses it before anything is read.

A prepared dataset (`cpmtp data shards`) is read by `data/shards.py`; this module only says which folders,
with which weights, a `data.path` names.
"""

from __future__ import annotations

from cpmtp_dist.errors import UserError

__all__ = ["ShardError", "parse_data_path"]


class ShardError(UserError):
    """A prepared dataset that cannot be read as it is: the message names the file and what to do."""


def parse_data_path(spec: str) -> list[tuple[float, str]]:
    """`data.path`: one folder, or a blend as Megatron writes it: "W1 DIR1 W2 DIR2 ..." (weights > 0,
    normalised to sum 1)."""
    parts = spec.split()
    if len(parts) == 1:
        return [(1.0, parts[0])]
    if not parts or len(parts) % 2:
        raise ShardError(
            f"data.path={spec!r}: give one folder, or weight/folder pairs such as '0.7 /data/code 0.3 /data/prose'"
        )
    pairs = []
    for w, p in zip(parts[::2], parts[1::2], strict=True):
        try:
            weight = float(w)
        except ValueError:
            raise ShardError(
                f"data.path={spec!r}: {w!r} is not a weight; write weight/folder pairs"
            ) from None
        if not weight > 0:
            raise ShardError(f"data.path={spec!r}: weight {w} of {p} must be > 0")
        pairs.append((weight, p))
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]
