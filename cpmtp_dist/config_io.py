"""Loading, checking and saving the typed configuration of :mod:`cpmtp_dist.config`.

Precedence is defaults < YAML file < dotted overrides (``model.cp.rank=8``). Loading only
resolves keys and types; :func:`validate_config` checks the values against each other and
against the launch (world size, CUDA), because those facts are only known at run time.

Both stages collect every problem they find and raise a single :class:`ConfigError`, so a user
fixes a config in one round instead of one error per run. Validation runs one checker per section; the
fit to the world size is :class:`cpmtp_dist.layout.Layout`'s. No training code is imported, and torch only
for the CUDA probe of a bf16-only setting, so a login node or a launcher checks a config cheaply.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from functools import reduce
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from cpmtp_dist.checkpoint_paths import FinetuneError, resolve_init_checkpoint
from cpmtp_dist.config import Config
from cpmtp_dist.data.data_path import parse_data_path
from cpmtp_dist.errors import UserError
from cpmtp_dist.layout import Layout

__all__ = ["ConfigError", "config_to_dict", "flatten", "load_config", "save_config", "validate_config"]


class ConfigError(UserError):
    """One or more configuration problems; the message lists each on its own line.

    ``problems`` holds the individual messages, each naming the dotted setting, its value and
    what to change.
    """

    def __init__(self, problems: Sequence[str], header: str = "Invalid configuration") -> None:
        self.problems: list[str] = list(problems)
        count = len(self.problems)
        lines = [f"{header} ({count} problem{'' if count == 1 else 's'}):"]
        lines += [f"  - {problem}" for problem in self.problems]
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Type introspection
# ---------------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved field types of a config dataclass, in declaration order.

    ``config.py`` uses ``from __future__ import annotations``, so the raw annotations are strings
    and must be evaluated by ``get_type_hints``.
    """
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _split_optional(tp: Any) -> tuple[bool, Any]:
    """``X | None`` -> (True, X); anything else -> (False, tp)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = get_args(tp)
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            raise TypeError(f"unsupported config field type {tp!r}: only `X | None` unions are supported")
        return True, inner[0]
    return False, tp


def _fmt(value: Any) -> str:
    """A value as it would be written in an override (strings quoted so '' and '8' are visible)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


def _describe(tp: Any) -> str:
    optional, inner = _split_optional(tp)
    if get_origin(inner) is Literal:
        text = "one of " + ", ".join(_fmt(a) for a in get_args(inner))
    else:
        text = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(
            inner, getattr(inner, "__name__", repr(inner))
        )
    return f"{text} or null" if optional else text


def _matches(value: Any, tp: Any) -> bool:
    """Strict check of an already-built value (no conversion): what `validate_config` accepts."""
    optional, inner = _split_optional(tp)
    if value is None:
        return optional
    if get_origin(inner) is Literal:
        # Compare types too: `True == 1`, so a bool must not pass for Literal[0, 1].
        return any(type(value) is type(a) and value == a for a in get_args(inner))
    if inner is bool:
        return isinstance(value, bool)
    if inner is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if inner is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if inner is str:
        return isinstance(value, str)
    raise TypeError(f"unsupported config field type {tp!r}")


def _convert(value: Any, tp: Any, raw: str | None) -> Any:
    """Best-effort conversion of a parsed YAML value towards ``tp``; `_matches` decides afterwards.

    ``raw`` is the override's text before YAML parsing, used so `data.path=2024` means the string.
    """
    _, inner = _split_optional(tp)
    if value is None or isinstance(value, bool):
        return value
    if inner is str and raw is not None and isinstance(value, (int, float)):
        return raw
    if inner is float:
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as a string, not a float.
            try:
                return float(value.strip())
            except ValueError:
                return value
    if inner is int:
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                return value
        # Accept integral floats such as `8e6` or `1.0e+3`, never a silently truncated 2.5.
        if isinstance(number, float) and math.isfinite(number) and number.is_integer():
            return int(number)
    return value


