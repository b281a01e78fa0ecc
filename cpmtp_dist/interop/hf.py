"""Hugging Face interop: a local `LlamaForCausalLM` folder (config.json + safetensors) to a cpmtp checkpoint
with fresh CP heads (`import_hf`), and a checkpoint's trunk back to such a folder, its CP head beside it
(`export_hf`). Needs the `hf` extra (`pip install -e .[hf]`) for safetensors and tokenizers; transformers
itself is not used. Names and layouts: `interop/llama.py`.

The CP head travels in `cp_head.safetensors` (`cp_head.<name>`: our `head.<name>`) and `cp_head.json`
(the `model.cp` settings), the cpmtp tokenizer in `cpmtp_tokenizer/` (a Hugging Face one also as
`tokenizer.json`); `import_hf` takes them back.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cpmtp_dist.config import CPHeadConfig
from cpmtp_dist.interop.llama import (
    ConversionError,
    expected_hf_shapes,
    hf_config_from_trunk,
    hf_to_trunk_state,
    trunk_config_from_hf,
    trunk_to_hf_state,
)
from cpmtp_dist.interop.safetensors_io import load_safetensors, read_hf_tensors, write_safetensors

HEAD_FILE = "cp_head.safetensors"
HEAD_CARD = "cp_head.json"
HEAD_PREFIX = "cp_head."
TOKENIZER_DIR = "cpmtp_tokenizer"


def _folder_head(model_dir: Path) -> tuple[CPHeadConfig, dict[str, Tensor]] | None:
    """The CP head `export_hf` wrote beside the trunk (`cp_head.json`, `cp_head.safetensors`), if any."""
    card = model_dir / HEAD_CARD
    if not card.is_file():
        return None
    if not (model_dir / HEAD_FILE).is_file():
        raise ConversionError(f"{card} has no {HEAD_FILE} beside it: copy it there, or pass --fresh-head")
    cp = CPHeadConfig(**json.loads(card.read_text())["cp"])
    tensors = load_safetensors().load_file(str(model_dir / HEAD_FILE))
    return cp, {k.removeprefix(HEAD_PREFIX): t for k, t in tensors.items()}


def choose_head(
    model_dir: Path, overrides: dict[str, Any], fresh: bool
) -> tuple[CPHeadConfig, dict[str, Tensor] | None]:
    """The head of the converted checkpoint: the folder's own (from `export_hf`) unless `fresh`, else a
    fresh one with `overrides` (horizon, rank, ... set on the command line) over the defaults."""
    given = {k: v for k, v in overrides.items() if v is not None}
    found = None if fresh else _folder_head(model_dir)
    if found is None:
        return CPHeadConfig(**given), None
    cp, tensors = found
    differ = {k: v for k, v in given.items() if getattr(cp, k) != v}
    if differ:
        settings = ", ".join(f"{k}={getattr(cp, k)}" for k in differ)
        raise ConversionError(
            f"{model_dir / HEAD_CARD} holds a CP head with {settings}: omit those options to keep it, or pass "
            "--fresh-head for a new head"
        )
    return cp, tensors


def _tokenizer(model_dir: Path, tokenizer_dir: Path | None, vocab_size: int, scratch: Path) -> Path | None:
    """The cpmtp tokenizer folder to ship: `--tokenizer`, else the folder's `cpmtp_tokenizer/`, else its
    Hugging Face `tokenizer.json` made into one under `scratch`; checked against the model's vocabulary."""
    from cpmtp_dist.data.hf_tokenizer import write_hf_tokenizer
    from cpmtp_dist.data.tokenizer import load_tokenizer

    if tokenizer_dir is None and (model_dir / TOKENIZER_DIR).is_dir():
        tokenizer_dir = model_dir / TOKENIZER_DIR
    if tokenizer_dir is None and (model_dir / "tokenizer.json").is_file():
        try:
            tokenizer_dir = write_hf_tokenizer(model_dir, scratch / "tokenizer")
        except ValueError as err:
            raise ConversionError(f"{err}; or pass --tokenizer DIR") from err
    if tokenizer_dir is None:
        return None
    tok = load_tokenizer(tokenizer_dir)
    if tok.vocab_size > vocab_size:
        raise ConversionError(
            f"the tokenizer {tokenizer_dir} has {tok.vocab_size} tokens, more than the model's vocab_size="
            f"{vocab_size} (config.json): pass a tokenizer of at most {vocab_size} tokens"
        )
    return tokenizer_dir


