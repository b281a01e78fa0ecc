"""Benchmark of the naive vs the chunked CP loss: wall time and peak memory of forward + backward.

    python bench/cp_loss.py --out bench/results/cp_loss_cpu.json --markdown docs/BENCHMARKS.md
    python bench/cp_loss.py --device cuda --dtype bf16 --out bench/results/cp_loss_cuda.json
    python bench/cp_loss.py --quick --out /tmp/cp_loss.json          # smoke test
    python bench/cp_loss.py --scaling --threads 1 --out bench/results/cp_loss_scaling_cpu.json \
        --markdown docs/BENCHMARKS.md                                  # chunked loss: cost per factor

`--scaling` measures the chunked loss alone for each parameterisation (`shared` + residual phi,
`shared` + linear phi, `separate`) at d = 1024, V = 8192, 2048 tokens, n*r in {1, 4, 16, 32}: time per
factor (CPU seconds of the process / n*r) and peak memory above the parameters.

Setting: `shared` parameterisation with the residual phi, one shared unembedding U (V, d) that receives
gradient, h (N, d) that receives gradient, all N * n targets present. Each n*r is realised by a fixed
(n, r) pair that exercises the mixture (see `NR_PAIRS`).

Every (impl, n*r) case runs in a fresh subprocess (this script re-invoked with the hidden `--case`
flag) so that peak memory is per case:
  - CPU: RSS after building inputs and parameters (baseline) and the process's peak RSS
    (`ru_maxrss`) after one warm-up and `--repeats` measured forward + backward passes; the table
    shows peak - baseline.
  - CUDA: `torch.cuda.max_memory_allocated` over the same passes minus the memory allocated at the
    baseline.
The naive loss materialises N * r * n * V fp32 log-probabilities plus autograd buffers; its memory is
estimated beforehand (`NAIVE_BYTES_FACTOR` * 4 bytes * N * n*r * V) and cases over `--max-naive-gib`
are recorded as skipped, never run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helpers (report.py)
from report import write_section  # noqa: E402

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# n*r -> (n, r): a mix of horizon and rank so that every case but n*r = 1 runs a real mixture.
NR_PAIRS: dict[int, tuple[int, int]] = {1: (1, 1), 2: (2, 1), 4: (2, 2), 8: (4, 2), 16: (4, 4), 32: (4, 8)}
NAIVE_BYTES_FACTOR = 4.0
"""Live (N, r, n, V) fp32 tensors at the naive loss's peak: stacked logits, log-probs, their gradient, ..."""
BEGIN, END = "<!-- cp_loss:begin -->", "<!-- cp_loss:end -->"
CASE_PREFIX = "CASE_RESULT "
MIB = 2.0**20
GIB = 2.0**30

FULL = {"tokens": 2048, "vocab": 32000, "hidden": 512, "nr": "1,4,16,32", "repeats": 3}
QUICK = {"tokens": 512, "vocab": 4000, "hidden": 128, "nr": "1,4", "repeats": 1}
SCALING = {"tokens": 2048, "vocab": 8192, "hidden": 1024, "nr": "1,4,16,32", "repeats": 2}
KINDS = {
    "residual": ("shared", "residual"),
    "linear": ("shared", "linear"),
    "separate": ("separate", "residual"),
}
"""--scaling's parameterisations: name -> (model.cp.parameterisation, model.cp.phi)."""
SCALE_BEGIN, SCALE_END = "<!-- cp_loss_scaling:begin -->", "<!-- cp_loss_scaling:end -->"
PER_FACTOR_TARGET = 1.15
"""Time per factor at the largest n*r over that at n*r = 1, at most (every parameterisation)."""
SEPARATE_MEMORY_TARGET = (2.0, 8)
"""`separate` at the largest n*r: peak above the parameters <= 2 x their size + 8 x one chunk of fp32 logits."""


# --------------------------------------------------------------------------------------------------
# helpers


