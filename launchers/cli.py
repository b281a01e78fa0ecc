"""`cpmtp`: the command line. Each subcommand parses its arguments, builds, runs.

cpmtp train --config configs/tiny.yaml [--run-dir DIR] [--resume auto|CHECKPOINT] [--nproc-per-node N]
            [--tracking-uri URI|none] [--experiment NAME] [key=value ...]
cpmtp generate --checkpoint DIR --prompt TEXT [--max-new-tokens N]
cpmtp submit --nodes N [--gpus-per-node G | --tasks-per-node K] --time T [--partition P] --config FILE
             [--run-dir DIR] [key=value ...] [-- more `cpmtp train` arguments]
cpmtp data tokenizer --input PATH... --vocab-size N --out DIR [--model-type bpe|unigram]
cpmtp data shards --input PATH... --tokenizer DIR --seq-len L --out DIR [--shard-size-mb M] [--workers W]
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
        if args.tracking_uri is not None:  # the flags win over the file and the overrides
            if args.tracking_uri.lower() == "none":
                cfg.tracking.enabled = False
            else:
                cfg.tracking.uri = args.tracking_uri
        if args.experiment is not None:
            cfg.tracking.experiment = args.experiment
        if cfg.tracking.experiment is None:
            cfg.tracking.experiment = Path(args.config).stem if args.config else "cpmtp"
        launch = args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ
        world = args.nproc_per_node if launch else int(os.environ.get("WORLD_SIZE", "1"))
        validate_config(cfg, world_size=world)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir = Path(
        args.run_dir or f"runs/{Path(args.config or 'default').stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if launch:  # this process becomes the launcher of the ranks, which run this command again
        from launchers.local import child_argv, run_local

        return run_local(args.nproc_per_node, child_argv(args.argv, str(run_dir)))
    from cpmtp_dist.training.checkpoint import latest_checkpoint

    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    resume = None
    if args.resume == "auto":
        resume = latest_checkpoint(run_dir / "checkpoints") if (run_dir / "checkpoints").exists() else None
        if resume is None and is_rank0:
            print(f"--resume auto: no complete checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
    elif args.resume is not None:
        resume = latest_checkpoint(Path(args.resume))
        if resume is None:
            print(f"error: --resume {args.resume}: no complete checkpoint there", file=sys.stderr)
            return 2
    elif (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        print(
            f"error: {run_dir} already holds checkpoints: pass --resume auto to continue that run, or another "
            "--run-dir",
            file=sys.stderr,
        )
        return 2

    from cpmtp_dist.config_io import config_to_dict
    from cpmtp_dist.training.tracking import maybe_build_tracker

    # Started before the trainer's imports (torch, Megatron, DeepSpeed): MLflow's own imports run beside them.
    tracker = maybe_build_tracker(cfg.tracking, run_dir, enabled=is_rank0, params=config_to_dict(cfg))

    from cpmtp_dist.data.shards import ShardError
    from cpmtp_dist.training.checkpoint import ResumeError
    from cpmtp_dist.training.trainer import train

    try:
        result = train(cfg, run_dir, resume=resume, tracker=tracker)
    except (ShardError, ResumeError) as err:  # unusable data or checkpoint: the message says what to do
        if tracker is not None:
            tracker.discard()
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result.preempted:
        from cpmtp_dist.training.preemption import PREEMPTED_EXIT_CODE

        if is_rank0:
            print(f"stopped by a signal after step {result.final_step}; continue with --resume auto")
        return PREEMPTED_EXIT_CODE
    if is_rank0:
        ev = result.eval_metrics
        print(
            f"done: {result.final_step} steps; held-out joint loss {ev['eval_joint_loss']:.4f}, "
            f"next-token loss {ev['eval_ntp_loss']:.4f}; checkpoint {result.checkpoint}"
        )
    return 0


def _submit(args: argparse.Namespace) -> int:
    from launchers.submit import submit

    return submit(args)


def _generate(args: argparse.Namespace) -> int:
    from cpmtp_dist.inference.generate import generate_greedy, load_for_inference

    prompt = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    loaded = load_for_inference(Path(args.checkpoint))
    tok = loaded.tokenizer
    new = generate_greedy(loaded.model, tok.encode(prompt), args.max_new_tokens, eos_id=tok.eos_id)
    print(f"--- greedy sample from {loaded.checkpoint} ---")
    print(prompt + tok.decode(new))
    return 0


def _data_tokenizer(args: argparse.Namespace) -> int:
    from data_pipelines.tokenizer import build_tokenizer

    try:
        result = build_tokenizer(
            args.input,
            args.vocab_size,
            Path(args.out),
            model_type=args.model_type,
            max_lines=args.max_lines,
            jsonl_field=args.jsonl_field,
            seed=args.seed,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tok = result.tokenizer
    print(
        f"done: {args.model_type} tokenizer, vocabulary {tok.vocab_size} (eos {tok.eos_id}, pad {tok.pad_id}), "
        f"trained on {result.documents} documents; sha256 {tok.fingerprint[:12]}; written to {result.out_dir}"
    )
    return 0


def _data_shards(args: argparse.Namespace) -> int:
    import logging

    from data_pipelines.shards import build_shards

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        manifest = build_shards(
            args.input,
            Path(args.tokenizer),
            args.seq_len,
            Path(args.out),
            shard_size_mb=args.shard_size_mb,
            workers=args.workers,
            heldout_fraction=args.heldout_fraction,
            jsonl_field=args.jsonl_field,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: finished shards are kept; run the same command to resume {args.out}",
            file=sys.stderr,
        )
        return 130
    for split in ("train", "valid"):
        s = manifest["splits"][split]
        print(
            f"{split}: {s['sequences']} samples of {manifest['sample_tokens']} tokens in {len(s['shards'])} shards "
            f"from {s['documents']} documents ({s['dropped_tokens']} tail tokens dropped)"
        )
    print(f"done: {Path(args.out) / 'manifest.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cpmtp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a CP multi-token model")
    t.add_argument("--config", help="YAML config (defaults < file < overrides)")
    t.add_argument("--run-dir", help="run directory (default: runs/<config>-<time>)")
    t.add_argument(
        "--resume",
        metavar="auto|CHECKPOINT",
        help="continue a run: 'auto' from the newest complete checkpoint of --run-dir (none: start at step 0), "
        "or from a checkpoint folder",
    )
    t.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="run N ranks on this machine (torchrun with a standalone rendezvous); under a launcher: ignored",
    )
    t.add_argument(
        "--tracking-uri",
        metavar="URI|none",
        help="MLflow tracking URI, e.g. http://127.0.0.1:5000 (sets tracking.uri; default: a sqlite file in the "
        "run directory); 'none' turns tracking off",
    )
    t.add_argument(
        "--experiment", help="MLflow experiment (sets tracking.experiment; default: the config file's stem)"
    )
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.cp.rank=8")
    t.set_defaults(fn=_train)

    s = sub.add_parser(
        "submit",
        help="train on Slurm through submitit: one task per GPU, checkpoint and requeue before the time limit",
    )
    s.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one task each (0: a CPU job)")
    s.add_argument("--tasks-per-node", type=int, help="processes per node of a CPU job (default 1)")
    s.add_argument("--cpus-per-task", type=int, help="CPUs per task")
    s.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    s.add_argument("--time", required=True, help="time limit of each run: minutes, H:M:S or D-H:M:S")
    s.add_argument(
        "--signal-delay", type=int, default=120, help="seconds before the limit at which the run checkpoints"
    )
    s.add_argument(
        "--max-timeouts", type=int, default=20, help="requeues after a time limit before the job gives up"
    )
    s.add_argument("--job-name", help="Slurm job name (default: cpmtp-<run dir name>)")
    s.add_argument("--folder", help="submitit's folder for job files and logs (default: RUN_DIR/submitit)")
    s.add_argument("--config", help="YAML config (defaults < file < overrides)")
    s.add_argument("--run-dir", help="run directory (default: runs/<config>-<time>), kept across requeues")
    s.add_argument(
        "--resume", metavar="auto|CHECKPOINT", help="continue an earlier run; requeued runs always use 'auto'"
    )
    s.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides; after `--`, any `cpmtp train` arguments"
    )
    s.set_defaults(fn=_submit)

    g = sub.add_parser("generate", help="decode from a checkpoint")
    g.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run's checkpoints/ folder")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.set_defaults(fn=_generate)

    d = sub.add_parser("data", help="build tokenizers and training shards").add_subparsers(
        dest="data_command", required=True
    )
    inputs_help = (
        "files, folders, globs ('data/**/*.txt'), .jsonl/.jsonl.gz files (one document per line), "
        "builtin:stdlib-code or builtin:stdlib-prose"
    )
    dt = d.add_parser("tokenizer", help="train a SentencePiece tokenizer on the inputs")
    dt.add_argument("--input", nargs="+", required=True, metavar="PATH", help=inputs_help)
    dt.add_argument("--vocab-size", type=int, required=True)
    dt.add_argument("--out", required=True, help="folder for tokenizer.model and tokenizer.json")
    dt.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    dt.add_argument("--max-lines", type=int, default=200_000, help="lines sampled for training")
    dt.add_argument("--jsonl-field", default="text", help="JSON field holding the text of a .jsonl line")
    dt.add_argument("--seed", type=int, default=0, help="seed of the line sample")
    dt.set_defaults(fn=_data_tokenizer)

    ds = d.add_parser("shards", help="tokenise the inputs into webdataset shards of fixed-length samples")
    ds.add_argument("--input", nargs="+", required=True, metavar="PATH", help=inputs_help)
    ds.add_argument("--tokenizer", required=True, help="tokenizer folder (from `cpmtp data tokenizer`)")
    ds.add_argument(
        "--seq-len", type=int, required=True, help="training sequence length L (samples hold L+1)"
    )
    ds.add_argument("--out", required=True, help="output folder; re-run the same command to resume it")
    ds.add_argument("--shard-size-mb", type=float, default=64.0, help="target shard size in MiB")
    ds.add_argument("--workers", type=int, default=None, help="tokenising processes (default: min(4, cpus))")
    ds.add_argument("--heldout-fraction", type=float, default=0.01, help="share of documents in valid")
    ds.add_argument("--jsonl-field", default="text", help="JSON field holding the text of a .jsonl line")
    ds.set_defaults(fn=_data_shards)
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
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