def import_hf(
    model_dir: Path,
    out: Path,
    cp_overrides: dict[str, Any],
    *,
    fresh_head: bool = False,
    tokenizer_dir: Path | None = None,
    seed: int = 1234,
) -> Path:
    """Convert the Llama folder `model_dir` into a checkpoint under `out` (`out/step_0000000`, `out/latest`,
    written by the training's own `save_checkpoint`); returns the checkpoint folder.

    The trunk comes from the folder, in the dtype of its weights; the CP head from the folder's
    `cp_head.*` (see `choose_head`) or fresh, drawn from `seed` as training's step 0 would draw it.
    Everything is checked before anything is written.
    """
    import yaml

    from cpmtp_dist.config import Config
    from cpmtp_dist.config_io import ConfigError, config_to_dict, validate_config
    from cpmtp_dist.training.checkpoint import start_checkpoint_writer

    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"--out {out} exists and is not empty: choose a new folder")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{model_dir} has no config.json: pass a save_pretrained folder as --model")
    trunk = trunk_config_from_hf(json.loads(config_file.read_text()), str(config_file))
    cp, head_state = choose_head(model_dir, cp_overrides, fresh_head)
    cfg = Config()
    cfg.model.trunk, cfg.model.cp = trunk, cp
    cfg.train.seed = seed
    cfg.data.tokenizer_vocab_size = trunk.vocab_size
    try:
        validate_config(cfg, world_size=1, cuda_available=False)
    except ConfigError as err:
        raise ConversionError(f"{config_file} and the head options make an invalid model: {err}") from err
    start_checkpoint_writer()  # forked now, while small: a spawned one would re-import an unguarded caller
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = _tokenizer(model_dir, tokenizer_dir, trunk.vocab_size, Path(scratch))
        hf = read_hf_tensors(model_dir, expected_hf_shapes(trunk))
        model, groups = _build_model(cfg, hf_to_trunk_state(hf, trunk), head_state)
        return _save(
            model, groups, out, yaml.safe_dump(config_to_dict(cfg), sort_keys=False), tokenizer_dir, model_dir
        )


@torch.no_grad()
def _build_model(cfg: Any, trunk_state: dict[str, Tensor], head_state: dict[str, Tensor] | None) -> Any:
    """One process's CPModel of `cfg` holding `trunk_state` (and `head_state`, else its seeded fresh head),
    in the dtype of the trunk's weights; and the process's groups."""
    from cpmtp_dist.model.cp_model import CPModel
    from cpmtp_dist.parallel.state import initialize_parallel

    groups = initialize_parallel(1, 1, 1, seed=cfg.train.seed)
    dtype = trunk_state["embedding.word_embeddings.weight"].dtype
    model = CPModel(cfg.model, params_dtype=dtype, seed=cfg.train.seed)
    params = dict(model.trunk.named_parameters())
    if set(params) != set(trunk_state):
        raise ConversionError(f"internal: trunk names differ: {sorted(set(params) ^ set(trunk_state))}")
    for name, p in params.items():
        p.copy_(trunk_state[name].reshape(p.shape))
    if head_state is not None:
        try:
            model.head.load_state_dict({k: t.to(dtype) for k, t in head_state.items()}, strict=True)
        except RuntimeError as err:
            raise ConversionError(f"{HEAD_FILE} does not fit its {HEAD_CARD}: {err}") from err
    return model, groups


def _save(
    model: Any, groups: Any, out: Path, config_yaml: str, tokenizer_dir: Path | None, src: Path
) -> Path:
    from cpmtp_dist.parallel.sharded_state import sharded_model_state
    from cpmtp_dist.training.checkpoint import save_checkpoint

    layout = {"tp": 1, "pp": 1, "ep": 1, "dp": 1, "zero_stage": 0}
    meta = {"tokens_seen": 0, "layout": layout, "converted_from": str(src)}
    return save_checkpoint(
        out,
        0,
        sharded_state=sharded_model_state(model, groups),
        meta=meta,
        config_yaml=config_yaml,
        tokenizer_dir=tokenizer_dir,
    )


