"""`cpmtp`: the command line. Each subcommand parses its arguments, builds, runs.

cpmtp train --config configs/tiny.yaml [--run-dir DIR] [key=value ...]
cpmtp generate --checkpoint DIR --prompt TEXT [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from cpmtp_dist.config_io import ConfigError, load_config, validate_config

    try:
        cfg = load_config(args.config, args.overrides)
        validate_config(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir = Path(
        args.run_dir or f"runs/{Path(args.config or 'default').stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        print(
            f"error: {run_dir} already holds checkpoints; pass another --run-dir (resuming is not available yet)",
            file=sys.stderr,
        )
        return 2

    from cpmtp_dist.training.trainer import train

    result = train(cfg, run_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        ev = result.eval_metrics
        print(
            f"done: {result.final_step} steps; held-out joint loss {ev['eval_joint_loss']:.4f}, "
            f"next-token loss {ev['eval_ntp_loss']:.4f}; checkpoint {result.checkpoint}"
        )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from cpmtp_dist.inference.generate import generate_greedy, load_for_inference

    prompt = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    loaded = load_for_inference(Path(args.checkpoint))
    tok = loaded.tokenizer
    new = generate_greedy(loaded.model, tok.encode(prompt), args.max_new_tokens, eos_id=tok.eos_id)
    print(f"--- greedy sample from {loaded.checkpoint} ---")
    print(prompt + tok.decode(new))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cpmtp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a CP multi-token model")
    t.add_argument("--config", help="YAML config (defaults < file < overrides)")
    t.add_argument("--run-dir", help="run directory (default: runs/<config>-<time>)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.cp.rank=8")
    t.set_defaults(fn=_train)

    g = sub.add_parser("generate", help="decode from a checkpoint")
    g.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run's checkpoints/ folder")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.set_defaults(fn=_generate)
    return p


def quiet_known_warnings() -> None:
    """megatron-core warns at import that optional GPU libraries (Apex, TransformerEngine) are absent and
    that arguments it will require later are missing; none of it is actionable by our users."""
    warnings.filterwarnings(
        "ignore", message=r".*(Transformer Engine|TransformerEngine|Apex) .*not installed"
    )
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*(tp_group|ffn_hidden_size)")


def main(argv: list[str] | None = None) -> int:
    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
