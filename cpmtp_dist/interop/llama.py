"""Hugging Face Llama and the trunk: `config.json` <-> `TrunkConfig`, and tensor names and layouts.

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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cpmtp_dist.config import TrunkConfig
from cpmtp_dist.errors import UserError

ARCHITECTURES = ("LlamaForCausalLM",)
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
"""The llama3 RoPE scaling our trunk represents (Megatron's fixed factors); only `factor` may vary."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(UserError):
    """Input that cannot be converted: the message names the file or setting and what to do."""


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
