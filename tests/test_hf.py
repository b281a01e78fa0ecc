"""Hugging Face interop (`cpmtp convert from-hf|to-hf`): small random `LlamaForCausalLM`s built here (GQA,
SwiGLU, tied and untied, llama3 RoPE scaling) convert to checkpoints whose trunk computes what transformers
computes, in one process and at tp = 2 (the tp = 2 case runs in tests/test_sequence_parallel.py's launch); folders round-trip bit for bit; a converted model fine-tunes its
head; bad input is named."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from cpmtp_dist.interop.hf import ConversionError, export_hf, import_hf  # noqa: E402
from cpmtp_dist.interop.llama import hf_config_from_trunk, trunk_config_from_hf  # noqa: E402
from cpmtp_dist.training.checkpoint import read_model_state  # noqa: E402
from launchers.cli import main as cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
V, D, L, H, KV, F, B, T = 512, 64, 2, 4, 2, 128, 2, 16
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
VARIANTS = {
    "tied": {"tie_word_embeddings": True, "max_position_embeddings": 64},
    "untied-llama3": {
        "tie_word_embeddings": False,
        "max_position_embeddings": 16384,
        "rope_parameters": LLAMA3,
    },
}
MAX_ABS = 1e-4


def build_hf(folder: Path, seed: int, **settings) -> None:
    """A random LlamaForCausalLM (GQA: 4 heads, 2 key/value heads), norms away from 1, saved to `folder`."""
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=F,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=KV,
        rms_norm_eps=1e-5,
        **settings,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # ones would hide a norm mapped to the wrong place
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)


def hf_reference(folder: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' final hidden states (after the final norm), logits and RoPE inverse frequencies."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    return out.hidden_states[-1], out.logits, model.model.rotary_emb.inv_freq


def ours(ckpt: Path, tokens: torch.Tensor):
    from cpmtp_dist.inference.generate import load_for_inference

    loaded = load_for_inference(ckpt)
    model = loaded.model
    with torch.no_grad():
        h = model.hidden(tokens)
        logits = h @ model.unembedding().t()
    return loaded, h, logits


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Per variant: the HF folder, transformers' outputs, and the converted checkpoint (n = 1, r = 1)."""
    tmp = tmp_path_factory.mktemp("hf")
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    out = {"tmp": tmp, "tokens": tokens}
    from cpmtp_dist.data.tokenizer import ByteTokenizer

    ByteTokenizer().save(tmp / "bytes")  # 258 tokens, as a stand-in for the model's own cpmtp tokenizer
    for i, (name, settings) in enumerate(VARIANTS.items()):
        folder = tmp / name
        build_hf(folder, seed=i, **settings)
        ckpt = tmp / f"{name}-ckpt"
        argv = ["convert", "from-hf", "--model", str(folder), "--out", str(ckpt), "--horizon", "1"]
        argv += ["--tokenizer", str(tmp / "bytes")]
        assert cli([*argv, "--rank", "1"]) == 0
        out[name] = (folder, ckpt, hf_reference(folder, tokens))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_converted_trunk_computes_what_transformers_does(made, variant, capsys):
    folder, ckpt, (ref_h, ref_logits, ref_inv_freq) = made[variant]
    loaded, h, logits = ours(ckpt, made["tokens"])
    trunk = loaded.config.model.trunk
    assert trunk.num_query_groups == KV and trunk.mlp == "swiglu"
    assert trunk.untie_embeddings == (variant != "tied")
    assert trunk.rope_scaling_factor == (32.0 if "llama3" in variant else 0.0)
    torch.testing.assert_close(
        loaded.model.trunk.rotary_pos_emb.inv_freq.float(), ref_inv_freq, rtol=1e-6, atol=0
    )
    diff_h, diff_l = (h - ref_h).abs().max().item(), (logits - ref_logits).abs().max().item()
    print(f"{variant}: max |hidden - transformers| {diff_h:.2e}, max |logits - transformers| {diff_l:.2e}")
    assert diff_h <= MAX_ABS and diff_l <= MAX_ABS
    assert ref_logits.abs().max() > 1  # the comparison is not between near-zero numbers
    # n = 1, r = 1 (fresh residual head, W2 = 0): the model's next-token distribution is transformers'.
    from cpmtp_dist.model.drafting import next_token_log_probs

    with torch.no_grad():
        log_p = next_token_log_probs(loaded.model.head, h.reshape(-1, D), loaded.model.unembedding())
    torch.testing.assert_close(log_p, torch.log_softmax(ref_logits, -1).reshape(-1, V), rtol=0, atol=MAX_ABS)
    if variant == "tied":  # `cpmtp generate` decodes from the converted checkpoint
        argv = ["generate", "--checkpoint", str(ckpt), "--prompt", "def f", "--max-new-tokens", "6"]
        assert cli([*argv, "--device", "cpu"]) == 0
        assert "6 tokens in" in capsys.readouterr().err


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name != "cp_head.safetensors":
            out |= safetensors_torch.load_file(str(f))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_folders_round_trip_bit_for_bit(made, variant):
    """checkpoint -> to-hf -> from-hf is the same checkpoint, head included; the HF tensors are the
    original's; transformers loads the exported folder (sharded for the untied model) with no custom code."""
    folder, ckpt, (_, ref_logits, _) = made[variant]
    tmp = made["tmp"]
    exported, back = tmp / f"{variant}-exported", tmp / f"{variant}-back"
    shard = ["--max-shard-gb", "0.0002"] if variant != "tied" else []  # ≈ 210 kB shards: 3 or more
    assert cli(["convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(exported), *shard]) == 0
    assert (exported / "model.safetensors.index.json").exists() == bool(shard)
    original, got = _tensors(folder), _tensors(exported)
    assert set(got) == set(original) - ({"lm_head.weight"} if variant == "tied" else set())
    assert all(torch.equal(got[k], original[k]) for k in got)
    card = json.loads((exported / "cp_head.json").read_text())
    assert (card["horizon"], card["rank"], card["parameterisation"], card["phi"]) == (
        1,
        1,
        "shared",
        "residual",
    )
    head = safetensors_torch.load_file(str(exported / "cp_head.safetensors"))
    assert set(head) == set(card["tensors"]) and "cp_head.phi_w1" in head
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(made["tokens"]).logits, ref_logits, rtol=0, atol=0)
    assert cli(["convert", "from-hf", "--model", str(exported), "--out", str(back)]) == 0
    assert (back / "step_0000000" / "tokenizer" / "tokenizer.json").is_file()  # the tokenizer travels too
    a, b = read_model_state(ckpt / "step_0000000"), read_model_state(back / "step_0000000")
    assert set(a) == set(b) and any(k.startswith("head.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_weights_stay_bf16_bit_for_bit(made, tmp_path):
    """Published Llama weights are bf16: the checkpoint keeps them so, and to-hf gives them back unchanged."""
    folder = tmp_path / "bf16"
    transformers.AutoModelForCausalLM.from_pretrained(made["tied"][0]).to(torch.bfloat16).save_pretrained(
        folder
    )
    import_hf(folder, tmp_path / "ckpt", {"horizon": 2, "rank": 2})
    state = read_model_state(tmp_path / "ckpt" / "step_0000000")
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    original, got = _tensors(folder), _tensors(tmp_path / "out")
    assert set(got) == set(original) - {"lm_head.weight"} and all(
        torch.equal(got[k], original[k]) for k in got
    )
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def prepare_tp2_case(tmp: Path) -> tuple[str, str]:
    """For the tp = 2 worker of tests/test_sequence_parallel.py (one launch serves both): the untied llama3
    model converted, and transformers' outputs; returns (checkpoint, reference file)."""
    folder, ckpt = tmp / "hf-tp2", tmp / "hf-tp2-ckpt"
    build_hf(folder, seed=5, **VARIANTS["untied-llama3"])
    import_hf(folder, ckpt, {"horizon": 2, "rank": 2})
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
    ref_h, ref_logits, _ = hf_reference(folder, tokens)
    torch.save((tokens, ref_h, ref_logits), tmp / "hf-tp2-ref.pt")
    return str(ckpt / "step_0000000"), str(tmp / "hf-tp2-ref.pt")


def check_tp2(groups, ckpt: str, ref: str) -> dict[str, float]:
    """In a tp = 2 rank: the converted checkpoint, loaded by the sharded load training uses, gives
    transformers' hidden states and (gathered) logits; returns the max abs differences."""
    from cpmtp_dist.config_io import load_config
    from cpmtp_dist.model.cp_model import CPModel
    from cpmtp_dist.parallel.layout import build_vocab_shard
    from cpmtp_dist.training.finetune import load_initial_weights

    cfg = load_config(Path(ckpt) / "config.yaml")
    model = CPModel(cfg.model, vocab=build_vocab_shard(groups, V), seed=0).eval()
    load_initial_weights(model, Path(ckpt), groups, seed=0)
    tokens, ref_h, ref_logits = torch.load(ref)
    with torch.no_grad():
        h = model.hidden(tokens)
        local = h @ model.unembedding().t()  # (B, T, V / 2)
    parts = [torch.empty_like(local) for _ in range(groups.tp_size)]
    torch.distributed.all_gather(parts, local, group=groups.tp_group)
    logits = torch.cat(parts, dim=-1)
    diff = {"hidden": (h - ref_h).abs().max().item(), "logits": (logits - ref_logits).abs().max().item()}
    assert diff["hidden"] <= MAX_ABS and diff["logits"] <= MAX_ABS, (groups.rank, diff)
    return diff


def test_head_only_finetuning_of_a_converted_model(made, monkeypatch):
    """The paper's setting: a pretrained trunk, frozen; a rank-2 head over 2 tokens built from the converted
    next-token head, trained on the built-in corpus: the head loss falls, the trunk stays bit for bit."""
    from cpmtp_dist.config_io import load_config, validate_config
    from cpmtp_dist.training.trainer import train

    _, ckpt, _ = made["tied"]
    tmp = made["tmp"]
    monkeypatch.setenv("CPMTP_CACHE_DIR", str(tmp / "cache"))
    monkeypatch.chdir(ROOT)
    overrides = [
        "model.trunk.seq_length=32",
        "model.cp.horizon=2",
        "model.cp.rank=2",
        "data.tokenizer_vocab_size=512",
        "data.max_chars=30000",
        "data.heldout_fraction=0.5",
        "train.steps=12",
        "train.global_batch_size=8",
        "train.micro_batch_size=8",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_batches=1",
        "optim.lr=1e-2",
        "optim.warmup_steps=1",
        "checkpoint.every=0",
        "tracking.enabled=false",
        f"finetune.init_from={ckpt}",
        "finetune.freeze_trunk=true",
    ]
    cfg = load_config(ckpt / "step_0000000" / "config.yaml", overrides)
    validate_config(cfg, world_size=1, cuda_available=False)
    result = train(cfg, tmp / "ft")
    rows = [json.loads(x) for x in (tmp / "ft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["joint_loss"] for r in rows if "joint_loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses
    src, got = read_model_state(ckpt / "step_0000000"), read_model_state(result.checkpoint)
    trunk = [k for k in src if k.startswith("trunk.")]
    assert trunk and all(torch.equal(got[k], src[k]) for k in trunk)
    assert got["head.phi_w1"].shape[:2] == (2, 2)


def test_the_model_folders_own_tokenizer_comes_along(made, tmp_path, capsys):
    """A folder's Hugging Face tokenizer.json becomes the checkpoint's tokenizer: generate and `cpmtp data
    shards` use it, and to-hf gives transformers the same tokenizer back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from cpmtp_dist.data.tokenizer import load_tokenizer

    text = (ROOT / "cpmtp_dist" / "interop" / "hf.py").read_text()
    hf_tok = Tokenizer(models.BPE())
    hf_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"], initial_alphabet=alphabet)
    hf_tok.train_from_iterator(text.splitlines(), trainer)
    folder = tmp_path / "with-tokenizer"
    shutil.copytree(made["tied"][0], folder)
    hf_tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    ckpt = tmp_path / "ckpt"
    assert (
        cli(
            [
                "convert",
                "from-hf",
                "--model",
                str(folder),
                "--out",
                str(ckpt),
                "--horizon",
                "1",
                "--rank",
                "1",
            ]
        )
        == 0
    )
    tok = load_tokenizer(ckpt / "step_0000000" / "tokenizer")
    sample = "def export_hf(checkpoint):\n    return None  # ünïcode\n"
    ids = tok.encode(sample)
    assert ids == hf_tok.encode(sample).ids and tok.decode(ids) == sample
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (300, 0, 0)
    assert cli(["generate", "--checkpoint", str(ckpt), "--prompt", "def f", "--max-new-tokens", "4"]) == 0
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, part in enumerate(text.split("\ndef ")):
        (corpus / f"{i}.txt").write_text(part)
    tok_dir, shards = ckpt / "step_0000000" / "tokenizer", tmp_path / "shards"
    argv = ["data", "shards", "--input", str(corpus), "--tokenizer", str(tok_dir), "--seq-len", "64"]
    assert cli([*argv, "--out", str(shards), "--workers", "1", "--heldout-fraction", "0.3"]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 300, manifest["tokenizer"]
    argv = ["eval", "--checkpoint", str(ckpt), "--data", str(shards), "--out", str(tmp_path / "e.json")]
    assert (
        cli([*argv, "--batches", "1", "--prompts", "1", "--new-tokens", "4", "--tracking-uri", "none"]) == 0
    )
    assert json.loads((tmp_path / "e.json").read_text())["heldout"]["ntp_loss"] > 0
    exported = tmp_path / "exported"
    assert cli(["convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(exported)]) == 0
    assert (exported / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    auto = transformers.AutoTokenizer.from_pretrained(exported)
    assert auto.encode(sample, add_special_tokens=False) == ids and auto.eos_token == "<|end|>"
    capsys.readouterr()


LLAMA_32_1B = {  # Llama-3.2-1B's published config.json (transformers 4 names)
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}


def test_llama_3_2_1b_config_is_the_shipped_config_trunk():
    """Its config.json (either transformers' naming) maps to configs/llama_1b.yaml's trunk, and back."""
    from cpmtp_dist.config_io import load_config

    shipped = load_config(ROOT / "configs" / "llama_1b.yaml").model.trunk
    got = trunk_config_from_hf(LLAMA_32_1B)
    assert got.seq_length == 131072
    assert dataclasses.replace(got, seq_length=shipped.seq_length, attention=shipped.attention) == shipped
    out = hf_config_from_trunk(got, torch.bfloat16)
    assert trunk_config_from_hf(out) == got
    assert {k: out[k] for k in LLAMA_32_1B if k != "rope_scaling"} == {
        k: v for k, v in LLAMA_32_1B.items() if k != "rope_scaling"
    }
    assert out["rope_parameters"] == {**LLAMA_32_1B["rope_scaling"], "rope_theta": 500000.0}
    assert transformers.LlamaConfig(**out).rope_parameters["factor"] == 32.0  # transformers reads it


def test_a_converted_checkpoint_is_not_resumed(made, tmp_path):
    from cpmtp_dist.checkpoint_paths import ResumeError
    from cpmtp_dist.resume_check import check_resume_config

    # What `cpmtp train --resume` and the trainer's Checkpointer.restore check before any weight is read.
    with pytest.raises(ResumeError, match="finetune.init_from="):
        check_resume_config(made["tied"][1] / "step_0000000", None)


# --- bad input ------------------------------------------------------------------------------------------------


def _variant_copy(made, tmp_path: Path, edit=None, name: str = "bad") -> Path:
    src = made["untied-llama3"][0]
    folder = tmp_path / name
    shutil.copytree(src, folder)
    if edit is not None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _refusal(folder: Path, tmp_path: Path, **kw) -> str:
    with pytest.raises(ConversionError) as info:
        import_hf(folder, tmp_path / "out", {}, **kw)
    assert not (tmp_path / "out").exists()  # nothing written
    return str(info.value)


def test_bad_input_is_named(made, tmp_path, capsys):
    msg = _refusal(
        _variant_copy(made, tmp_path, lambda c: c.update(architectures=["MistralForCausalLM"])), tmp_path
    )
    assert "MistralForCausalLM" in msg and "LlamaForCausalLM" in msg
    msg = _refusal(_variant_copy(made, tmp_path, lambda c: c.update(intermediate_size=96), "shape"), tmp_path)
    assert (
        "model.layers.0.mlp.gate_proj.weight: shape (128, 64) in the safetensors, (96, 64) from config.json"
        in msg
    )

    def yarn(c):
        c["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
        c["attention_bias"] = True

    msg = _refusal(_variant_copy(made, tmp_path, yarn, "yarn"), tmp_path)
    assert "rope_type 'yarn'" in msg and "attention_bias=true" in msg

    msg = _refusal(_variant_copy(made, tmp_path, lambda c: c.update(num_key_value_heads=3), "kv3"), tmp_path)
    assert "config.json and the head options make an invalid model" in msg and "num_query_groups=3" in msg

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(made["tied"][0] / "config.json", bare)
    msg = _refusal(bare, tmp_path)
    assert "neither model.safetensors nor model.safetensors.index.json" in msg

    exported = made["tmp"] / "untied-llama3-exported"  # sharded by the round-trip test, else made here
    if not exported.exists():
        export_hf(made["untied-llama3"][1], exported, max_shard_bytes=200_000)
    partial = tmp_path / "partial"
    shutil.copytree(exported, partial)
    index = json.loads((partial / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (partial / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = _refusal(partial, tmp_path, fresh_head=True)
    assert "is partial" in msg and "model.layers.1.mlp.up_proj.weight" in msg
    (partial / sorted(set(index["weight_map"].values()))[0]).unlink()
    assert "names shards that are not in" in _refusal(partial, tmp_path, fresh_head=True)

    from cpmtp_dist.data.tokenizer import ByteTokenizer

    ByteTokenizer().save(tmp_path / "bytes")  # 258 tokens
    small = _variant_copy(made, tmp_path, lambda c: c.update(vocab_size=200), "small-vocab")
    msg = _refusal(small, tmp_path, tokenizer_dir=tmp_path / "bytes")
    assert "258 tokens" in msg and "vocab_size=200" in msg and "at most 200" in msg

    # The command line says the same, with exit status 2.
    assert cli(["convert", "from-hf", "--model", str(bare), "--out", str(tmp_path / "out")]) == 2
    assert "neither model.safetensors" in capsys.readouterr().err


def test_a_missing_extra_says_what_to_install(made, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails as if not installed
    msg = _refusal(made["tied"][0], tmp_path)
    assert "pip install -e .[hf]" in msg


def test_a_head_in_the_folder_is_kept_or_replaced_explicitly(made, tmp_path):
    exported = tmp_path / "exported"
    export_hf(made["tied"][1], exported)
    with pytest.raises(ConversionError) as info:
        import_hf(exported, tmp_path / "out", {"rank": 4})
    assert "rank=1" in str(info.value) and "--fresh-head" in str(info.value)


def test_to_hf_refuses_trunks_llama_cannot_hold(made, tmp_path):
    ckpt = tmp_path / "gelu"
    shutil.copytree(made["tied"][1] / "step_0000000", ckpt)
    text = (ckpt / "config.yaml").read_text()
    (ckpt / "config.yaml").write_text(
        text.replace("mlp: swiglu", "mlp: gelu").replace("RMSNorm", "LayerNorm")
    )
    with pytest.raises(ConversionError) as info:
        export_hf(ckpt, tmp_path / "out")
    assert "model.trunk.mlp=gelu" in str(info.value) and "model.trunk.normalization=LayerNorm" in str(
        info.value
    )
    assert not (tmp_path / "out").exists()
