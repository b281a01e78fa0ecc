"""`cpmtp`: the command line. Each subcommand parses its arguments, builds, runs.

cpmtp train --config configs/tiny.yaml [--run-dir DIR] [--resume auto|CHECKPOINT] [--nproc-per-node N]
            [--tracking-uri URI|none] [--experiment NAME] [key=value ...]
cpmtp generate --checkpoint DIR --prompt TEXT|--prompt-file F [--max-new-tokens N] [--mode ar|speculative|tree]
               [--branches K] [--greedy | --temperature T --top-k K --top-p P] [--seed S]
cpmtp eval --checkpoint DIR [--data DIR] --out FILE.json [--batches B] [--prompts K] [--new-tokens N]
cpmtp bench decode --checkpoint DIR --out FILE.json [--prompts K | --prompt-file F...] [--max-new-tokens N]
                   [--mode speculative|tree] [--branches K]
cpmtp status RUN_DIR
cpmtp plan --config FILE --nodes N --gpus-per-node G [--gpu-memory-gib M] [--top K] [key=value ...]
cpmtp submit --nodes N [--gpus-per-node G | --tasks-per-node K] --time T [--partition P] --config FILE
             [--run-dir DIR] [key=value ...] [-- more `cpmtp train` arguments]
cpmtp convert from-hf --model HF_DIR --out DIR [--tokenizer DIR] [--horizon n --rank r ...] [--fresh-head]
cpmtp convert to-hf --checkpoint DIR --out HF_DIR [--max-shard-gb G]
cpmtp data tokenizer --input PATH... --vocab-size N --out DIR [--model-type bpe|unigram]
cpmtp data shards --input PATH... --tokenizer DIR --seq-len L --out DIR [--shard-size-mb M] [--workers W]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from cpmtp_dist.errors import UserError
from launchers.train_cmd import add_train_arguments, parse_anywhere, run_train


def _status(args: argparse.Namespace) -> int:
    from cpmtp_dist.run_status import run_status

    print("\n".join(run_status(Path(args.run_dir))))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from launchers.plan_cmd import run_plan

    return run_plan(args)


def _submit(args: argparse.Namespace) -> int:
    from launchers.submit import submit

    return submit(args)


def _sampling(args: argparse.Namespace):
    """Greedy unless a sampling setting is given; --greedy with one is a contradiction."""
    from cpmtp_dist.inference.sampling import Sampling

    given = {
        "--temperature": args.temperature,
        "--top-k": args.top_k,
        "--top-p": args.top_p,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if args.greedy and given:
        raise UserError(f"--greedy takes the argmax; drop it or {', '.join(given)}")
    if not given:
        return Sampling()
    try:
        return Sampling(
            greedy=False,
            temperature=1.0 if args.temperature is None else args.temperature,
            top_k=args.top_k or 0,
            top_p=1.0 if args.top_p is None else args.top_p,
        )
    except ValueError as e:
        raise UserError(str(e)) from None


def _load(args: argparse.Namespace):
    from cpmtp_dist.inference.generate import load_for_inference, resolve_device

    try:
        return load_for_inference(Path(args.checkpoint), resolve_device(args.device))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--checkpoint {args.checkpoint}: {e}") from None


def _generate(args: argparse.Namespace) -> int:
    from cpmtp_dist.inference.decoding import Decoder

    sampling = _sampling(args)
    prompt = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    loaded = _load(args)
    tok = loaded.tokenizer
    result = Decoder(loaded.model).generate(
        tok.encode(prompt),
        args.max_new_tokens,
        mode=args.mode,
        branches=args.branches,
        sampling=sampling,
        eos_id=tok.eos_id,
        seed=args.seed,
    )
    st = result.stats
    how = "greedy" if sampling.greedy else "sampled"
    print(f"--- {how}, {args.mode} decoding from {loaded.checkpoint} ---", file=sys.stderr)
    print(prompt + tok.decode(result.tokens))
    print(
        f"--- {st.new_tokens} tokens in {st.forwards} forwards: {st.tokens_per_forward:.2f} tokens per forward, "
        f"{st.new_tokens / st.seconds:.1f} tokens/s ---",
        file=sys.stderr,
    )
    return 0


def _heldout(args: argparse.Namespace, loaded, num_batches: int):
    from cpmtp_dist.data.data_path import ShardError
    from cpmtp_dist.inference.evaluation import heldout_batches

    try:
        return heldout_batches(
            loaded.checkpoint / "config.yaml", loaded.tokenizer.fingerprint, args.data, num_batches
        )
    except (ShardError, ValueError, FileNotFoundError) as e:
        raise UserError(f"{f'--data {args.data}: ' if args.data else ''}{e}") from None


def _write_json(path: str, obj: dict) -> Path:
    import json

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(obj, indent=2) + "\n")
    return out


def _log_summary(args: argparse.Namespace, loaded, name: str, metrics: dict, out: Path) -> None:
    from cpmtp_dist.config_io import config_to_dict
    from cpmtp_dist.training.tracking import local_tracking_uri, log_summary_run

    if args.tracking_uri == "none":
        return
    run_dir = loaded.checkpoint.parent.parent
    uri = args.tracking_uri or local_tracking_uri(run_dir)
    experiment = args.experiment or loaded.config.tracking.experiment or "cpmtp"
    rid = log_summary_run(
        uri,
        experiment,
        f"{name} {run_dir.name}/{loaded.checkpoint.name}",
        params={"model": config_to_dict(loaded.config)["model"], "checkpoint": str(loaded.checkpoint)},
        metrics=metrics,
        artifacts=[out],
        tags={"cpmtp.kind": name},
    )
    print(f"MLflow: run {rid} in experiment {experiment!r} at {uri}", file=sys.stderr)


def _eval(args: argparse.Namespace) -> int:
    from cpmtp_dist.inference.evaluation import evaluate_checkpoint, flat_metrics

    loaded = _load(args)
    batches = _heldout(args, loaded, args.batches)
    result = evaluate_checkpoint(
        loaded.model,
        batches,
        prompts=args.prompts,
        new_tokens=args.new_tokens,
        eos_id=loaded.tokenizer.eos_id,
    )
    result = {"checkpoint": str(loaded.checkpoint), "data": args.data or "the checkpoint's own"} | result
    out = _write_json(args.out, result)
    h = result["heldout"]
    line = f"joint {h['joint_loss']:.4f} | ntp {h['ntp_loss']:.4f} | ppl {h['ntp_ppl']:.1f}"
    if "decoding" in result:
        g = result["decoding"]["greedy"]
        line += f" | greedy tokens/forward {g['tokens_per_forward']:.2f}"
    print(f"{line} -> {out}")
    _log_summary(args, loaded, "eval", flat_metrics(result), out)
    return 0


def _bench_decode(args: argparse.Namespace) -> int:
    from cpmtp_dist.inference.bench import bench_decode
    from cpmtp_dist.inference.decoding import Decoder
    from cpmtp_dist.inference.evaluation import heldout_prompts

    sampling = _sampling(args)
    loaded = _load(args)
    if args.prompt_file:
        prompts = [loaded.tokenizer.encode(Path(f).read_text()) for f in args.prompt_file]
    else:
        batches = _heldout(args, loaded, max(1, args.prompts))
        prompts = heldout_prompts(batches, args.prompts, loaded.config.model.trunk.seq_length // 2)
    result = bench_decode(
        Decoder(loaded.model),
        prompts,
        args.max_new_tokens,
        sampling=sampling,
        repeats=args.repeats,
        eos_id=loaded.tokenizer.eos_id,
        mode=args.mode,
        branches=args.branches,
    )
    result = {"checkpoint": str(loaded.checkpoint)} | result
    out = _write_json(args.out, result)
    print(
        f"autoregressive {result['ar_tokens_per_s']:.1f} tokens/s | {args.mode} "
        f"{result['speculative_tokens_per_s']:.1f} tokens/s | {result['tokens_per_forward']:.2f} tokens per "
        f"forward | speed-up {result['speedup']:.2f}x -> {out}"
    )
    _log_summary(args, loaded, "bench-decode", {k: v for k, v in result.items() if k != "sampling"}, out)
    return 0


def _data_tokenizer(args: argparse.Namespace) -> int:
    import logging

    from data_pipelines.tokenizer import build_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
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
    for key, names in zip(manifest["inputs"], manifest.get("document_names", []), strict=False):
        print(f"input {key}: documents named {names}")
    print(f"done: {Path(args.out) / 'manifest.json'}")
    return 0


def _convert_from_hf(args: argparse.Namespace) -> int:
    from cpmtp_dist.interop.hf import ConversionError, import_hf

    cp = {
        "horizon": args.horizon,
        "rank": args.rank,
        "parameterisation": args.parameterisation,
        "phi": args.phi,
        "phi_hidden_size": args.phi_hidden_size,
    }
    try:
        folder = import_hf(
            Path(args.model),
            Path(args.out),
            cp,
            fresh_head=args.fresh_head,
            tokenizer_dir=Path(args.tokenizer) if args.tokenizer else None,
            seed=args.seed,
        )
    except (ConversionError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done: {folder}")
    if not (folder / "tokenizer").is_dir():
        own = (Path(args.model) / "tokenizer.model").is_file()
        why = f"{args.model}'s tokenizer.model (SentencePiece) is not converted; " if own else ""
        print(
            f"note: the checkpoint holds no tokenizer ({why}`cpmtp generate` and `eval` need one): convert again "
            "with --tokenizer DIR, a `cpmtp data tokenizer` folder whose ids are the model's. "
            "finetune.init_from does not need it.",
            file=sys.stderr,
        )
    return 0


def _convert_to_hf(args: argparse.Namespace) -> int:
    from cpmtp_dist.interop.hf import ConversionError, export_hf

    try:
        files = export_hf(Path(args.checkpoint), Path(args.out), int(args.max_shard_gb * 2**30))
    except (ConversionError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done: {args.out}: {', '.join(files)}")
    return 0


def _convert_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("convert", help="Hugging Face Llama folders to and from checkpoints (the hf extra)")
    cs = c.add_subparsers(dest="convert_command", required=True)
    f = cs.add_parser("from-hf", help="a LlamaForCausalLM folder (config.json + safetensors) to a checkpoint")
    f.add_argument(
        "--model", required=True, help="the folder (save_pretrained's: config.json, *.safetensors)"
    )
    f.add_argument("--out", required=True, help="new folder; the checkpoint is OUT/step_0000000 (OUT/latest)")
    f.add_argument(
        "--tokenizer",
        help="a cpmtp tokenizer folder (`cpmtp data tokenizer`) whose ids are the model's (default: the folder's "
        "cpmtp_tokenizer/, else its Hugging Face tokenizer.json)",
    )
    f.add_argument("--horizon", type=int, help="n of the fresh CP head (default 4)")
    f.add_argument("--rank", type=int, help="r of the fresh CP head (default 4)")
    f.add_argument("--parameterisation", choices=["shared", "separate"], help="default shared")
    f.add_argument("--phi", choices=["residual", "linear"], help="default residual")
    f.add_argument("--phi-hidden-size", type=int, help="default: hidden_size")
    f.add_argument(
        "--fresh-head", action="store_true", help="ignore a CP head in the folder (cp_head.*); draw a new one"
    )
    f.add_argument("--seed", type=int, default=1234, help="seed of the fresh head (train.seed)")
    f.set_defaults(fn=_convert_from_hf)
    t = cs.add_parser(
        "to-hf", help="a checkpoint's trunk as a LlamaForCausalLM folder, its CP head beside it"
    )
    t.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run's checkpoints/ folder")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument(
        "--max-shard-gb",
        type=float,
        default=5.0,
        help="shard model.safetensors above this size (0: one file)",
    )
    t.set_defaults(fn=_convert_to_hf)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--greedy", action="store_true", help="argmax decoding (the default without the options below)"
    )
    p.add_argument("--temperature", type=float, help="sample at this temperature (default 1 when sampling)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample from the smallest set holding this probability")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")


def _tracking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        metavar="URI|none",
        help="MLflow tracking URI (default: the sqlite store of the checkpoint's run directory); 'none': off",
    )
    p.add_argument("--experiment", help="MLflow experiment (default: the run's)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cpmtp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    _training_parsers(sub)
    _plan_parser(sub)
    _submit_parser(sub)
    _inference_parsers(sub)
    _convert_parser(sub)
    _data_parsers(sub)
    return p


def _training_parsers(sub: argparse._SubParsersAction) -> None:
    """`cpmtp train` and `cpmtp status`."""
    t = sub.add_parser("train", help="train a CP multi-token model")
    add_train_arguments(t)
    t.set_defaults(fn=run_train)

    st = sub.add_parser(
        "status", help="a run's step, losses, speed, time to the end, newest checkpoint, health and liveness"
    )
    st.add_argument("run_dir", help="the run directory (--run-dir of cpmtp train)")
    st.set_defaults(fn=_status)


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser(
        "plan",
        help="memory per GPU, FLOPs per token and the layouts that fit a cluster, from the config alone",
    )
    pl.add_argument("--config", required=True, help="YAML config (defaults < file < overrides)")
    pl.add_argument("--nodes", type=int, required=True, help="nodes")
    pl.add_argument(
        "--gpus-per-node", type=int, required=True, help="GPUs per node (tensor parallelism stays inside one)"
    )
    pl.add_argument(
        "--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)"
    )
    pl.add_argument("--top", type=int, default=10, help="fitting layouts listed (default 10)")
    pl.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.micro_batch_size=2"
    )
    pl.set_defaults(fn=_plan)


def _submit_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "submit",
        help="train on Slurm through submitit: one task per GPU, checkpoint and requeue before the time limit",
    )
    s.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one task each (0: a CPU job)")
    s.add_argument("--tasks-per-node", type=int, help="processes per node of a CPU job (default 1)")
    s.add_argument("--cpus-per-task", type=int, help="CPUs per task")
    s.add_argument(
        "--gpu-memory-gib",
        type=float,
        help="memory of one GPU in GiB: warn when the plan's estimate exceeds it",
    )
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


def _branches_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--branches",
        type=int,
        default=2,
        help="--mode tree: children of each step's first token (top-k greedy, k draws sampled), each "
        "continued as its own chain (default 2)",
    )


def _inference_parsers(sub: argparse._SubParsersAction) -> None:
    """`cpmtp generate`, `cpmtp eval` and `cpmtp bench decode`."""
    g = sub.add_parser("generate", help="decode from a checkpoint (autoregressive or self-speculative)")
    g.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run's checkpoints/ folder")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument(
        "--mode",
        choices=["ar", "speculative", "tree"],
        default="speculative",
        help="ar: one token per forward; speculative: draft n tokens from the CP head, keep what the model "
        "itself would have produced (same output distribution; greedy: the same tokens); tree: draft "
        "--branches chains that share the first token and verify them in one forward",
    )
    _branches_arg(g)
    _sampling_args(g)
    _device_args(g)
    g.set_defaults(fn=_generate)

    e = sub.add_parser("eval", help="held-out losses, accuracies, expert usage and decoding acceptance")
    e.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run's checkpoints/ folder")
    e.add_argument("--data", help="shard folder or blend (as data.path); default: the checkpoint's own data")
    e.add_argument("--out", required=True, help="JSON file for the results")
    e.add_argument("--batches", type=int, default=16, help="held-out micro-batches (default 16)")
    e.add_argument("--prompts", type=int, default=8, help="held-out prompts decoded speculatively (0: none)")
    e.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per prompt")
    _device_args(e)
    _tracking_args(e)
    e.set_defaults(fn=_eval)

    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    bd = b.add_parser("decode", help="autoregressive vs self-speculative decoding, batch 1")
    bd.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run's checkpoints/ folder")
    bd.add_argument("--out", required=True, help="JSON file for the results")
    bd.add_argument("--data", help="held-out prompts from this shard folder (default: the checkpoint's data)")
    bd.add_argument("--prompt-file", nargs="+", help="prompt files instead of held-out prompts")
    bd.add_argument("--prompts", type=int, default=8, help="held-out prompts (default 8)")
    bd.add_argument("--max-new-tokens", type=int, default=64)
    bd.add_argument("--repeats", type=int, default=3, help="timed runs per prompt and mode (median)")
    bd.add_argument(
        "--mode",
        choices=["speculative", "tree"],
        default="speculative",
        help="the drafted mode compared with autoregressive decoding",
    )
    _branches_arg(bd)
    _sampling_args(bd)
    _device_args(bd)
    _tracking_args(bd)
    bd.set_defaults(fn=_bench_decode)


def _data_parsers(sub: argparse._SubParsersAction) -> None:
    """`cpmtp data tokenizer` and `cpmtp data shards`."""
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


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: CUDA when available, else the CPU (default); decodes in the training dtype there "
        "(train.precision; auto: bf16 on GPUs)",
    )


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
    args = parse_anywhere(build_parser(), list(sys.argv[1:] if argv is None else argv))
    if getattr(args, "device", None) == "cpu" or args.command == "convert":
        # convert is CPU work. Before torch looks for GPUs: Megatron places rotary tables and caches wherever CUDA is visible.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        return args.fn(args)
    except UserError as err:  # every command reports what the user can fix alike: no traceback, status 2
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
