"""Tests of config loading (precedence, types, unknown keys), validation and the YAML round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from cpmtp_dist.config import Config
from cpmtp_dist.config_io import ConfigError, config_to_dict, load_config, save_config, validate_config

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _problems(cfg: Config, world_size: int | None = None) -> list[str]:
    """Problems reported for ``cfg``; CUDA pinned off so results do not depend on the machine."""
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, world_size, cuda_available=False)
    # The message must carry each problem on its own line, not just the attribute.
    for problem in info.value.problems:
        assert problem in str(info.value).splitlines()[1 + info.value.problems.index(problem)]
    return info.value.problems


# --- precedence --------------------------------------------------------------------------------


def test_defaults_when_no_file_and_no_overrides() -> None:
    assert load_config(None) == Config()


def test_precedence_defaults_file_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, {"model": {"cp": {"rank": 2, "horizon": 3}}, "optim": {"lr": 5e-4}})
    from_file = load_config(path)
    assert from_file.model.cp.rank == 2  # file beats default (4)
    assert from_file.model.cp.horizon == 3
    assert from_file.model.trunk == Config().model.trunk  # untouched keys keep defaults

    cfg = load_config(path, ["model.cp.rank=8", "optim.lr=1e-3"])
    assert cfg.model.cp.rank == 8  # override beats file
    assert cfg.model.cp.horizon == 3  # file value not overridden stays
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)


def test_later_override_wins_and_values_use_yaml_semantics() -> None:
    cfg = load_config(
        None,
        [
            "train.steps=5",
            "train.steps=7",
            "optim.lr=1e-3",  # YAML 1.1 reads this as a string; it must still become a float
            "optim.weight_decay=0",  # int accepted for a float field
            "parallel.sequence_parallel=true",
            "model.trunk.ffn_hidden_size=null",
            "model.trunk.ffn_hidden_size=512",
            "data.path=2024",  # a str field keeps the text, not the int YAML made of it
            "optim.zero_stage=2",
            "model.cp.phi=linear",
        ],
    )
    assert cfg.train.steps == 7
    assert cfg.optim.lr == 1e-3
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.parallel.sequence_parallel is True
    assert cfg.model.trunk.ffn_hidden_size == 512
    assert cfg.data.path == "2024"
    assert cfg.optim.zero_stage == 2
    assert cfg.model.cp.phi == "linear"
    assert load_config(None, ["data.path=null"]).data.path is None


# --- shipped configs and round trip ------------------------------------------------------------


def test_every_shipped_config_loads_and_validates() -> None:
    files = sorted(CONFIGS_DIR.glob("*.yaml")) + sorted(CONFIGS_DIR.glob("*.yml"))
    assert len(files) >= 3, files
    for path in files:
        cfg = load_config(path)
        validate_config(
            cfg, world_size=cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.ep, cuda_available=False
        )
        # Every key in the file must be one the loader consumed (load_config errors otherwise),
        # and the file must actually set something.
        assert yaml.safe_load(path.read_text(encoding="utf-8")), path


def test_tiny_config_is_the_cp_demo() -> None:
    cfg = load_config(CONFIGS_DIR / "tiny.yaml")
    assert (cfg.model.cp.horizon, cfg.model.cp.rank) == (4, 4)
    assert (cfg.model.cp.parameterisation, cfg.model.cp.phi) == ("shared", "residual")
    baseline = load_config(CONFIGS_DIR / "small_lm.yaml")
    assert (baseline.model.cp.horizon, baseline.model.cp.rank) == (1, 1)
    assert baseline.model.trunk == cfg.model.trunk
    separate = load_config(CONFIGS_DIR / "separate_heads.yaml")
    assert (separate.model.cp.parameterisation, separate.model.cp.horizon, separate.model.cp.rank) == (
        "separate",
        4,
        2,
    )


def test_round_trip_save_load(tmp_path: Path) -> None:
    cfg = load_config(
        CONFIGS_DIR / "tiny.yaml",
        ["optim.eps=1e-8", "data.path=/data/shards", "model.trunk.ffn_hidden_size=384", "optim.zero_stage=1"],
    )
    path = tmp_path / "sub" / "resolved.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg) == dataclasses.asdict(cfg)
    # The saved file is complete: loading it ignores nothing and needs no defaults.
    saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert set(saved) == {f.name for f in dataclasses.fields(Config)}
    assert load_config(path) != Config()


# --- load errors -------------------------------------------------------------------------------


def test_unknown_key_in_override_names_it_and_suggests() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.cp.rnak=3"])
    message = str(info.value)
    assert "model.cp.rnak" in message
    assert "did you mean 'model.cp.rank'" in message.lower()
    for key in ("horizon", "rank", "parameterisation", "chunk_tokens"):
        assert key in message  # lists the valid keys of the section


def test_unknown_key_in_file_names_it_and_suggests(tmp_path: Path) -> None:
    path = _write(tmp_path, {"train": {"stpes": 10}, "optimizer": {"lr": 1.0}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "train.stpes" in message and "did you mean 'train.steps'" in message.lower()
    assert "optimizer" in message and "did you mean 'optim'" in message.lower()
    assert str(path) in message
    assert len(info.value.problems) == 2


def test_right_key_in_wrong_section_points_to_it() -> None:
    with pytest.raises(ConfigError, match=r"train\.lr.*optim\.lr"):
        load_config(None, ["train.lr=0.1"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.steps=abc", ["train.steps='abc'", "integer"]),
        ("train.steps=2.5", ["train.steps=2.5", "integer"]),
        ("optim.lr=fast", ["optim.lr='fast'", "number"]),
        ("parallel.sequence_parallel=maybe", ["parallel.sequence_parallel='maybe'", "true or false"]),
        ("model.cp.parameterisation=foo", ["model.cp.parameterisation='foo'", "'shared'", "'separate'"]),
        ("model.cp.parameterisation=shard", ["did you mean 'shared'"]),
        ("optim.zero_stage=4", ["optim.zero_stage=4", "one of 0, 1, 2, 3"]),
        ("optim.zero_stage=true", ["optim.zero_stage=true"]),  # bool must not pass as 1
        ("train.steps=null", ["train.steps=null", "integer"]),
        ("model.cp=3", ["'model.cp' is a section"]),
        ("model.cp.rank.x=3", ["'model.cp.rank' is a setting"]),
        ("model.cp.rank", ["malformed override", "KEY=VALUE"]),
        ("model..rank=3", ["malformed override"]),
    ],
)
def test_bad_override_is_an_error_naming_it(override: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for text in expected:
        assert text in str(info.value)


def test_load_reports_all_problems_together(tmp_path: Path) -> None:
    path = _write(tmp_path, {"train": {"steps": "many"}, "model": {"cp": {"rnak": 2}}})
    with pytest.raises(ConfigError) as info:
        load_config(path, ["optim.lrr=1", "nonsense"])
    message = str(info.value)
    for text in ("train.steps='many'", "model.cp.rnak", "optim.lrr", "'nonsense'"):
        assert text in message
    assert len(info.value.problems) == 4


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(listing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n", encoding="utf-8")
    assert load_config(empty) == Config()
    with pytest.raises(TypeError):
        load_config(None, "model.cp.rank=2")  # type: ignore[arg-type]


# --- validation --------------------------------------------------------------------------------


def test_defaults_validate() -> None:
    validate_config(Config(), cuda_available=False)
    validate_config(Config(), world_size=2, cuda_available=False)  # 16 % (8 * 2) == 0


def test_types_set_in_python_are_checked() -> None:
    cfg = Config()
    cfg.model.cp.parameterisation = "foo"  # type: ignore[assignment]
    cfg.train.steps = "10"  # type: ignore[assignment]
    cfg.parallel.sequence_parallel = 1  # type: ignore[assignment]
    cfg.optim.zero_stage = True  # type: ignore[assignment]
    cfg.optim.lr = float("nan")
    problems = "\n".join(_problems(cfg))
    for text in (
        "model.cp.parameterisation='foo'",
        "train.steps='10'",
        "parallel.sequence_parallel=1",
        "optim.zero_stage=true",
        "optim.lr=nan",
    ):
        assert text in problems


def test_many_problems_reported_at_once() -> None:
    cfg = Config()
    cfg.model.trunk.num_layers = 0
    cfg.model.trunk.hidden_size = 250  # not divisible by 4 heads
    cfg.model.cp.horizon = 300  # >= seq_length 256
    cfg.model.cp.rank = 0
    cfg.model.cp.aux_loss_weight = -1.0
    cfg.optim.lr = 0.0
    cfg.optim.min_lr = -1.0
    cfg.optim.warmup_steps = -5
    cfg.optim.beta1 = 1.0
    cfg.optim.grad_clip = -1.0
    cfg.optim.weight_decay = -0.1
    cfg.train.steps = 0
    cfg.train.global_batch_size = 12  # not divisible by micro 8
    cfg.train.log_every = 0
    cfg.model.cp.chunk_tokens = 0
    cfg.data.heldout_fraction = 0.7
    cfg.optim.allgather_bucket_size = 1001
    cfg.parallel.sequence_parallel = True  # with tp=1
    problems = _problems(cfg)
    expected = [
        "model.trunk.num_layers=0",
        "model.trunk.hidden_size=250 is not divisible by model.trunk.num_attention_heads=4",
        "model.cp.horizon=300 must be smaller than model.trunk.seq_length=256",
        "model.cp.rank=0",
        "model.cp.aux_loss_weight=-1.0",
        "optim.lr=0.0",
        "optim.min_lr=-1.0",
        "optim.warmup_steps=-5",
        "optim.beta1=1.0",
        "optim.grad_clip=-1.0",
        "optim.weight_decay=-0.1",
        "train.steps=0",
        "train.global_batch_size=12 is not divisible by train.micro_batch_size=8",
        "train.log_every=0",
        "model.cp.chunk_tokens=0",
        "data.heldout_fraction=0.7",
        "optim.allgather_bucket_size=1001 must be a positive even number",
        "parallel.sequence_parallel=true needs parallel.tp > 1",
    ]
    joined = "\n".join(problems)
    for text in expected:
        assert text in joined, text
    assert len(problems) == len(expected), joined


def test_min_lr_above_lr_and_valid_edges() -> None:
    cfg = Config()
    cfg.optim.min_lr = 2e-3
    assert any("optim.min_lr=0.002 is larger than optim.lr=0.001" in p for p in _problems(cfg))
    ok = Config()
    ok.optim.min_lr = ok.optim.lr  # equal is allowed
    ok.optim.warmup_steps = 0
    ok.optim.grad_clip = 0.0
    ok.optim.beta1 = 0.0
    ok.data.heldout_fraction = 0.5
    ok.model.cp.horizon = ok.model.trunk.seq_length - 1
    ok.model.cp.parameterisation = "separate"
    ok.model.cp.phi = "linear"  # phi is ignored under `separate`: not an error
    validate_config(ok, cuda_available=False)


def test_llama_trunk_options() -> None:
    """Grouped-query attention, the gated MLP, untied embeddings and the norm epsilon: valid values pass, and
    each bad one is named with what to change."""
    ok = load_config(None, ["model.trunk.num_query_groups=2", "model.trunk.mlp=swiglu",
                            "model.trunk.untie_embeddings=true", "model.trunk.norm_epsilon=1e-6"])  # fmt: skip
    validate_config(ok, 2, cuda_available=False)
    cfg = load_config(None, ["model.trunk.num_query_groups=3", "model.trunk.norm_epsilon=0",
                             "model.trunk.untie_embeddings=true", "model.cp.parameterisation=separate"])  # fmt: skip
    assert _problems(cfg) == [
        "model.trunk.num_query_groups=3 does not divide model.trunk.num_attention_heads=4 (each key/value head "
        "serves an equal share of the query heads): set it to a divisor of 4, or to null for one per head",
        "model.trunk.norm_epsilon=0.0 must be > 0: e.g. 1e-5",
        "model.trunk.untie_embeddings=true with model.cp.parameterisation='separate': the output layer would "
        "be trained but never used (the separate head has its own unembeddings), so it would receive no "
        "gradient; set model.trunk.untie_embeddings to false, or model.cp.parameterisation to 'shared'",
    ]
    tp = load_config(None, ["model.trunk.num_attention_heads=8", "model.trunk.hidden_size=256",
                            "model.trunk.num_query_groups=2", "parallel.tp=4"])  # fmt: skip
    assert _problems(tp, 4) == [
        "model.trunk.num_query_groups=2 is not divisible by parallel.tp=4 (the key/value heads are split over "
        "tensor-parallel ranks): set model.trunk.num_query_groups to a multiple of parallel.tp (or change "
        "parallel.tp)"
    ]
    with pytest.raises(ConfigError, match="model.trunk.mlp"):
        load_config(None, ["model.trunk.mlp=relu"])


def test_bf16_allowed_with_and_without_cuda() -> None:
    cfg = Config()
    cfg.train.precision = "bf16"
    validate_config(cfg, cuda_available=True)
    validate_config(cfg, cuda_available=False)  # torch's CPU bf16 kernels train too (tests/test_trainer.py)


# --- DeepSpeed settings ----------------------------------------------------------------------------


def test_deepspeed_config_maps_the_optim_section() -> None:
    """Defaults for GPUs (overlap_comm on at ZeRO-2, buckets of 2e8, fp32 accumulation and reduction where
    DeepSpeed has them); every key lands where DeepSpeed 0.19.8 reads it, and DeepSpeed's own config parser
    (which forbids unknown ZeRO keys) takes the dict."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from cpmtp_dist.training.optim import deepspeed_config

    def ds(overrides: list[str], *, bf16: bool, pipelined: bool = False) -> dict:
        cfg = load_config(None, overrides).optim
        return deepspeed_config(cfg, micro_batch_size=2, grad_accum=4, dp=1, bf16=bf16, pipelined=pipelined)

    fp32 = ds([], bf16=False)
    assert fp32["zero_optimization"] == {
        "stage": 0,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 200_000_000,
        "allgather_bucket_size": 200_000_000,
    }
    assert (fp32["train_batch_size"], fp32["gradient_clipping"], fp32["bf16"]["enabled"]) == (8, 1.0, False)
    # DeepSpeed's ZeRO-1 with overlap_comm gets accumulated gradients wrong (OptimConfig.overlap_comm).
    overlap = [
        ds([f"optim.zero_stage={s}"], bf16=False)["zero_optimization"]["overlap_comm"] for s in (0, 1, 2)
    ]
    assert overlap == [False, False, True]
    # (ZeRO stage, pipelined) -> (accumulation, reduction) under `auto` in a bf16 run.
    for stage, pipelined, dtypes in ((0, False, "bf16 fp32"), (1, False, "fp32 fp32"), (2, False, "fp32 fp32"),
                                     (1, True, "bf16 fp32"), (2, True, "bf16 fp32")):  # fmt: skip
        d = ds([f"optim.zero_stage={stage}"], bf16=True, pipelined=pipelined)
        assert f"{d['data_types']['grad_accum_dtype']} {d['communication_data_type']}" == dtypes, stage
        assert d["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert ds(["optim.grad_accum_dtype=bf16"], bf16=False)["data_types"]["grad_accum_dtype"] == "fp32"
    custom = ds(["optim.zero_stage=2", "optim.overlap_comm=false", "optim.contiguous_gradients=false",
                 "optim.reduce_scatter=false", "optim.reduce_bucket_size=3e8", "optim.allgather_bucket_size=1e8",
                 "optim.grad_accum_dtype=bf16", "optim.grad_reduce_dtype=bf16"], bf16=True)  # fmt: skip
    parsed = DeepSpeedConfig(custom)  # outside torch.distributed: a world of one
    z = parsed.zero_config
    assert (z.stage, z.overlap_comm, z.contiguous_gradients, z.reduce_scatter) == (2, False, False, False)
    assert (z.reduce_bucket_size, z.allgather_bucket_size) == (300_000_000, 100_000_000)
    assert (parsed.grad_accum_dtype, str(parsed.communication_data_type)) == ("bf16", "torch.bfloat16")
    assert parsed.bfloat16_config.immediate_grad_update


@pytest.mark.parametrize(
    ("overrides", "cuda", "expected"),
    [
        (
            ["optim.allgather_bucket_size=1001"],
            False,
            "optim.allgather_bucket_size=1001 must be a positive even",
        ),
        (["optim.allgather_bucket_size=0"], False, "optim.allgather_bucket_size=0 must be a positive even"),
        (["optim.reduce_bucket_size=0"], False, "optim.reduce_bucket_size=0 is below 1"),
        (
            ["parallel.ep=2", "optim.zero_stage=1", "optim.reduce_scatter=false"],
            False,
            "optim.reduce_scatter=false with parallel.ep=2: DeepSpeed's ZeRO optimizer supports expert",
        ),
        (
            ["parallel.ep=2", "optim.zero_stage=2", "optim.contiguous_gradients=false"],
            False,
            "optim.contiguous_gradients=false with parallel.ep=2 and optim.zero_stage=2",
        ),
        (
            ["train.precision=bf16", "optim.grad_accum_dtype=fp32"],
            False,
            "optim.grad_accum_dtype='fp32' in a bf16 run needs optim.zero_stage 1 or 2",
        ),
        (  # train.precision=auto is bf16 where there is a GPU
            ["optim.grad_accum_dtype=fp32"],
            True,
            "optim.grad_accum_dtype='fp32' in a bf16 run needs optim.zero_stage 1 or 2",
        ),
        (
            ["train.precision=bf16", "parallel.pp=2", "optim.zero_stage=1", "optim.grad_accum_dtype=fp32"],
            False,
            "optim.grad_accum_dtype='fp32' in a bf16 run is not supported with parallel.pp=2",
        ),
        (
            ["train.precision=bf16", "parallel.pp=2", "optim.zero_stage=2", "optim.grad_accum_dtype=fp32"],
            False,
            "optim.grad_accum_dtype='fp32' in a bf16 run is not supported with parallel.pp=2",
        ),
    ],
)
def test_deepspeed_settings_deepspeed_rejects_are_refused(
    overrides: list[str], cuda: bool, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(load_config(None, overrides), cuda_available=cuda)
    assert len(info.value.problems) == 1 and expected in info.value.problems[0], info.value.problems
    assert "set optim." in info.value.problems[0]  # says what to change


@pytest.mark.parametrize(
    "overrides",
    [
        ["optim.grad_accum_dtype=fp32"],  # fp32 on a CPU (auto) or by choice: accumulates in fp32 anyway
        ["train.precision=fp32", "parallel.pp=2", "optim.zero_stage=1", "optim.grad_accum_dtype=fp32"],
        ["train.precision=bf16", "optim.zero_stage=1", "optim.grad_accum_dtype=fp32"],
        [
            "train.precision=bf16",
            "optim.zero_stage=2",
            "optim.grad_reduce_dtype=bf16",
            "optim.overlap_comm=false",
        ],
        ["train.precision=bf16", "parallel.pp=2", "optim.zero_stage=1", "optim.grad_accum_dtype=bf16"],
        ["parallel.ep=2", "optim.zero_stage=1", "optim.contiguous_gradients=false"],  # ZeRO-1 only warns
        ["optim.reduce_scatter=false", "optim.contiguous_gradients=false", "optim.allgather_bucket_size=2"],
    ],
)
def test_deepspeed_settings_deepspeed_takes_pass(overrides: list[str]) -> None:
    validate_config(load_config(None, overrides), cuda_available=False)


@pytest.mark.parametrize(
    ("changes", "world_size", "expected"),
    [
        (
            {"parallel.tp": 2, "parallel.pp": 2, "optim.zero_stage": 1},
            6,
            "world_size=6 is not divisible by parallel.tp * parallel.pp = 2 * 2 = 4",
        ),
        ({"parallel.pp": 2}, None, "parallel.pp=2 needs optim.zero_stage 1 or 2 (got 0)"),
        ({"optim.zero_stage": 3}, None, "optim.zero_stage=3 is not supported"),
        (
            {"parallel.tp": 3},
            None,
            "model.trunk.num_attention_heads=4 is not divisible by parallel.tp=3",
        ),
        (
            {"parallel.tp": 3},
            None,
            "model.trunk.vocab_size=2048 is not divisible by parallel.tp=3",
        ),
        (
            {"parallel.pp": 3},
            None,
            "model.trunk.num_layers=4 is not divisible by parallel.pp=3",
        ),
        (
            {"model.cp.rank": 6, "parallel.ep": 4},
            None,
            "model.cp.rank=6 is not divisible by parallel.ep=4: set model.cp.rank to a multiple of parallel.ep",
        ),
        (
            {"train.global_batch_size": 16, "train.micro_batch_size": 8},
            4,
            "train.global_batch_size=16 is not divisible by train.micro_batch_size * dp = 8 * 4 = 32",
        ),
        (
            {"parallel.tp": 2, "train.global_batch_size": 24, "train.micro_batch_size": 4},
            8,  # dp = 4, micro * dp = 16
            "train.global_batch_size=24 is not divisible by train.micro_batch_size * dp = 4 * 4 = 16",
        ),
        (
            {"parallel.tp": 2, "parallel.sequence_parallel": True, "model.trunk.seq_length": 255},
            None,
            "model.trunk.seq_length=255 is not divisible by parallel.tp=2",
        ),
        (
            {"parallel.tp": 2, "model.trunk.ffn_hidden_size": 1001},
            None,
            "model.trunk.ffn_hidden_size=1001",
        ),
        ({}, 0, "world_size=0 must be a positive integer"),
        (
            {"model.cp.rank": 8, "parallel.ep": 4, "optim.zero_stage": 1},
            2,
            "parallel.ep=4 does not divide the data-parallel size dp = 2",
        ),
        ({"parallel.ep": 2}, None, "parallel.ep=2 needs optim.zero_stage >= 1"),
        (
            {"train.eval_batches": 1, "train.micro_batch_size": 4},
            2,
            "train.eval_batches=1 is fewer than the data-parallel size dp = 2",
        ),
        (
            {"parallel.tp": 2, "model.cp.loss_impl": "naive"},
            None,
            "model.cp.loss_impl='naive' is a single-device reference",
        ),
    ],
)
def test_layout_checks(changes: dict, world_size: int | None, expected: str) -> None:
    overrides = [f"{key}={yaml.safe_dump(value).splitlines()[0]}" for key, value in changes.items()]
    cfg = load_config(None, overrides)
    problems = _problems(cfg, world_size)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("changes", "world_size"),
    [
        ({"parallel.tp": 2, "parallel.pp": 2, "optim.zero_stage": 1}, 8),  # dp = 2, 16 % (8 * 2) == 0
        ({"parallel.tp": 4, "parallel.sequence_parallel": True}, 4),  # dp = 1
        (
            {"model.cp.rank": 8, "parallel.ep": 4, "optim.zero_stage": 1, "train.micro_batch_size": 4},
            4,
        ),  # dp = 4
        ({"parallel.pp": 2, "optim.zero_stage": 2, "train.micro_batch_size": 2}, 8),  # dp = 4, 16 % 8 == 0
    ],
)
def test_valid_layouts_pass(changes: dict, world_size: int) -> None:
    overrides = [f"{key}={yaml.safe_dump(value).splitlines()[0]}" for key, value in changes.items()]
    validate_config(load_config(None, overrides), world_size, cuda_available=False)


def test_world_size_batch_check_skipped_when_layout_already_wrong() -> None:
    # Only the root cause is reported: the dp-based batch check needs a valid tp * pp split.
    cfg = load_config(None, ["parallel.tp=2", "parallel.pp=2", "optim.zero_stage=1"])
    problems = _problems(cfg, 6)
    assert len(problems) == 1 and "world_size=6" in problems[0]


def test_horizon_must_be_below_seq_length() -> None:
    cfg = load_config(None, ["model.trunk.seq_length=8", "model.cp.horizon=8"])
    assert any(
        "model.cp.horizon=8 must be smaller than model.trunk.seq_length=8" in p for p in _problems(cfg)
    )
    validate_config(
        load_config(None, ["model.trunk.seq_length=8", "model.cp.horizon=7"]), cuda_available=False
    )


def test_tracking_section_overrides_and_checks() -> None:
    cfg = load_config(
        CONFIGS_DIR / "tiny.yaml",
        ["tracking.uri=http://127.0.0.1:5000", "tracking.experiment=2024", "tracking.retry_every_s=1"],
    )
    assert cfg.tracking.uri == "http://127.0.0.1:5000"  # a URI stays text, not YAML's reading of it
    assert cfg.tracking.experiment == "2024" and cfg.tracking.retry_every_s == 1.0
    assert load_config(None).tracking.uri is None  # default: the run directory's sqlite file
    assert load_config(None, ["tracking.enabled=false"]).tracking.enabled is False
    cfg = Config()
    cfg.tracking.uri = " "
    cfg.tracking.retry_every_s = 0.0
    cfg.tracking.system_metrics_interval_s = -1.0
    cfg.tracking.flush_timeout_s = -1.0
    problems = "\n".join(_problems(cfg))
    for text in (
        "tracking.uri='' is empty",
        "tracking.retry_every_s=0.0 must be > 0",
        "tracking.system_metrics_interval_s=-1.0 must be > 0",
        "tracking.flush_timeout_s=-1.0 must be >= 0",
    ):
        assert text in problems