def _type_problem(path: str, value: Any, tp: Any) -> str:
    _, inner = _split_optional(tp)
    if get_origin(inner) is Literal:
        choices = [a for a in get_args(inner)]
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [c for c in choices if isinstance(c, str)], n=1)
            hint = f" (did you mean {_fmt(close[0])}?)" if close else ""
        return f"{path}={_fmt(value)} is not {_describe(tp)}{hint}: set {path} to one of these"
    return (
        f"{path}={_fmt(value)} ({type(value).__name__}) is not {_describe(tp)}: set {path} to {_describe(tp)}"
    )


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    paths: list[str] = []
    for name, tp in _field_types(cls).items():
        if _is_section(tp):
            paths += _leaf_paths(tp, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _unknown_key(prefix: str, key: str, valid: list[str], source: str) -> str:
    dotted = f"{prefix}{key}"
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        hint = f" Did you mean '{prefix}{close[0]}'?"
    else:
        # A right name in the wrong section (`train.lr`) is a common slip: point at the right one.
        elsewhere = [p for p in _leaf_paths(Config) if p.rsplit(".", 1)[-1] == key]
        hint = f" Did you mean '{elsewhere[0]}'?" if elsewhere else ""
    section = f"section '{prefix[:-1]}'" if prefix else "the top level"
    return f"unknown setting '{dotted}' ({source}).{hint} Valid keys of {section}: {', '.join(valid)}"


def _assign(
    obj: Any, parts: list[str], prefix: str, value: Any, source: str, problems: list[str], raw: str | None
) -> None:
    """Set the dotted key ``parts`` (relative to ``obj``) to ``value``, recording any problem."""
    fields = _field_types(type(obj))
    key = parts[0]
    dotted = f"{prefix}{key}"
    if key not in fields:
        problems.append(_unknown_key(prefix, key, list(fields), source))
        return
    tp = fields[key]
    if len(parts) > 1:
        if not _is_section(tp):
            problems.append(f"'{dotted}' is a setting, not a section ({source}): use '{dotted}=VALUE'")
            return
        _assign(getattr(obj, key), parts[1:], f"{dotted}.", value, source, problems, raw)
        return
    if _is_section(tp):
        if value is None:  # `train:` with nothing under it: an empty section, keep the defaults
            return
        if not isinstance(value, Mapping):
            problems.append(
                f"'{dotted}' is a section, not a setting ({source}): give a mapping of its keys "
                f"({', '.join(_field_types(tp))}) or set one key, e.g. '{_leaf_paths(tp, f'{dotted}.')[0]}=...'"
            )
            return
        for sub_key, sub_value in value.items():
            sub_parts = str(sub_key).split(".")
            _assign(getattr(obj, key), sub_parts, f"{dotted}.", sub_value, source, problems, None)
        return
    converted = _convert(value, tp, raw)
    if _matches(converted, tp):
        setattr(obj, key, converted)
    else:
        problems.append(f"{_type_problem(dotted, value, tp)} ({source})")


def _parse_override(text: Any, problems: list[str]) -> tuple[list[str], Any, str] | None:
    if not isinstance(text, str) or "=" not in text:
        problems.append(
            f"malformed override {text!r}: expected KEY=VALUE with a dotted key, e.g. 'model.cp.rank=8'"
        )
        return None
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        problems.append(
            f"malformed override {text!r}: the key {key.strip()!r} must be dotted names like 'model.cp.rank'"
        )
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problems.append(f"override {text!r}: cannot parse the value {raw!r} as YAML ({err}); quote it")
        return None
    return parts, value, raw.strip()


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Build a :class:`Config` from defaults, then the YAML file at ``path``, then ``overrides``.

    Each override is ``dotted.key=value``; the value is parsed as YAML (``8``, ``1e-3``, ``true``,
    ``null``, ``[1, 2]``) and converted to the field's type. Later overrides win over earlier ones.
    Unknown keys, malformed overrides and values of the wrong type are all collected and raised
    together as one :class:`ConfigError`. Cross-field checks are left to :func:`validate_config`.
    """
    if isinstance(overrides, str):  # a lone string would otherwise be iterated char by char
        raise TypeError("overrides must be a sequence of 'key=value' strings, not a single string")
    cfg = Config()
    problems: list[str] = []
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError([f"cannot read config file {str(path)!r}: {err.strerror or err}"]) from err
        except yaml.YAMLError as err:
            raise ConfigError([f"config file {str(path)!r} is not valid YAML: {err}"]) from err
        source = f"in {path}"
        if data is None:
            data = {}
        if isinstance(data, Mapping):
            for key, value in data.items():
                _assign(cfg, str(key).split("."), "", value, source, problems, None)
        else:
            problems.append(
                f"config file {str(path)!r} must be a mapping of sections ({', '.join(_field_types(Config))}), "
                f"not {type(data).__name__}"
            )
    for text in overrides:
        parsed = _parse_override(text, problems)
        if parsed is not None:
            parts, value, raw = parsed
            _assign(cfg, parts, "", value, f"in override {text!r}", problems, raw)
    if problems:
        raise ConfigError(problems, header="Cannot load configuration")
    return cfg


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as nested plain dicts (sections -> settings), ready for YAML or JSON."""
    return dataclasses.asdict(cfg)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> {"model.cp.rank": 4, ...}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML that :func:`load_config` reads back to an equal :class:`Config`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    path.write_text(
        "# Resolved cpmtp_dist configuration (defaults < file < overrides).\n" + text, encoding="utf-8"
    )


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

# (setting, minimum, what the smallest value means or why it is needed).
_MINIMUMS: tuple[tuple[str, int | float, str], ...] = (
    ("model.trunk.num_layers", 1, ""),
    ("model.trunk.hidden_size", 1, ""),
    ("model.trunk.num_attention_heads", 1, ""),
    ("model.trunk.ffn_hidden_size", 1, " (or null for 4 * hidden_size)"),
    ("model.trunk.seq_length", 1, ""),
    ("model.trunk.vocab_size", 1, ""),
    ("model.trunk.rotary_base", 1, ""),
    ("model.cp.horizon", 1, " (1 is plain next-token prediction)"),
    ("model.cp.rank", 1, " (1 is a single product-of-marginals component)"),
    ("model.cp.phi_hidden_size", 1, " (or null for hidden_size)"),
    ("model.cp.chunk_tokens", 1, ""),
    ("model.cp.aux_loss_weight", 0, " (0 turns the load-balancing loss off)"),
    ("model.cp.init_noise_std", 0, ""),
    ("parallel.tp", 1, " (1 means no tensor parallelism)"),
    ("parallel.pp", 1, " (1 means no pipeline parallelism)"),
    ("parallel.ep", 1, " (1 means every rank holds all components)"),
    ("optim.warmup_steps", 0, " (0 means no warmup)"),
    ("optim.weight_decay", 0, " (0 means no weight decay)"),
    ("optim.grad_clip", 0, " (0 disables clipping)"),
    ("optim.reduce_bucket_size", 1, " (the default is 200000000)"),
    ("train.steps", 1, ""),
    ("train.global_batch_size", 1, ""),
    ("train.micro_batch_size", 1, ""),
    ("train.seed", 0, ""),
    ("train.log_every", 1, ""),
    ("train.eval_every", 0, " (0 evaluates only at the end)"),
    ("train.eval_batches", 1, ""),
    ("train.peak_tflops", 0, " (0 takes the GPU's peak from the built-in table)"),
    ("data.tokenizer_vocab_size", 1, ""),
    ("data.max_chars", 0, " (0 means no cap)"),
    ("data.num_workers", 0, " (0 reads shards in the training process)"),
    ("checkpoint.keep_every", 0, " (0 keeps no checkpoint beyond checkpoint.keep_last)"),
    ("data.shuffle_buffer", 1, " (1 means no buffer shuffling)"),
    ("checkpoint.every", 0, " (0 saves only at the end)"),
    ("checkpoint.keep_last", 1, ""),
)


def _collect_type_problems(obj: Any, cls: type, prefix: str, problems: list[str], bad: set[str]) -> None:
    for name, tp in _field_types(cls).items():
        dotted = f"{prefix}{name}"
        value = getattr(obj, name)
        if _is_section(tp):
            if isinstance(value, tp):
                _collect_type_problems(value, tp, f"{dotted}.", problems, bad)
            else:
                problems.append(
                    f"{dotted} is a {type(value).__name__}, not a {tp.__name__} section: assign a {tp.__name__}"
                )
                bad.add(dotted)
        elif not _matches(value, tp):
            problems.append(_type_problem(dotted, value, tp))
            bad.add(dotted)


def _cuda_available() -> bool:
    try:
        import torch  # imported lazily: reading a config must not require torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@dataclasses.dataclass
class _Checker:
    """The config under check, the problems found so far, and the settings whose type is wrong."""

    cfg: Config
    problems: list[str] = dataclasses.field(default_factory=list)
    bad: set[str] = dataclasses.field(default_factory=set)

    def ok(self, *paths: str) -> bool:
        """Whether the settings have the right type (range checks on a value of the wrong type would raise or
        mislead; its type error suffices)."""
        return not any(p == b or p.startswith(f"{b}.") for p in paths for b in self.bad)

    def get(self, path: str) -> Any:
        return reduce(getattr, path.split("."), self.cfg)

    def positive(self, *paths: str) -> bool:
        return self.ok(*paths) and all(self.get(p) is not None and self.get(p) >= 1 for p in paths)

    def add(self, problem: str) -> None:
        self.problems.append(problem)


def _check_minimums(c: _Checker) -> None:
    for path, minimum, meaning in _MINIMUMS:
        value = c.get(path)
        if c.ok(path) and value is not None and value < minimum:
            what = "a positive integer" if minimum == 1 else "0 or more"
            c.add(f"{path}={_fmt(value)} is below {minimum}: set {path} to {what}{meaning}")


def _check_model(c: _Checker) -> None:
    trunk, cp = c.cfg.model.trunk, c.cfg.model.cp
    if c.positive("model.trunk.hidden_size", "model.trunk.num_attention_heads"):
        if trunk.hidden_size % trunk.num_attention_heads:
            c.add(
                f"model.trunk.hidden_size={trunk.hidden_size} is not divisible by model.trunk.num_attention_heads="
                f"{trunk.num_attention_heads}: set model.trunk.hidden_size to a multiple of it (or change the heads)"
            )
    groups = trunk.num_query_groups if c.ok("model.trunk.num_query_groups") else None
    if groups is not None and c.positive("model.trunk.num_attention_heads"):
        heads = trunk.num_attention_heads
        if groups < 1 or heads % groups:
            c.add(
                f"model.trunk.num_query_groups={groups} does not divide model.trunk.num_attention_heads={heads} "
                "(each key/value head serves an equal share of the query heads): set it to a divisor of "
                f"{heads}, or to null for one per head"
            )
    if c.ok("model.trunk.rope_scaling_factor") and trunk.rope_scaling_factor < 0:
        c.add(
            f"model.trunk.rope_scaling_factor={trunk.rope_scaling_factor} must be >= 0: 0 for plain RoPE, or "
            "Llama 3.1's factor (e.g. 8 or 32)"
        )
    if c.ok("model.trunk.norm_epsilon") and not trunk.norm_epsilon > 0:
        c.add(f"model.trunk.norm_epsilon={trunk.norm_epsilon} must be > 0: e.g. 1e-5")
    if (
        c.ok("model.trunk.untie_embeddings", "model.cp.parameterisation", "finetune.freeze_trunk")
        and trunk.untie_embeddings
        and cp.parameterisation == "separate"
        and not c.cfg.finetune.freeze_trunk
    ):
        c.add(
            "model.trunk.untie_embeddings=true with model.cp.parameterisation='separate': the output layer would "
            "be trained but never used (the separate head has its own unembeddings), so it would receive no "
            "gradient; set model.trunk.untie_embeddings to false, or model.cp.parameterisation to 'shared'"
        )
    if c.ok("model.trunk.dropout") and not 0 <= trunk.dropout < 1:
        c.add(f"model.trunk.dropout={trunk.dropout} is outside [0, 1): set it to e.g. 0.0 or 0.1")
    if c.ok("model.trunk.init_method_std") and trunk.init_method_std <= 0:
        c.add(f"model.trunk.init_method_std={trunk.init_method_std} must be > 0: e.g. 0.02")
    if c.positive("model.cp.horizon", "model.trunk.seq_length") and cp.horizon >= trunk.seq_length:
        c.add(
            f"model.cp.horizon={cp.horizon} must be smaller than model.trunk.seq_length={trunk.seq_length} "
            "(each position needs n future tokens inside the sequence): lower model.cp.horizon or raise seq_length"
        )
    # model.cp.phi only matters for the `shared` parameterisation; under `separate` it is ignored.


def _check_optim(c: _Checker) -> None:
    opt = c.cfg.optim
    if c.ok("optim.lr") and opt.lr <= 0:
        c.add(f"optim.lr={opt.lr} must be > 0: set optim.lr to a positive learning rate, e.g. 1e-3")
    if c.ok("optim.min_lr") and opt.min_lr < 0:
        c.add(f"optim.min_lr={opt.min_lr} must be >= 0: set it to 0 or a small positive rate")
    elif c.ok("optim.min_lr", "optim.lr") and opt.lr > 0 and opt.min_lr > opt.lr:
        c.add(
            f"optim.min_lr={opt.min_lr} is larger than optim.lr={opt.lr}: the cosine decay must end at or "
            "below the peak, so lower optim.min_lr (or raise optim.lr)"
        )
    for name in ("beta1", "beta2"):
        beta = getattr(opt, name)
        if c.ok(f"optim.{name}") and not 0 <= beta < 1:
            c.add(f"optim.{name}={beta} is outside [0, 1): set it to e.g. 0.9 (beta1) or 0.95 (beta2)")
    if c.ok("optim.eps") and opt.eps <= 0:
        c.add(f"optim.eps={opt.eps} must be > 0: e.g. 1e-8")


def _check_spike_settings(c: _Checker) -> None:
    train = c.cfg.train
    if not train.spike_rewind:
        return
    if c.ok("train.spike_sigmas") and not train.spike_sigmas > 0:
        c.add(
            f"train.spike_sigmas={train.spike_sigmas} must be positive: a number of standard deviations, e.g. 6"
        )
    for name in ("spike_steps", "spike_max_rewinds"):
        if c.ok(f"train.{name}") and getattr(train, name) < 1:
            c.add(f"train.{name}={getattr(train, name)} must be at least 1")
    if c.ok("train.spike_window") and train.spike_window < 2:
        c.add(
            f"train.spike_window={train.spike_window} must be at least 2: the running statistics need 2 steps"
        )
    if c.ok("checkpoint.every") and c.cfg.checkpoint.every <= 0:
        c.add(
            "train.spike_rewind=true rewinds to a checkpoint, but checkpoint.every="
            f"{c.cfg.checkpoint.every} saves none during training: set checkpoint.every (e.g. 100)"
        )


def _check_train_and_data(c: _Checker) -> None:
    train, data, trunk = c.cfg.train, c.cfg.data, c.cfg.model.trunk
    if c.positive("train.global_batch_size", "train.micro_batch_size"):
        if train.global_batch_size % train.micro_batch_size:
            c.add(
                f"train.global_batch_size={train.global_batch_size} is not divisible by train.micro_batch_size="
                f"{train.micro_batch_size}: set train.global_batch_size to a multiple of train.micro_batch_size"
            )
    if c.ok("train.max_nonfinite_skips") and train.max_nonfinite_skips < 1:
        c.add(
            f"train.max_nonfinite_skips={train.max_nonfinite_skips} must be at least 1: it is how many non-finite "
            "steps in a row end a run with train.on_nonfinite=skip"
        )
    _check_spike_settings(c)
    if c.ok("data.heldout_fraction") and not 0 < data.heldout_fraction <= 0.5:
        c.add(
            f"data.heldout_fraction={data.heldout_fraction} is outside (0, 0.5]: set it to a small fraction such as 0.02"
        )
    if c.ok("data.path") and data.path is not None:
        if not data.path.strip():
            c.add("data.path='' is empty: set it to a folder of prepared shards, or null for data.corpus")
        else:
            try:
                parse_data_path(data.path)
            except ValueError as err:
                c.add(str(err))
    if (
        c.positive("data.tokenizer_vocab_size", "model.trunk.vocab_size")
        and c.ok("data.path")
        and data.path is None
        and data.tokenizer_vocab_size > trunk.vocab_size
    ):
        c.add(
            f"data.tokenizer_vocab_size={data.tokenizer_vocab_size} exceeds model.trunk.vocab_size={trunk.vocab_size}: "
            "token ids would fall outside the embedding, so raise model.trunk.vocab_size or lower the tokenizer's"
        )


def _check_parallel_shapes(c: _Checker) -> None:
    """The model's sizes against the degrees that split them."""
    trunk, cp, par = c.cfg.model.trunk, c.cfg.model.cp, c.cfg.parallel
    if c.ok("parallel.timeout_s") and not par.timeout_s > 0:
        c.add(f"parallel.timeout_s={par.timeout_s} must be > 0 seconds: e.g. 600")
    if c.ok("parallel.sequence_parallel", "parallel.tp") and par.sequence_parallel and par.tp <= 1:
        c.add(
            f"parallel.sequence_parallel=true needs parallel.tp > 1 (got parallel.tp={par.tp}): "
            "set parallel.sequence_parallel to false or raise parallel.tp"
        )
    if c.positive("model.cp.rank", "parallel.ep") and cp.rank % par.ep:
        c.add(
            f"model.cp.rank={cp.rank} is not divisible by parallel.ep={par.ep}: set model.cp.rank to a multiple "
            "of parallel.ep (or change parallel.ep)"
        )
    for path, what in (
        ("model.trunk.num_attention_heads", "the heads are split over tensor-parallel ranks"),
        ("model.trunk.num_query_groups", "the key/value heads are split over tensor-parallel ranks"),
        ("model.trunk.vocab_size", "the unembedding is split by vocabulary over tensor-parallel ranks"),
    ):
        if c.positive(path, "parallel.tp") and c.get(path) % par.tp:
            c.add(
                f"{path}={c.get(path)} is not divisible by parallel.tp={par.tp} ({what}): set {path} to a "
                "multiple of parallel.tp (or change parallel.tp)"
            )
    if c.positive("model.trunk.hidden_size", "parallel.tp") and c.ok("model.trunk.ffn_hidden_size"):
        ffn = trunk.ffn_hidden_size if trunk.ffn_hidden_size is not None else 4 * trunk.hidden_size
        if ffn >= 1 and ffn % par.tp:
            c.add(
                f"the MLP width {ffn} (model.trunk.ffn_hidden_size={_fmt(trunk.ffn_hidden_size)}) is not divisible "
                f"by parallel.tp={par.tp} (the MLP is split over tensor-parallel ranks): set "
                "model.trunk.ffn_hidden_size to a multiple of parallel.tp (or change parallel.tp)"
            )
    if c.positive("model.trunk.num_layers", "parallel.pp") and trunk.num_layers % par.pp:
        c.add(
            f"model.trunk.num_layers={trunk.num_layers} is not divisible by parallel.pp={par.pp} (each pipeline "
            "stage holds the same number of layers): set model.trunk.num_layers to a multiple of parallel.pp "
            "(or change parallel.pp)"
        )
    if (
        c.ok("parallel.sequence_parallel")
        and par.sequence_parallel
        and c.positive("model.trunk.seq_length", "parallel.tp")
        and trunk.seq_length % par.tp
    ):
        c.add(
            f"model.trunk.seq_length={trunk.seq_length} is not divisible by parallel.tp={par.tp}, which "
            "parallel.sequence_parallel=true needs: set seq_length to a multiple of parallel.tp"
        )


def _check_parallel_support(c: _Checker) -> None:
    """What the parallel implementation requires of the loss and of ZeRO."""
    par, zero_stage = c.cfg.parallel, c.cfg.optim.zero_stage
    if c.ok("parallel.tp", "parallel.ep", "model.cp.loss_impl") and (par.tp > 1 or par.ep > 1):
        if c.cfg.model.cp.loss_impl == "naive":
            c.add(
                "model.cp.loss_impl='naive' is a single-device reference: set it to 'chunked' when "
                "parallel.tp or parallel.ep > 1"
            )
    if c.ok("parallel.ep", "optim.zero_stage") and par.ep > 1 and zero_stage == 0:
        c.add(
            f"parallel.ep={par.ep} needs optim.zero_stage >= 1 (DeepSpeed's ZeRO-0 gradient clipping mis-counts "
            "components sharded over ranks): set optim.zero_stage to 1 or 2"
        )
    if c.ok("optim.zero_stage") and zero_stage == 3:
        c.add(
            "optim.zero_stage=3 is not supported: the chunked CP loss recomputes the head's factors during "
            "the backward pass, after ZeRO-3 has released the head's parameters; set optim.zero_stage to 1 "
            "(optimizer states sharded over dp) or 2 (optimizer states and gradients)"
        )
    elif c.ok("parallel.pp", "optim.zero_stage") and par.pp > 1 and zero_stage not in (1, 2):
        c.add(
            f"parallel.pp={par.pp} needs optim.zero_stage 1 or 2 (got {zero_stage}): DeepSpeed's "
            "ZeRO-0 gradient clipping leaves out the parameters of the last pipeline stage; set "
            "optim.zero_stage to 1 or 2"
        )


def _check_finetune(c: _Checker) -> None:
    """Head-only fine-tuning: the source checkpoint and the frozen trunk (distillation: `_check_distill`)."""
    ft, par = c.cfg.finetune, c.cfg.parallel
    if c.ok("finetune.distill_weight") and not 0 <= ft.distill_weight <= 1:
        c.add(
            f"finetune.distill_weight={ft.distill_weight} is outside [0, 1]: set it to e.g. 0.5 (0 turns "
            "distillation off)"
        )
    if c.ok("finetune.init_from") and ft.init_from is not None:
        if not ft.init_from.strip():
            c.add(
                "finetune.init_from='' is empty: set it to a checkpoint folder (or a run's checkpoints/ "
                "folder), or null to start from train.seed"
            )
        else:
            try:
                resolve_init_checkpoint(ft.init_from)
            except FinetuneError as err:
                c.add(str(err))
    if c.ok("finetune.init_from", "finetune.freeze_trunk") and ft.freeze_trunk and ft.init_from is None:
        c.add(
            "finetune.freeze_trunk=true without finetune.init_from would freeze a randomly initialised trunk: "
            "set finetune.init_from to a trained checkpoint (or finetune.freeze_trunk to false)"
        )
    if c.ok("finetune.freeze_trunk", "parallel.pp") and ft.freeze_trunk and par.pp > 1:
        c.add(
            f"finetune.freeze_trunk=true is not supported with parallel.pp={par.pp} yet: the pipeline stages "
            "before the last hold only trunk layers, so they would have nothing to train; set parallel.pp to 1 "
            "(tp, ep and data parallelism work)"
        )


def _check_distill(c: _Checker) -> None:
    """Distillation from the source checkpoint's next-token model (`finetune.distill_weight` > 0)."""
    ft, par = c.cfg.finetune, c.cfg.parallel
    if not (c.ok("finetune.distill_weight") and ft.distill_weight > 0):
        return
    if c.ok("finetune.init_from") and ft.init_from is None:
        c.add(
            f"finetune.distill_weight={ft.distill_weight} needs finetune.init_from (the teacher is the source "
            "checkpoint's next-token model): set finetune.init_from, or finetune.distill_weight to 0"
        )
    if c.ok("finetune.freeze_trunk") and not ft.freeze_trunk:
        c.add(
            f"finetune.distill_weight={ft.distill_weight} needs finetune.freeze_trunk=true (the teacher shares "
            "the trunk, which must stay the source's): set finetune.freeze_trunk to true, or "
            "finetune.distill_weight to 0"
        )
    if c.ok("parallel.tp", "parallel.pp", "parallel.ep", "parallel.sequence_parallel"):
        degrees = {"parallel.tp": par.tp, "parallel.pp": par.pp, "parallel.ep": par.ep}
        other = [f"{k}={v}" for k, v in degrees.items() if v != 1]
        other += ["parallel.sequence_parallel=true"] if par.sequence_parallel else []
        if other:
            c.add(
                f"finetune.distill_weight={ft.distill_weight} is not supported with {', '.join(other)} yet: "
                "distillation runs at parallel.tp = pp = ep = 1 without sequence parallelism (scale out with "
                "data parallelism), or set finetune.distill_weight to 0"
            )


def _check_deepspeed(c: _Checker, cuda_available: bool | None) -> None:
    """The DeepSpeed settings of `cfg.optim` that DeepSpeed 0.19.8 would reject, or that would silently not do
    what they say, given the layout and the precision (`train.precision='auto'` is bf16 where CUDA is)."""
    opt, par, ok = c.cfg.optim, c.cfg.parallel, c.ok
    if ok("optim.allgather_bucket_size") and (opt.allgather_bucket_size < 2 or opt.allgather_bucket_size % 2):
        c.add(
            f"optim.allgather_bucket_size={opt.allgather_bucket_size} must be a positive even number (DeepSpeed's "
            "ZeRO optimizer asserts a multiple of its all-gather alignment, 2): set optim.allgather_bucket_size to "
            "an even number such as 200000000"
        )
    sharded = ok("optim.zero_stage", "parallel.ep") and opt.zero_stage in (1, 2) and par.ep > 1
    if sharded and ok("optim.reduce_scatter") and not opt.reduce_scatter:
        c.add(
            f"optim.reduce_scatter=false with parallel.ep={par.ep}: DeepSpeed's ZeRO optimizer supports expert "
            "(MoE) parameter groups only with reduce-scatter (it asserts it); set optim.reduce_scatter to true"
        )
    if sharded and opt.zero_stage == 2 and ok("optim.contiguous_gradients") and not opt.contiguous_gradients:
        c.add(
            f"optim.contiguous_gradients=false with parallel.ep={par.ep} and optim.zero_stage=2: DeepSpeed's "
            "ZeRO-2 supports expert (MoE) parameter groups only with contiguous gradients (it asserts it); set "
            "optim.contiguous_gradients to true"
        )
    fp32_accum = (
        ok("optim.grad_accum_dtype", "optim.zero_stage", "parallel.pp", "train.precision")
        and opt.grad_accum_dtype == "fp32"
        and c.cfg.train.precision != "fp32"
        and (opt.zero_stage == 0 or (opt.zero_stage in (1, 2) and par.pp > 1))
    )
    if not fp32_accum:
        return
    has_cuda = _cuda_available() if cuda_available is None else cuda_available
    if c.cfg.train.precision == "auto" and not has_cuda:
        return  # auto is fp32 on a CPU, where the setting has nothing to do
    if opt.zero_stage == 0:
        c.add(
            "optim.grad_accum_dtype='fp32' in a bf16 run needs optim.zero_stage 1 or 2: without ZeRO, DeepSpeed "
            "accumulates bf16 gradients only in bf16 (it raises 'unsupported mix of model_dtype and "
            "grad_accum_dtype'); set optim.zero_stage to 1 or 2, or optim.grad_accum_dtype to 'auto' or 'bf16'"
        )
    else:
        c.add(
            f"optim.grad_accum_dtype='fp32' in a bf16 run is not supported with parallel.pp={par.pp}: Megatron's "
            "pipeline schedule accumulates the micro-batches' gradients in the parameters' bf16 .grad before "
            "DeepSpeed reduces them once (DeepSpeed cannot coalesce that reduction for its fp32-accumulating "
            "BF16_Optimizer of ZeRO-1, and under ZeRO-2 the setting would change nothing); set "
            "optim.grad_accum_dtype to 'auto' or 'bf16'"
        )


def _check_tracking(c: _Checker) -> None:
    tracking = c.cfg.tracking
    for name in ("system_metrics_interval_s", "retry_every_s"):
        if c.ok(f"tracking.{name}") and not c.get(f"tracking.{name}") > 0:
            c.add(f"tracking.{name}={c.get(f'tracking.{name}')} must be > 0: e.g. 10")
    if c.ok("tracking.flush_timeout_s") and not tracking.flush_timeout_s >= 0:
        c.add(f"tracking.flush_timeout_s={tracking.flush_timeout_s} must be >= 0 (0: do not wait at the end)")
    if c.ok("tracking.uri") and tracking.uri is not None and not tracking.uri.strip():
        c.add(
            "tracking.uri='' is empty: set it to a tracking URI such as http://127.0.0.1:5000, or null for "
            "the run directory's sqlite file (tracking.enabled=false turns tracking off)"
        )


def _check_world(c: _Checker, world_size: Any) -> None:
    """The launch: `world_size` processes against the degrees and batch sizes (see `Layout.problems`)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        c.add(f"world_size={world_size!r} must be a positive integer (the number of processes)")
    elif c.positive("parallel.tp", "parallel.pp"):
        par, train = c.cfg.parallel, c.cfg.train
        batches = c.positive("train.global_batch_size", "train.micro_batch_size")
        layout = Layout(
            world_size,
            par.tp,
            par.pp,
            par.ep if c.positive("parallel.ep") else None,
            train.global_batch_size if batches else None,
            train.micro_batch_size if batches else None,
        )
        c.problems += layout.problems()
        if not layout.problems() and c.positive("train.eval_batches") and train.eval_batches < layout.dp:
            c.add(
                f"train.eval_batches={train.eval_batches} is fewer than the data-parallel size dp = {layout.dp}: "
                f"each rank evaluates whole micro-batches, so set train.eval_batches to at least {layout.dp} "
                "(a multiple of dp uses them all)"
            )


def validate_config(
    cfg: Config, world_size: int | None = None, *, cuda_available: bool | None = None
) -> None:
    """Check ``cfg`` (and, if given, its fit to ``world_size`` processes); raise all problems at once.

    Types and ``Literal`` choices are checked too, so values assigned in Python are covered.
    ``cuda_available`` overrides the CUDA probe that resolves ``train.precision='auto'`` (bf16 on a GPU) for
    the checks of bf16-only settings, e.g. when a login node without a GPU validates a config for a GPU job.
    Raises :class:`ConfigError`.
    """
    c = _Checker(cfg)
    _collect_type_problems(cfg, Config, "", c.problems, c.bad)
    _check_minimums(c)
    _check_model(c)
    _check_optim(c)
    _check_train_and_data(c)
    _check_parallel_shapes(c)
    _check_parallel_support(c)
    _check_finetune(c)
    _check_distill(c)
    _check_deepspeed(c, cuda_available)
    _check_tracking(c)
    if world_size is not None:
        _check_world(c, world_size)
    if c.problems:
        raise ConfigError(c.problems)
