"""bench/gpu_check.py's summary of a GPU check, from hand-written step records (no GPU, no launch), and the
shell scripts' syntax."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def write_rows(run: Path, rows: list[dict]) -> None:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_collect_summarises_what_the_steps_left(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "logs").mkdir(parents=True)
    out.mkdir()
    (work / "steps.tsv").write_text("tests\t1\t30.5\ntrain_1b\t0\t100.0\ncp_loss\tskipped\t0\n")
    (work / "pytest.xml").write_text(
        '<testsuites><testsuite tests="3" time="12.5">'
        '<testcase classname="tests.test_gpu" name="a"/>'
        '<testcase classname="tests.test_gpu" name="b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_gpu" name="c"><skipped message="why"/></testcase>'
        "</testsuite></testsuites>"
    )
    row = {"loss": 40.0, "tokens_per_s": 1000.0, "mfu": 0.1, "hfu": 0.12, "max_memory_gb": 30.0}
    write_rows(
        work / "runs" / "train_1b",
        [
            {"step": 5, **row},  # the warm-up interval: left out of the means
            {"step": 10, **row, "loss": 35.0, "tokens_per_s": 3000.0, "mfu": 0.3, "max_memory_gb": 31.0},
            {"step": 10, "eval_joint_loss": 34.0},
            {"step": 15, **row, "loss": 30.0, "tokens_per_s": 5000.0, "mfu": 0.5},
        ],
    )
    (work / "logs" / "train_1b.log").write_text(
        "model: 1038.71M parameters, n=4\ncheckpoint step_0000015: 12.50 s\n"
    )
    write_rows(
        work / "runs" / "resume_a", [{"step": s, "loss": 10.0 - s, "grad_norm": 1.0} for s in (1, 2, 3, 4)]
    )
    write_rows(work / "runs" / "resume_b", [{"step": s, "loss": 10.0 - s, "grad_norm": 1.0} for s in (3, 4)])

    result = gpu_check.collect(work, out)
    assert json.loads((out / "gpu_check.json").read_text()) == result
    assert result["steps"][0] == {"name": "tests", "rc": 1, "wall_s": 30.5}
    assert result["steps"][2]["rc"] is None  # skipped: no time left
    assert result["tests"]["passed"] == 1 and result["tests"]["failed"] == ["tests.test_gpu::b"]
    assert result["tests"]["skipped"] == ["tests.test_gpu::c: why"]
    t = result["train_1b"]
    assert (t["tokens_per_s"], t["mfu"], t["max_memory_gb"]) == (4000.0, 0.4, 31.0)
    assert (t["parameters_m"], t["checkpoint_save_s"], t["steps"]) == (1038.71, 12.5, 15)
    assert (t["loss_first_logged"], t["loss_last"], t["eval"]["eval_joint_loss"]) == (40.0, 30.0, 34.0)
    r = result["resume"]
    assert r["steps_compared"] == [3, 4] and r["loss_max_abs_diff"] == 0.0 and r["ok"]
    assert "weights_error" in r and not r["identical"]  # no checkpoints to compare here
    assert result["decode"] is None and result["cp_loss"] is None and result["env"] is None
    assert gpu_check.brief(result)["cp_loss"] is None


def test_shell_scripts_parse():
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        res = subprocess.run(["bash", "-n", str(ROOT / "bench" / script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
