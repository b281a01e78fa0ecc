"""Loading a checkpoint, saved at any training layout, into one process for decoding and evaluation.

Note: the model is built on the device it decodes on. Megatron places its rotary table, masks and KV cache on
the current CUDA device whenever CUDA is visible, so a model left on the CPU of a GPU machine would mix
devices; to decode on the CPU of such a machine the command line hides the GPUs first (`--device cpu`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cpmtp_dist.checkpoint_paths import latest_checkpoint
from cpmtp_dist.config import Config
from cpmtp_dist.config_io import load_config
from cpmtp_dist.data.tokenizer import Tokenizer, load_tokenizer
from cpmtp_dist.model.attention import decoding_attention
from cpmtp_dist.model.cp_model import CPModel
from cpmtp_dist.parallel.state import initialize_parallel
from cpmtp_dist.training.checkpoint import read_model_state
from cpmtp_dist.training.trainer import training_dtype


@dataclass
class LoadedModel:
    model: CPModel
    tokenizer: Tokenizer
    config: Config
    checkpoint: Path


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(choice: str) -> torch.device:
    """`--device`: auto (CUDA when available), cpu or cuda (the current CUDA device)."""
    if choice not in DEVICES:
        raise ValueError(f"--device {choice!r}: choose one of {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise ValueError("--device cuda: no CUDA device is visible to torch; use --device cpu (or auto)")
    if choice == "cpu" and cuda:
        raise ValueError(
            "--device cpu with CUDA visible: Megatron would put its rotary table and KV cache on the GPU; "
            "hide the GPUs (CUDA_VISIBLE_DEVICES=) before the process starts"
        )
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def load_for_inference(
    path: Path, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load a checkpoint folder (or a run's `checkpoints/` folder, taking the newest) into one process, on
    `device` (default: the CPU) in `dtype` (default: the training dtype there, `training_dtype`)."""
    ckpt = latest_checkpoint(Path(path))
    if ckpt is None:
        raise FileNotFoundError(f"{path} holds no complete checkpoint (a folder with meta.json and state/)")
    cfg = load_config(ckpt / "config.yaml")
    cfg.model.trunk.attention = decoding_attention(cfg.model.trunk.attention)
    initialize_parallel(1, 1, 1, seed=cfg.train.seed)
    device = device or torch.device("cpu")
    dtype = dtype or training_dtype(cfg, device)
    model = CPModel(cfg.model, params_dtype=dtype).to(device)
    state = read_model_state(ckpt)
    for name, p in model.named_parameters():
        if getattr(p, "glu_halves", False) and name in state:
            state[name] = state[name].reshape(p.shape)  # stored as (2, f, d): parallel/sharded_state.tp_view
    result = model.load_state_dict(state, strict=False)
    params = {name for name, _ in model.named_parameters()}
    wrong = [k for k in result.missing_keys if k in params] + list(result.unexpected_keys)
    if wrong:
        raise ValueError(f"{ckpt}: its weights do not fit the model of its config.yaml: {wrong[:5]}")
    model.eval()
    if not (ckpt / "tokenizer").is_dir():
        raise FileNotFoundError(
            f"{ckpt} holds no tokenizer/ (converted by `cpmtp convert from-hf` without --tokenizer?): convert "
            "again with --tokenizer DIR"
        )
    return LoadedModel(model, load_tokenizer(ckpt / "tokenizer"), cfg, ckpt)
