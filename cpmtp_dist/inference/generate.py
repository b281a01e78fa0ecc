"""Loading a checkpoint, saved at any training layout, into one process for decoding and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cpmtp_dist.config import Config
from cpmtp_dist.config_io import load_config
from cpmtp_dist.data.tokenizer import Tokenizer, load_tokenizer
from cpmtp_dist.model.cp_model import CPModel
from cpmtp_dist.parallel.state import initialize_parallel
from cpmtp_dist.training.checkpoint import latest_checkpoint, read_model_state


@dataclass
class LoadedModel:
    model: CPModel
    tokenizer: Tokenizer
    config: Config
    checkpoint: Path


def load_for_inference(path: Path, device: torch.device | None = None) -> LoadedModel:
    """Load a checkpoint folder (or a run's `checkpoints/` folder, taking the newest) into one process."""
    ckpt = latest_checkpoint(Path(path))
    if ckpt is None:
        raise FileNotFoundError(f"{path} holds no complete checkpoint (a folder with meta.json and state/)")
    cfg = load_config(ckpt / "config.yaml")
    initialize_parallel(1, 1, 1, seed=cfg.train.seed)
    device = device or torch.device("cpu")
    model = CPModel(cfg.model).to(device)
    result = model.load_state_dict(read_model_state(ckpt), strict=False)
    params = {name for name, _ in model.named_parameters()}
    wrong = [k for k in result.missing_keys if k in params] + list(result.unexpected_keys)
    if wrong:
        raise ValueError(f"{ckpt}: its weights do not fit the model of its config.yaml: {wrong[:5]}")
    model.eval()
    return LoadedModel(model, load_tokenizer(ckpt / "tokenizer"), cfg, ckpt)
