"""Hugging Face interop: a local `LlamaForCausalLM` folder (config.json + safetensors) to a cpmtp checkpoint
with fresh CP heads (`import_hf`), and a checkpoint's trunk back to such a folder, its CP head beside it
(`export_hf`). Needs the `hf` extra (`pip install -e .[hf]`) for safetensors; transformers itself is not used.

Names (ours are the single-process checkpoint names under `trunk.`, `parallel/sharded_state.py`):

    model.embed_tokens.weight                        embedding.word_embeddings.weight
    lm_head.weight (untied only)                     output_layer.weight
    model.norm.weight                                decoder.final_layernorm.weight
    model.layers.i.input_layernorm.weight            decoder.layers.i.input_layernorm.weight
    model.layers.i.post_attention_layernorm.weight   decoder.layers.i.pre_mlp_layernorm.weight
    model.layers.i.self_attn.{q,k,v}_proj.weight     decoder.layers.i.self_attention.linear_qkv.weight
    model.layers.i.self_attn.o_proj.weight           decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.mlp.{gate,up}_proj.weight         decoder.layers.i.mlp.linear_fc1.weight (2, f, d)
    model.layers.i.mlp.down_proj.weight              decoder.layers.i.mlp.linear_fc2.weight

Megatron's fused linear_qkv holds, for each of the g query groups in turn, the group's h / g query heads,
then its key head, then its value head (head_dim rows each). The gated MLP's fc1 is stored as (2, f, d):
[0] the gate projection (under SiLU), [1] the up projection. Both use RoPE's rotate-half convention, so
no row of q or k is permuted.

The CP head travels in `cp_head.safetensors` (`cp_head.<name>`: our `head.<name>`) and `cp_head.json`
(the `model.cp` settings), and the tokenizer in `cpmtp_tokenizer/`; `import_hf` takes all three back.
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

from cpmtp_dist.config import CPHeadConfig, TrunkConfig

HF_EXTRA = "pip install -e .[hf]"
ARCHITECTURES = ("LlamaForCausalLM",)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
HEAD_FILE = "cp_head.safetensors"
HEAD_CARD = "cp_head.json"
HEAD_PREFIX = "cp_head."
TOKENIZER_DIR = "cpmtp_tokenizer"
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
"""The llama3 RoPE scaling our trunk represents (Megatron's fixed factors); only `factor` may vary."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(ValueError):
    """Input that cannot be converted: the message names the file or setting and what to do."""


def _safetensors() -> Any:
    try:
        import safetensors.torch as st
    except ImportError as err:
        raise ConversionError(f"cpmtp convert needs the hf extra: {HF_EXTRA}") from err
    return st


# --- config.json <-> TrunkConfig ----------------------------------------------------------------------------


def _rope(config: dict[str, Any], where: str, problems: list[str]) -> tuple[int, float]:
    """(rotary_base, rope_scaling_factor) from `rope_parameters` (transformers 5) or `rope_theta` and
    `rope_scaling` (transformers 4)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    factor = 0.0
    if kind == "llama3":
        factor = float(params.get("factor", 0.0))
        for key, want in LLAMA3_ROPE.items():
            if float(params.get(key, -1)) != want:
                problems.append(
                    f"{where}: llama3 rope {key}={params.get(key)}; the trunk represents {want} only"
                )
        if factor <= 0:
            problems.append(f"{where}: llama3 rope factor={params.get('factor')} must be > 0")
    elif kind != "default":
        problems.append(
            f"{where}: rope_type {kind!r} is not representable (the trunk has plain RoPE and llama3 scaling)"
        )
    if float(theta) != int(float(theta)):
        problems.append(f"{where}: rope_theta={theta} is not an integer (model.trunk.rotary_base is one)")
    return int(float(theta)), factor


def trunk_config_from_hf(config: dict[str, Any], where: str = "config.json") -> TrunkConfig:
    """The trunk a Llama `config.json` describes; `ConversionError` listing every setting the trunk cannot
    represent."""
    archs = config.get("architectures") or []
    if not archs or any(a not in ARCHITECTURES for a in archs):
        raise ConversionError(
            f"{where}: architectures {archs} is not {list(ARCHITECTURES)}: only Llama-family causal LMs "
            "convert; use a LlamaForCausalLM folder"
        )
    problems: list[str] = []
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"{where}: hidden_act={config['hidden_act']!r}; the trunk's gated MLP uses silu")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key, False):
            problems.append(f"{where}: {key}=true; the trunk's linears have no bias")
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        problems.append(
            f"{where}: head_dim={head_dim} with {heads} heads is not hidden_size={hidden} / num_attention_heads"
        )
    base, factor = _rope(config, where, problems)
    if problems:
        raise ConversionError("cannot convert this model:\n" + "\n".join(f"  - {p}" for p in problems))
    return TrunkConfig(
        num_layers=config["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        mlp="swiglu",
        ffn_hidden_size=config["intermediate_size"],
        untie_embeddings=not config.get("tie_word_embeddings", False),
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        seq_length=config.get("max_position_embeddings", 2048),
        vocab_size=config["vocab_size"],
        normalization="RMSNorm",
        rotary_base=base,
        rope_scaling_factor=factor,
        init_method_std=config.get("initializer_range", 0.02),
    )


def hf_config_from_trunk(trunk: TrunkConfig, dtype: torch.dtype, eos_id: int | None = None) -> dict[str, Any]:
    """A `LlamaForCausalLM` config.json for `trunk`; `ConversionError` naming each setting Llama lacks."""
    problems = []
    if trunk.mlp != "swiglu":
        problems.append(f"model.trunk.mlp={trunk.mlp} (Llama's MLP is swiglu)")
    if trunk.normalization != "RMSNorm":
        problems.append(f"model.trunk.normalization={trunk.normalization} (Llama's norm is RMSNorm)")
    if problems:
        raise ConversionError(
            "this trunk is not a Llama model: " + "; ".join(problems) + ". Only such trunks convert to-hf"
        )
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(trunk.rotary_base)}
    if trunk.rope_scaling_factor > 0:
        rope |= {"rope_type": "llama3", "factor": trunk.rope_scaling_factor, **LLAMA3_ROPE}
    dtype_name = {v: k for k, v in _DTYPES.items()}[dtype]
    config = {
        "architectures": list(ARCHITECTURES),
        "model_type": "llama",
        "vocab_size": trunk.vocab_size,
        "hidden_size": trunk.hidden_size,
        "intermediate_size": trunk.ffn_hidden_size or 4 * trunk.hidden_size,
        "num_hidden_layers": trunk.num_layers,
        "num_attention_heads": trunk.num_attention_heads,
        "num_key_value_heads": trunk.num_query_groups or trunk.num_attention_heads,
        "head_dim": trunk.hidden_size // trunk.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": trunk.seq_length,
        "rms_norm_eps": trunk.norm_epsilon,
        "initializer_range": trunk.init_method_std,
        "tie_word_embeddings": not trunk.untie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": trunk.dropout,
        "rope_theta": float(trunk.rotary_base),  # transformers 4 reads these two,
        "rope_scaling": None if rope["rope_type"] == "default" else dict(rope),
        "rope_parameters": rope,  # transformers 5 this one
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }
    if eos_id is not None:
        config["eos_token_id"] = eos_id
    return config


# --- names and layouts --------------------------------------------------------------------------------------


def _layer_names(i: int) -> dict[str, str]:
    """Our name -> HF name, for the tensors that map one to one in layer i."""
    ours, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
    return {
        ours + "input_layernorm.weight": theirs + "input_layernorm.weight",
        ours + "pre_mlp_layernorm.weight": theirs + "post_attention_layernorm.weight",
        ours + "self_attention.linear_proj.weight": theirs + "self_attn.o_proj.weight",
        ours + "mlp.linear_fc2.weight": theirs + "mlp.down_proj.weight",
    }


def expected_hf_shapes(trunk: TrunkConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama folder for `trunk` holds, with the shape its config.json implies."""
    d, v, f = trunk.hidden_size, trunk.vocab_size, trunk.ffn_hidden_size or 4 * trunk.hidden_size
    hd = d // trunk.num_attention_heads
    kv = (trunk.num_query_groups or trunk.num_attention_heads) * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if trunk.untie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(trunk.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (d, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }
    return shapes


def _groups(trunk: TrunkConfig) -> tuple[int, int, int]:
    """(query groups g, query heads per group, head_dim)."""
    g = trunk.num_query_groups or trunk.num_attention_heads
    return g, trunk.num_attention_heads // g, trunk.hidden_size // trunk.num_attention_heads


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, trunk: TrunkConfig) -> Tensor:
    """HF q (h hd, d), k and v (g hd, d) -> Megatron's linear_qkv ((h + 2 g) hd, d), grouped."""
    g, per, hd = _groups(trunk)
    d = q.shape[-1]
    parts = [q.reshape(g, per * hd, d), k.reshape(g, hd, d), v.reshape(g, hd, d)]
    return torch.cat(parts, dim=1).reshape(-1, d)


def split_qkv(qkv: Tensor, trunk: TrunkConfig) -> tuple[Tensor, Tensor, Tensor]:
    """The inverse of `fuse_qkv`."""
    g, per, hd = _groups(trunk)
    d = qkv.shape[-1]
    q, k, v = qkv.reshape(g, (per + 2) * hd, d).split([per * hd, hd, hd], dim=1)
    return q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d)


