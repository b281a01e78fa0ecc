"""Reading and writing the weights of a Hugging Face model folder: `model.safetensors`, or shards listed by
`model.safetensors.index.json`. Needs the `hf` extra (safetensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from cpmtp_dist.interop.llama import ConversionError

HF_EXTRA = "pip install -e .[hf]"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def load_safetensors() -> Any:
    """The `safetensors.torch` module, or `ConversionError` saying how to install it."""
    try:
        import safetensors.torch as st
    except ImportError as err:
        raise ConversionError(f"cpmtp convert needs the hf extra: {HF_EXTRA}") from err
    return st


def _weight_files(model_dir: Path) -> dict[str, str]:
    """Tensor name -> file, from `model.safetensors.index.json`, or None-keyed for a single file."""
    index = model_dir / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index} has no weight_map: rewrite it with save_pretrained")
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if missing:
            raise ConversionError(
                f"{index} names shards that are not in {model_dir}: {', '.join(missing)}; copy them there"
            )
        return weight_map
    if (model_dir / SINGLE).is_file():
        return {}
    others = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
    hint = f" (it holds {', '.join(others)}: save it again with safe_serialization=True)" if others else ""
    raise ConversionError(
        f"{model_dir} holds neither {SINGLE} nor {INDEX}{hint}; cpmtp convert reads safetensors only"
    )


def read_hf_tensors(model_dir: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """The `expected` tensors of a Llama folder (single file or sharded with an index); `ConversionError`
    listing every missing tensor, unexpected one and shape that contradicts config.json."""
    st = load_safetensors()
    weight_map = _weight_files(model_dir)
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
    tensors: dict[str, Tensor] = {}
    for name in files:
        tensors |= st.load_file(str(model_dir / name))
    where = INDEX if weight_map else SINGLE
    if weight_map:
        unlisted = sorted(set(expected) - set(weight_map))
        if unlisted:
            raise ConversionError(
                f"{model_dir / INDEX} is partial: it lists no shard for {len(unlisted)} tensors the config "
                f"implies ({', '.join(unlisted[:4])}...); use the index save_pretrained wrote"
            )
    problems = [f"{k}: missing from {where}" for k in expected if k not in tensors]
    problems += [
        f"{k}: shape {tuple(tensors[k].shape)} in the safetensors, {shape} from config.json"
        for k, shape in expected.items()
        if k in tensors and tuple(tensors[k].shape) != shape
    ]
    # A tied model's folder may hold lm_head.weight all the same (a copy of the embedding): ignored.
    extra = [k for k in tensors if k not in expected and "rotary_emb" not in k and k != "lm_head.weight"]
    problems += [f"{k}: not a tensor of this Llama config (a bias?)" for k in sorted(extra)]
    if problems:
        raise ConversionError(
            f"the weights of {model_dir} do not fit its config.json (fix the config or the files):\n"
            + "\n".join(f"  - {p}" for p in problems[:20])
        )
    return {k: tensors[k] for k in expected}


def write_safetensors(tensors: dict[str, Tensor], out: Path, max_shard_bytes: int = 0) -> list[str]:
    """`model.safetensors`, or shards `model-0000i-of-0000k.safetensors` and an index when the tensors
    exceed `max_shard_bytes` (> 0). Returns the files written."""
    st = load_safetensors()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes <= 0 or total <= max_shard_bytes:
        st.save_file(tensors, str(out / SINGLE), metadata={"format": "pt"})
        return [SINGLE]
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        st.save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2))
    return [*names, INDEX]
