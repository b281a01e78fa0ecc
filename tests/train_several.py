"""Train several configurations one after another in one launch, so that the imports and start-up, most of a
small run's cost, are paid once (tests run it under torchrun):

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/train_several.py RUN_ROOT CASES

CASES is JSON mapping a run name to its dotted overrides of configs/tiny.yaml; each run is validated for the
launch's world size and writes RUN_ROOT/<name>, untracked. Run from the repository root.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed.runtime.bf16_optimizer as bf16_optimizer

from cpmtp_dist.config_io import load_config, validate_config
from cpmtp_dist.training.trainer import train


def main(argv: list[str]) -> None:
    root, cases = Path(argv[0]), json.loads(argv[1])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # DeepSpeed's BF16_Optimizer (bf16 at ZeRO-1) reports memory while it is built, each time after a full
    # gc.collect(): ~2 s per engine, for a print nobody reads here.
    bf16_optimizer.see_memory_usage = lambda *args, **kwargs: None
    for name, overrides in cases.items():
        cfg = load_config("configs/tiny.yaml", [*overrides, "tracking.enabled=false"])
        validate_config(cfg, world_size=world_size)
        train(cfg, root / name)


if __name__ == "__main__":
    main(sys.argv[1:])
