"""Shared by the tests that train: reading a run directory back, and small shards to train on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def metrics_by_step(run: Path) -> dict[int, dict]:
    """`metrics.jsonl` of `run` merged per step (train and eval rows); complete lines only, so a run that
    is still writing can be read."""
    out: dict[int, dict] = {}
    path = run / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    for line in text.split("\n")[:-1]:
        if line.strip():
            row = json.loads(line)
            out.setdefault(row["step"], {}).update(row)
    return out


def build_json_shards(root: Path, name: str) -> Path:
    """A 400-token tokenizer and shards of seq_len 32 of the standard library's `json` package, through the
    command line: `root/tok` and `root/<name>` (returned).

    The package's five files are named `json/<file>` wherever Python lies, so the split is the same on every
    machine: at 0.55, `json/decoder.py` and `json/scanner.py` are held out (crc32 % 10000 = 5175 and 3907),
    the other three train."""
    code = str(Path(json.__file__).parent)
    for args in (
        ["data", "tokenizer", "--input", code, "--vocab-size", "400", "--out", str(root / "tok")],
        ["data", "shards", "--input", code, "--tokenizer", str(root / "tok"), "--seq-len", "32", "--out",
         str(root / name), "--shard-size-mb", "0.02", "--heldout-fraction", "0.55"],
    ):  # fmt: skip
        res = subprocess.run(
            [sys.executable, "-m", "launchers.cli", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr[-3000:]
    splits = json.loads((root / name / "manifest.json").read_text())["splits"]
    assert splits["valid"]["documents"] == 2 and splits["train"]["documents"] == 3, splits
    return root / name


def assert_fp32_optimizer_state(state: dict[str, torch.Tensor]) -> None:
    """`state` (a bf16 run's checkpoint, `read_model_state(folder, "")`) holds bf16 weights and, beside each,
    an fp32 master weight and fp32 Adam moments that carry more than bf16 can; each weight is its master
    rounded to bf16."""
    masters = {
        k.removeprefix("optimizer.master."): v for k, v in state.items() if k.startswith("optimizer.master.")
    }
    assert masters and masters.keys() == {k.removeprefix("model.") for k in state if k.startswith("model.")}
    finer = 0
    for name, master in masters.items():
        weight = state[f"model.{name}"]
        assert (weight.dtype, master.dtype) == (torch.bfloat16, torch.float32), name
        assert torch.equal(weight, master.bfloat16()), name
        finer += int((master != weight.float()).sum())
    moments = [v for k, v in state.items() if k.startswith("optimizer.exp_avg")]
    assert len(moments) == 2 * len(masters) and all(m.dtype == torch.float32 for m in moments)
    assert finer > 0 and any(bool((m != m.bfloat16().float()).any()) for m in moments)