def hf_to_trunk_state(hf: dict[str, Tensor], trunk: TrunkConfig) -> dict[str, Tensor]:
    """HF tensors -> our single-process trunk names (no `trunk.` prefix); fc1 as the (2, f, d) view."""
    out = {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if trunk.untie_embeddings:
        out["output_layer.weight"] = hf["lm_head.weight"]
    for i in range(trunk.num_layers):
        out |= {ours: hf[theirs] for ours, theirs in _layer_names(i).items()}
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[p + "self_attention.linear_qkv.weight"] = fuse_qkv(
            *(hf[f"{q}self_attn.{x}_proj.weight"] for x in "qkv"), trunk
        )
        out[p + "mlp.linear_fc1.weight"] = torch.stack(
            [hf[q + "mlp.gate_proj.weight"], hf[q + "mlp.up_proj.weight"]]
        )
    return out


def trunk_to_hf_state(state: dict[str, Tensor], trunk: TrunkConfig) -> dict[str, Tensor]:
    """The inverse of `hf_to_trunk_state` (fc1 accepted as (2, f, d) or (2 f, d)); fresh contiguous tensors."""
    out = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
    }
    if trunk.untie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"]
    for i in range(trunk.num_layers):
        out |= {theirs: state[ours] for ours, theirs in _layer_names(i).items()}
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        qs, ks, vs = split_qkv(state[p + "self_attention.linear_qkv.weight"], trunk)
        out |= {q + "self_attn.q_proj.weight": qs, q + "self_attn.k_proj.weight": ks}
        out[q + "self_attn.v_proj.weight"] = vs
        fc1 = state[p + "mlp.linear_fc1.weight"]
        gate, up = fc1.reshape(2, -1, fc1.shape[-1])
        out |= {q + "mlp.gate_proj.weight": gate, q + "mlp.up_proj.weight": up}
    return {k: t.contiguous().clone() for k, t in out.items()}


# --- safetensors folders ------------------------------------------------------------------------------------


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
    st = _safetensors()
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
    st = _safetensors()
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


# --- whole folders ------------------------------------------------------------------------------------------


def _folder_head(model_dir: Path) -> tuple[CPHeadConfig, dict[str, Tensor]] | None:
    """The CP head `export_hf` wrote beside the trunk (`cp_head.json`, `cp_head.safetensors`), if any."""
    card = model_dir / HEAD_CARD
    if not card.is_file():
        return None
    if not (model_dir / HEAD_FILE).is_file():
        raise ConversionError(f"{card} has no {HEAD_FILE} beside it: copy it there, or pass --fresh-head")
    cp = CPHeadConfig(**json.loads(card.read_text())["cp"])
    tensors = _safetensors().load_file(str(model_dir / HEAD_FILE))
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

    st = _safetensors()
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