def nr_pair(nr: int) -> tuple[int, int]:
    """(n, r) for a given n*r: the table above, else the largest power-of-two r <= sqrt(n*r) dividing it."""
    if nr in NR_PAIRS:
        return NR_PAIRS[nr]
    r = 1
    while (2 * r) * (2 * r) <= nr and nr % (2 * r) == 0:
        r *= 2
    return nr // r, r


def naive_estimate_gib(tokens: int, nr: int, vocab: int) -> float:
    return NAIVE_BYTES_FACTOR * 4 * tokens * nr * vocab / GIB


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


# --------------------------------------------------------------------------------------------------
# one case, inside a fresh process


def run_case(args: argparse.Namespace) -> dict:
    import torch

    from cpmtp_dist.config import CPHeadConfig
    from cpmtp_dist.model.cp_head import CPHead
    from cpmtp_dist.model.cp_loss import chunked_cp_loss, naive_cp_loss

    impl, nr, kind = (args.case.split(":") + ["residual"])[:3]
    nr = int(nr)
    n, r = nr_pair(nr)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    parameterisation, phi = KINDS[kind]
    cfg = CPHeadConfig(horizon=n, rank=r, parameterisation=parameterisation, phi=phi)
    chunk_tokens = args.chunk_tokens or cfg.chunk_tokens
    head = CPHead(args.hidden, args.vocab, cfg, params_dtype=dtype).to(device)
    if parameterisation == "shared" and phi == "residual":
        with torch.no_grad():  # make the residual branch non-trivial (W2 is zero-initialised)
            head.phi_w2.normal_(0.0, 0.02)
    unembed = torch.nn.Parameter(torch.randn(args.vocab, args.hidden, device=device, dtype=dtype) * 0.02)
    h = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype).requires_grad_(True)
    targets = torch.randint(0, args.vocab, (args.tokens, n), device=device)
    trained = [*head.parameters()] + ([unembed] if parameterisation == "shared" else [])
    param_bytes = sum(p.numel() * p.element_size() for p in trained)
    params = [*trained, h]

    def step() -> tuple[float, float, float]:
        for p in params:
            p.grad = None
        if cuda:
            torch.cuda.synchronize()
        c0 = time.process_time()
        t0 = time.perf_counter()
        if impl == "naive":
            out = naive_cp_loss(head, h, targets, unembed)
        else:
            out = chunked_cp_loss(head, h, targets, unembed, chunk_tokens=chunk_tokens)
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        out.loss_sum.backward()
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        cpu = time.process_time() - c0
        del out
        return t2 - t0, t1 - t0, cpu

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = current_rss_bytes()

    warmup_s = step()[0]  # warm-up (counted in the peak: it is one more identical pass)
    times, fwd_times, cpu_times = [], [], []
    for _ in range(args.repeats):
        total, fwd, cpu = step()
        times.append(total)
        fwd_times.append(fwd)
        cpu_times.append(cpu)

    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_rss_bytes()
    return base_row(args, impl, nr, kind) | {
        "param_mib": param_bytes / MIB,
        "chunk_tokens": chunk_tokens if impl == "chunked" else None,
        "time_s_median": statistics.median(times),
        "times_s": times,
        "warmup_s": warmup_s,
        "fwd_s_median": statistics.median(fwd_times),
        # CPU seconds of all threads: less sensitive than wall time to other processes on a shared machine.
        "cpu_s_median": statistics.median(cpu_times),
        "loadavg_1min": os.getloadavg()[0],
        "peak_mib": (peak - baseline) / MIB,
        "baseline_mib": baseline / MIB,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------
# the driver


def base_row(args: argparse.Namespace, impl: str, nr: int, kind: str = "residual") -> dict:
    n, r = nr_pair(nr)
    return {
        "impl": impl,
        "kind": kind,
        "n": n,
        "r": r,
        "nr": nr,
        "tokens": args.tokens,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "device": args.device,
        "dtype": args.dtype,
        "time_s_median": None,
        "times_s": [],
        "peak_mib": None,
    }


def spawn_case(args: argparse.Namespace, impl: str, nr: int, kind: str = "residual") -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--case",
        f"{impl}:{nr}:{kind}",
        *("--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden)),
        *("--repeats", str(args.repeats), "--device", args.device, "--dtype", args.dtype),
        *("--chunk-tokens", str(args.chunk_tokens or 0), "--threads", str(args.threads or 0)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(CASE_PREFIX):
            return json.loads(line[len(CASE_PREFIX) :])
    row = base_row(args, impl, nr, kind)
    tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
    row["error"] = f"case process exited with {proc.returncode}: {tail}"
    return row


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    import torch

    by = {(row["impl"], row["nr"]): row for row in rows}
    nrs = sorted({row["nr"] for row in rows})

    def ok(row: dict | None) -> bool:
        return row is not None and not row.get("skipped") and not row.get("error")

    def why(row: dict | None) -> str:
        if row is None:
            return "—"
        if row.get("skipped"):
            return f"skipped ({row['skipped']})"
        return f"error ({row['error']})" if row.get("error") else ""

    base = by.get(("chunked", 1))
    base_peak = base["peak_mib"] if ok(base) else None
    chunk = next((r["chunk_tokens"] for r in rows if r["impl"] == "chunked" and ok(r)), None)
    lines = [
        "## CP loss: naive vs chunked (forward + backward)",
        "",
        f"N = {args.tokens} tokens, V = {args.vocab}, d = {args.hidden}, `shared` + residual phi, "
        f"{args.device} {args.dtype}, chunk_tokens = {chunk}; times are medians of {args.repeats} runs "
        "after one warm-up; peak = peak memory over the runs minus the memory after building inputs and "
        "parameters ("
        + ("`max_memory_allocated`" if args.device == "cuda" else "RSS, one process per case")
        + ").",
        "",
        "| n·r | (n, r) | naive time (s) | chunked time (s) | chunked / naive time | naive peak (MiB) "
        "| chunked peak (MiB) | chunked peak / chunked peak at n·r=1 |",
        "|---:|:---:|---:|---:|---:|---:|---:|---:|",
    ]
    for nr in nrs:
        nv, ch = by.get(("naive", nr)), by.get(("chunked", nr))
        n, r = nr_pair(nr)
        nt = fmt(nv["time_s_median"], ".3f") if ok(nv) else why(nv)
        npk = fmt(nv["peak_mib"], ".0f") if ok(nv) else "—"
        ct = fmt(ch["time_s_median"], ".3f") if ok(ch) else why(ch)
        cpk = fmt(ch["peak_mib"], ".0f") if ok(ch) else "—"
        ratio = fmt(ch["time_s_median"] / nv["time_s_median"], ".2f") if ok(nv) and ok(ch) else "—"
        rel = fmt(ch["peak_mib"] / base_peak, ".2f") if ok(ch) and base_peak else "—"
        lines.append(f"| {nr} | ({n}, {r}) | {nt} | {ct} | {ratio} | {npk} | {cpk} | {rel} |")

    # targets
    top = by.get(("chunked", max(nrs)))
    if ok(top) and base_peak and max(nrs) > 1:
        rel = top["peak_mib"] / base_peak
        mem = f"{'PASS' if rel <= 2.0 else 'FAIL'}: chunked peak at n·r={max(nrs)} is {rel:.2f}× the peak at n·r=1"
    else:
        mem = "n/a: needs chunked results at n·r=1 and a larger n·r"
    ratios = [
        (nr, by[("chunked", nr)]["time_s_median"] / by[("naive", nr)]["time_s_median"])
        for nr in nrs
        if ok(by.get(("naive", nr))) and ok(by.get(("chunked", nr)))
    ]
    if ratios:
        worst = max(q for _, q in ratios)
        listed = ", ".join(f"{q:.2f}× at n·r={nr}" for nr, q in ratios)
        speed = f"{'PASS' if worst <= 1.5 else 'FAIL'}: chunked / naive time {listed}"
    else:
        speed = "n/a: the naive loss ran at no n·r"
    nproc = os.cpu_count()
    loads = [row["loadavg_1min"] for row in rows if row.get("loadavg_1min") is not None]
    load = f", 1-min load average {min(loads):.1f}–{max(loads):.1f} at the end of the cases" if loads else ""
    gpu = ""
    if args.device == "cuda" and torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    lines += [
        "",
        f"Command: `{command}`",
        "",
        f"Machine: nproc = {nproc}, {platform.machine()} {platform.system()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), device {args.device}{gpu}{load}.",
        "",
        "Targets:",
        f"- (a) chunked peak memory at n·r={max(nrs)} within 2× of n·r=1 — {mem}.",
        f"- (b) chunked time ≤ 1.5× naive wherever the naive loss ran — {speed}.",
    ]
    return "\n".join(lines) + "\n"


def scaling_markdown(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    """The --scaling table: per parameterisation and n*r, time per factor and peak memory above the parameters."""
    import torch

    def ok(row: dict | None) -> bool:
        return row is not None and not row.get("error")

    by = {(row["kind"], row["nr"]): row for row in rows}
    kinds = [k for k in KINDS if any(row["kind"] == k for row in rows)]
    nrs = sorted({row["nr"] for row in rows})
    chunk = next((row["chunk_tokens"] for row in rows if ok(row)), None)
    logits_mib = 4 * min(chunk or args.tokens, args.tokens) * args.vocab / MIB
    lines = [
        "## CP loss: the chunked loss's cost per factor (forward + backward)",
        "",
        f"N = {args.tokens} tokens, V = {args.vocab}, d = {args.hidden}, {args.device} {args.dtype}, "
        f"chunk_tokens = {chunk}, {args.threads or 'default'} intra-op thread(s); h, the head and (for `shared`) "
        "the unembedding receive gradient. Time per factor = CPU seconds of the process per forward + backward "
        f"(median of {args.repeats} after one warm-up) / n·r. Peak above parameters = peak RSS minus the RSS "
        "after building inputs and parameters (one process per case). One chunk of fp32 logits is "
        f"{logits_mib:.0f} MiB.",
        "",
        "| parameterisation | n·r | (n, r) | time (s) | time per factor (s) | per factor / per factor at n·r=1 "
        "| trained head parameters (MiB) | peak above parameters (MiB) |",
        "|:---|---:|:---:|---:|---:|---:|---:|---:|",
    ]
    targets = []
    for kind in kinds:
        base = by.get((kind, 1))
        base_pf = base["cpu_s_median"] if ok(base) else None  # n·r = 1: one factor
        for nr in nrs:
            row = by.get((kind, nr))
            if not ok(row):
                lines.append(f"| {kind} | {nr} | — | {row['error'] if row else '—'} | — | — | — | — |")
                continue
            pf = row["cpu_s_median"] / nr
            rel = fmt(pf / base_pf, ".2f") if base_pf else "—"
            lines.append(
                f"| {kind} | {nr} | ({row['n']}, {row['r']}) | {row['cpu_s_median']:.2f} | {pf:.3f} | {rel} "
                f"| {row['param_mib']:.0f} | {row['peak_mib']:.0f} |"
            )
        top = by.get((kind, max(nrs)))
        if base_pf and ok(top) and max(nrs) > 1:
            q = top["cpu_s_median"] / max(nrs) / base_pf
            verdict = "PASS" if q <= PER_FACTOR_TARGET else "FAIL"
            targets.append(
                f"- {kind}: time per factor at n·r={max(nrs)} ≤ {PER_FACTOR_TARGET}× n·r=1 — {verdict}: {q:.2f}×."
            )
        if kind == "separate" and ok(top):
            times, chunks = SEPARATE_MEMORY_TARGET
            bound = times * top["param_mib"] + chunks * logits_mib
            verdict = "PASS" if top["peak_mib"] <= bound else "FAIL"
            targets.append(
                f"- separate: peak above parameters at n·r={max(nrs)} ≤ {times:g} × parameters + {chunks} chunks "
                f"of logits = {bound:.0f} MiB — {verdict}: {top['peak_mib']:.0f} MiB "
                f"({top['peak_mib'] / top['param_mib']:.2f} × parameters)."
            )
    loads = [row["loadavg_1min"] for row in rows if row.get("loadavg_1min") is not None]
    load = f", 1-min load average {min(loads):.1f}–{max(loads):.1f} at the end of the cases" if loads else ""
    lines += [
        "",
        f"Command: `{command}`",
        "",
        f"Machine: nproc = {os.cpu_count()}, {platform.machine()} {platform.system()}, torch {torch.__version__}, "
        f"device {args.device}{load}.",
        "",
        "Targets:",
        *targets,
    ]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, section: str, scaling: bool = False) -> None:
    """Put `section` between this benchmark's markers (those of --scaling's table) in `path`."""
    write_section(path, *((SCALE_BEGIN, SCALE_END) if scaling else (BEGIN, END)), section)


def run_cases(args: argparse.Namespace, cases: list[tuple[str, int, str]]) -> list[dict]:
    """Each (impl, n*r, parameterisation) in its own process; rows written to --out after each case."""
    rows: list[dict] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for impl, nr, kind in cases:
        est = naive_estimate_gib(args.tokens, nr, args.vocab)
        if impl == "naive" and est > args.max_naive_gib:
            row = base_row(args, impl, nr, kind)
            row["skipped"] = f"estimated {est:.3g} GiB > budget {args.max_naive_gib:g} GiB"
        else:
            t0 = time.perf_counter()
            row = spawn_case(args, impl, nr, kind)
            row["case_wall_s"] = time.perf_counter() - t0
        rows.append(row)
        status = (
            row.get("skipped")
            or row.get("error")
            or (f"{row['time_s_median']:.3f} s, peak {row['peak_mib']:.0f} MiB")
        )
        print(f"  {impl:8s} {kind:9s} n*r={nr:<3d} (n={row['n']}, r={row['r']}): {status}", flush=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")  # partial results survive a crash
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="JSON file for the rows (required unless --case)")
    p.add_argument("--tokens", type=int, help=f"N positions (default {FULL['tokens']})")
    p.add_argument("--vocab", type=int, help=f"V (default {FULL['vocab']})")
    p.add_argument("--hidden", type=int, help=f"d (default {FULL['hidden']})")
    p.add_argument("--nr", help=f"comma-separated n*r values (default {FULL['nr']})")
    p.add_argument("--repeats", type=int, help=f"measured runs per case (default {FULL['repeats']})")
    p.add_argument(
        "--chunk-tokens", type=int, default=0, help="chunked loss rows per chunk (0: config default)"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads per case (0: torch's default)"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16"], default=None, help="fp32 on cpu, bf16 on cuda by default"
    )
    p.add_argument("--max-naive-gib", type=float, default=12.0, help="skip naive cases estimated above this")
    p.add_argument("--impls", default="naive,chunked", help=argparse.SUPPRESS)
    p.add_argument("--markdown", type=Path, help="write the table between cp_loss markers in this file")
    p.add_argument("--quick", action="store_true", help="small smoke-test sizes: " + json.dumps(QUICK))
    p.add_argument(
        "--scaling", action="store_true", help="the chunked loss per parameterisation: " + json.dumps(SCALING)
    )
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else SCALING if args.scaling else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"

    if args.case:
        row = run_case(args)
        print(CASE_PREFIX + json.dumps(row), flush=True)
        return 0
    if args.out is None:
        p.error("--out is required")

    command = "python bench/cp_loss.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    nrs = [int(x) for x in args.nr.split(",")]
    print(
        f"(n, r) per n*r: {', '.join(f'{nr}=({nr_pair(nr)[0]}, {nr_pair(nr)[1]})' for nr in nrs)}", flush=True
    )
    if args.scaling:
        rows = run_cases(args, [("chunked", nr, kind) for kind in KINDS for nr in nrs])
        section = scaling_markdown(rows, args, command)
    else:
        rows = run_cases(args, [(impl, nr, "residual") for nr in nrs for impl in args.impls.split(",")])
        section = markdown(rows, args, command)
    print()
    print(section)
    if args.markdown:
        write_markdown(args.markdown, section, scaling=args.scaling)
    return 0


if __name__ == "__main__":
    sys.exit(main())
