"""The Python side of bench/gpu_check.sh: the machine's description, and the summary of every step's results.

    python bench/gpu_check.py probe FILE.json          # interpreter, torch, CUDA, GPU, package versions
    python bench/gpu_check.py collect WORK OUT         # WORK's step records and results -> OUT/gpu_check.json

`collect` reads what the steps left in WORK (steps.tsv: name, exit status, wall seconds per step; the runs'
metrics.jsonl and logs; the test report) and in OUT (the benchmarks' JSON files), and writes one JSON file.
A part whose step did not run or failed is recorded as missing, never guessed.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PACKAGES = (
    "torch",
    "megatron-core",
    "deepspeed",
    "webdataset",
    "pydantic",
    "sentencepiece",
    "numpy",
    "triton",
)
RESUME_REL_TOL = 1e-3
"""Resumed vs uninterrupted losses: bf16 steps on a GPU may differ in the last bits (non-deterministic
kernels), not more."""


def probe() -> dict[str, Any]:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": versions,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {
            "gpu": props.name,
            "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
    return env


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steps(work: Path) -> list[dict]:
    out = []
    path = work / "steps.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, wall = line.split("\t")
        out.append({"name": name, "rc": None if rc == "skipped" else int(rc), "wall_s": float(wall)})
    return out


def tests(report: Path) -> dict | None:
    """Counts and the failing tests of a pytest JUnit report."""
    if not report.exists():
        return None
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed, skipped = [], []
    for case in suite.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            skipped.append(f"{name}: {case.find('skipped').get('message')}")
    total = int(suite.get("tests", 0))
    return {
        "total": total,
        "passed": total - len(failed) - len(skipped),
        "failed": failed,
        "skipped": skipped,
        "seconds": float(suite.get("time", 0.0)),
    }


def training(run: Path, log: Path) -> dict | None:
    """Throughput, MFU and memory of a training run: per logged interval, and their mean over the intervals
    after the first (which holds the warm-up: allocator, cuBLAS and kernel selection)."""
    rows = [r for r in _rows(run) if "loss" in r]
    if not rows:
        return None
    keys = (
        "step",
        "loss",
        "joint_loss",
        "ntp_loss",
        "grad_norm",
        "tokens_per_s",
        "mfu",
        "hfu",
        "max_memory_gb",
    )
    steady = rows[1:] or rows

    def mean(key: str) -> float | None:
        values = [r.get(key) for r in steady]
        return None if None in values else sum(values) / len(values)

    text = log.read_text(errors="replace") if log.exists() else ""
    params = re.search(r"model: ([\d.]+)M parameters", text)
    ckpt = re.search(r"checkpoint step_\d+: ([\d.]+) s", text)
    evals = [r for r in _rows(run) if "eval_joint_loss" in r]
    return {
        "parameters_m": float(params.group(1)) if params else None,
        "steps": rows[-1]["step"],
        "tokens_per_s": mean("tokens_per_s"),
        "mfu": mean("mfu"),
        "hfu": mean("hfu"),
        "max_memory_gb": max((r.get("max_memory_gb") or 0.0) for r in rows) or None,
        "loss_first_logged": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "eval": evals[-1] if evals else None,
        "checkpoint_save_s": float(ckpt.group(1)) if ckpt else None,
        "intervals": [{k: r.get(k) for k in keys} for r in rows],
    }


def resume(first: Path, resumed: Path) -> dict | None:
    """The resumed run's steps against the same steps of the uninterrupted one: losses, gradient norms, the
    held-out loss at the end and the final weights."""
    a = {r["step"]: r for r in _rows(first) if "loss" in r}
    b = {r["step"]: r for r in _rows(resumed) if "loss" in r}
    common = sorted(set(a) & set(b))
    if not common:
        return None
    out: dict[str, Any] = {"steps_compared": common}
    for key in ("loss", "grad_norm"):
        diffs = [abs(a[s][key] - b[s][key]) for s in common]
        out[f"{key}_max_abs_diff"] = max(diffs)
        out[f"{key}_max_rel_diff"] = max(
            d / max(abs(a[s][key]), 1e-12) for d, s in zip(diffs, common, strict=True)
        )
    ea = [r for r in _rows(first) if "eval_joint_loss" in r]
    eb = [r for r in _rows(resumed) if "eval_joint_loss" in r]
    if ea and eb:
        out["eval_joint_loss"] = [ea[-1]["eval_joint_loss"], eb[-1]["eval_joint_loss"]]
    try:
        from cpmtp_dist.checkpoint_paths import latest_checkpoint
        from cpmtp_dist.training.checkpoint import read_model_state

        wa = read_model_state(latest_checkpoint(first / "checkpoints"))
        wb = read_model_state(latest_checkpoint(resumed / "checkpoints"))
        out["weights_max_abs_diff"] = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    except Exception as err:  # the comparison of losses stands without it
        out["weights_error"] = f"{type(err).__name__}: {err}"
    out["identical"] = out["loss_max_abs_diff"] == 0 and out.get("weights_max_abs_diff") == 0
    out["ok"] = out["loss_max_rel_diff"] <= RESUME_REL_TOL
    return out


def collect(work: Path, out: Path) -> dict:
    result = {
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dry_run": (work / "DRY_RUN").exists(),
        "env": _read_json(work / "env.json"),
        "steps": steps(work),
        "tests": tests(work / "pytest.xml"),
        "train_1b": training(work / "runs" / "train_1b", work / "logs" / "train_1b.log"),
        "resume": resume(work / "runs" / "resume_a", work / "runs" / "resume_b"),
        "decode": _read_json(out / "bench_decode_cuda.json"),
        "cp_loss": _read_json(out / "cp_loss_cuda.json"),
    }
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def brief(result: dict) -> dict:
    """The summary printed at the end of the check: the numbers without the per-row detail."""
    out = {k: v for k, v in result.items() if k not in ("cp_loss", "decode", "env")}
    if out["train_1b"]:
        out["train_1b"] = {k: v for k, v in out["train_1b"].items() if k != "intervals"}
    if result["decode"]:
        keys = ("dtype", "ar_tokens_per_s", "speculative_tokens_per_s", "tokens_per_forward", "speedup")
        out["decode"] = {k: result["decode"].get(k) for k in (*keys, "greedy_first_divergence")}
    rows = result["cp_loss"]
    rows = rows.get("rows", []) if isinstance(rows, dict) else rows or []
    keys = ("impl", "nr", "time_s_median", "peak_mib", "skipped", "error")
    out["cp_loss"] = [{k: row[k] for k in keys if row.get(k) is not None} for row in rows] or None
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["probe"] and len(argv) == 2:
        env = probe()
        Path(argv[1]).write_text(json.dumps(env, indent=2) + "\n")
        print(json.dumps(env, indent=2))
        return 0
    if argv[:1] == ["collect"] and len(argv) == 3:
        result = collect(Path(argv[1]), Path(argv[2]))
        print(json.dumps(brief(result), indent=2))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