def export_hf(checkpoint: Path, out: Path, max_shard_bytes: int = 0) -> list[str]:
    """Write the trunk of `checkpoint` (a checkpoint folder or a run's checkpoints/) as a LlamaForCausalLM
    folder `out`, its CP head as `cp_head.safetensors` + `cp_head.json` and its tokenizer as
    `cpmtp_tokenizer/`. Returns the files written."""
    from cpmtp_dist.checkpoint_paths import latest_checkpoint
    from cpmtp_dist.config_io import load_config
    from cpmtp_dist.data.tokenizer import load_tokenizer
    from cpmtp_dist.training.checkpoint import read_model_state

    st = load_safetensors()
    ckpt = latest_checkpoint(checkpoint)
    if ckpt is None:
        raise ConversionError(
            f"{checkpoint} holds no complete checkpoint (a folder with meta.json and state/)"
        )
    cfg = load_config(ckpt / "config.yaml")
    state = read_model_state(ckpt)
    trunk_state = {k.removeprefix("trunk."): t for k, t in state.items() if k.startswith("trunk.")}
    dtype = trunk_state["embedding.word_embeddings.weight"].dtype
    tok_dir = ckpt / "tokenizer"
    eos = load_tokenizer(tok_dir).eos_id if tok_dir.is_dir() else None
    config = hf_config_from_trunk(cfg.model.trunk, dtype, eos_id=eos)  # refuses before anything is written
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    files = [
        "config.json",
        *write_safetensors(trunk_to_hf_state(trunk_state, cfg.model.trunk), out, max_shard_bytes),
    ]
    head = {
        HEAD_PREFIX + k.removeprefix("head."): t.contiguous()
        for k, t in state.items()
        if k.startswith("head.")
    }
    st.save_file(head, str(out / HEAD_FILE), metadata={"format": "pt"})
    (out / HEAD_CARD).write_text(json.dumps(head_card(cfg, head, ckpt), indent=2) + "\n")
    files += [HEAD_FILE, HEAD_CARD]
    if tok_dir.is_dir():
        if (out / TOKENIZER_DIR).exists():
            shutil.rmtree(out / TOKENIZER_DIR)
        shutil.copytree(tok_dir, out / TOKENIZER_DIR)
        files.append(TOKENIZER_DIR + "/")
        files += _hf_tokenizer_files(tok_dir, out)
    return files


def _hf_tokenizer_files(tok_dir: Path, out: Path) -> list[str]:
    """A Hugging Face tokenizer (kind `hf`) also goes back where transformers looks for it: `tokenizer.json`
    and a `tokenizer_config.json` naming its EOS and pad tokens."""
    from cpmtp_dist.data.hf_tokenizer import HF_FILE

    card = json.loads((tok_dir / "tokenizer.json").read_text())
    if card.get("kind") != "hf":
        return []
    shutil.copyfile(tok_dir / HF_FILE, out / "tokenizer.json")
    vocab = json.loads((tok_dir / HF_FILE).read_text())
    added = {t["id"]: t["content"] for t in vocab.get("added_tokens", [])}
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    config |= {
        name: added[card[key]]
        for name, key in (("eos_token", "eos_id"), ("pad_token", "pad_id"))
        if card[key] in added
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]


def head_card(cfg: Any, head: dict[str, Tensor], source: Path) -> dict[str, Any]:
    """cp_head.json: the head's settings (n, r, parameterisation, phi...) and its tensors' shapes."""
    cp: CPHeadConfig = cfg.model.cp
    return {
        "format": "cpmtp CP head, docs/MODEL.md",
        "horizon": cp.horizon,
        "rank": cp.rank,
        "parameterisation": cp.parameterisation,
        "phi": cp.phi,
        "hidden_size": cfg.model.trunk.hidden_size,
        "vocab_size": cfg.model.trunk.vocab_size,
        "unembedding": "the trunk's: lm_head.weight when untied, else model.embed_tokens.weight"
        if cp.parameterisation == "shared"
        else "its own (cp_head.unembed)",
        "cp": dataclasses.asdict(cp),
        "tensors": {k: list(t.shape) for k, t in head.items()},
        "dtype": str(next(iter(head.values())).dtype).removeprefix("torch."),
        "source": str(source),
    }
