"""MLflow tracking: `cpmtp train` against a real MLflow server on 127.0.0.1 started here, read back through the
server's REST API (params, metric histories equal to `metrics.jsonl`, system metrics, artifacts); a preempted and
resumed run keeps its MLflow run; a server that does not answer does not stop training, and what was buffered
reaches it once it answers; the default store is a sqlite file in the run directory."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest

from cpmtp_dist.config import TrackingConfig
from cpmtp_dist.training.metrics import MetricsLogger
from cpmtp_dist.training.tracking import RUN_FILE, Tracker, flatten_params, numeric_metrics, run_files
from parity_config import PARITY
from runs import build_json_shards

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    *PARITY,
    "train.steps=6",
    "train.micro_batch_size=4",
    "train.eval_batches=1",
    "tracking.retry_every_s=1",
]


# --- helpers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(run: Path, *overrides: str, flags: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "launchers.cli", "train", "--config", "configs/tiny.yaml", "--run-dir",
            str(run), *flags, *SMALL, *overrides]  # fmt: skip


def env(cache: Path) -> dict[str, str]:
    return {**os.environ, "CPMTP_CACHE_DIR": str(cache), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def train(run: Path, cache: Path, *overrides: str, flags: Sequence[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(command(run, *overrides, flags=flags), cwd=ROOT, env=env(cache), capture_output=True,
                          text=True, timeout=900)  # fmt: skip


def api(url: str, endpoint: str, **query: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}") as r:
        return json.load(r)


def search_runs(url: str, experiment_name: str) -> list[dict]:
    exp = api(url, "experiments/get-by-name", experiment_name=experiment_name)["experiment"]
    body = json.dumps({"experiment_ids": [exp["experiment_id"]]}).encode()
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", data=body,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req) as r:
        return json.load(r).get("runs", [])


def history(url: str, run_id: str, key: str) -> list[tuple[int, float]]:
    metrics = api(url, "metrics/get-history", run_id=run_id, metric_key=key, max_results="25000")
    return sorted((m["step"], m["value"]) for m in metrics.get("metrics", []))


def artifact(url: str, run_id: str, path: str) -> bytes:
    query = urllib.parse.urlencode({"run_id": run_id, "path": path})
    with urllib.request.urlopen(f"{url}/get-artifact?{query}") as r:
        return r.read()


def artifact_paths(url: str, run_id: str, path: str = "") -> set[str]:
    out = set()
    for f in api(url, "artifacts/list", run_id=run_id, path=path).get("files", []):
        out |= artifact_paths(url, run_id, f["path"]) if f["is_dir"] else {f["path"]}
    return out


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_id_of(run: Path) -> str:
    return json.loads((run / RUN_FILE).read_text())["run_id"]


def assert_histories_equal_metrics_jsonl(url: str, run_id: str, run: Path) -> None:
    """Every numeric value of every row of metrics.jsonl is in MLflow, at its step, once."""
    rows = metrics_rows(run)
    want: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in numeric_metrics(row).items():
            want.setdefault(key, []).append((row["step"], value))
    assert {"joint_loss", "head_loss_1", "grad_norm", "expert_usage_1", "eval_joint_loss"} <= want.keys()
    for key, points in want.items():
        assert history(url, run_id, key) == sorted(points), key


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """`mlflow server` on a free port of 127.0.0.1 with a sqlite store, serving artifacts itself (without
    its job runner, a handful of worker processes that tracking does not use)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)  # the server and the uvicorn worker it started
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_json_shards(tmp_path_factory.mktemp("shards"), "json_code")


class Forwarder:
    """A port of 127.0.0.1 held closed (bound, not listening: connections are refused, and no other socket
    can take the port meanwhile) until `answer` pipes each connection on it to `target_port`."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def answer(self, target_port: int) -> None:
        self.target_port = target_port
        self.sock.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


# --- fast unit tests -----------------------------------------------------------------------------


def test_params_are_dotted_and_metrics_numeric() -> None:
    params = flatten_params({"model": {"cp": {"rank": 4, "phi": "residual"}}, "data": {"path": None}})
    assert params == {"model.cp.rank": "4", "model.cp.phi": "residual", "data.path": "None"}
    row = {"step": 3, "loss": 2.5, "lr": 1e-3, "expert_usage": [0.25, 0.75], "ok": True, "mfu": None}
    assert numeric_metrics(row) == {"loss": 2.5, "lr": 1e-3, "expert_usage_1": 0.25, "expert_usage_2": 0.75}


def test_run_files_name_each_dataset_of_a_blend(tmp_path: Path) -> None:
    files = run_files(tmp_path, tmp_path / "tok", f"0.7 {tmp_path}/a/code 0.3 {tmp_path}/b/code")
    assert files == [
        (tmp_path / "config.yaml", ""),
        (tmp_path / "tok" / "tokenizer.json", "tokenizer"),
        (tmp_path / "a" / "code" / "manifest.json", "data/code"),
        (tmp_path / "b" / "code" / "manifest.json", "data/code_1"),
    ]
    assert run_files(tmp_path, None, None) == [(tmp_path / "config.yaml", "")]


# --- the default store: sqlite in the run directory -------------------------------------------------


@pytest.mark.slow
def test_default_store_is_a_sqlite_file_in_the_run_dir(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CPMTP_CACHE_DIR", str(tmp_path / "cache"))
    cfg = TrackingConfig(experiment="local", system_metrics_interval_s=0.2)

    def log_run(run_dir: Path, steps: range, status: str = "FINISHED", rank: int = 5, config=cfg) -> None:
        run_dir.mkdir(exist_ok=True)
        (run_dir / "config.yaml").write_text(f"model:\n  cp:\n    rank: {rank}\n")
        tracker = Tracker(config, run_dir, params={"model": {"cp": {"rank": rank}}},
                          files=run_files(run_dir, None, None), stream=io.StringIO())  # fmt: skip
        logger = MetricsLogger(run_dir, enabled=True, total_steps=4, stream=io.StringIO(), tracker=tracker)
        for step in steps:
            logger.log(step, {"joint_loss": 10.0 - step, "ntp_loss": 3.0, "head_loss_1": 3.0, "aux_loss": 0.0,
                              "expert_usage": [0.5, 0.5], "mfu": None})  # fmt: skip
            if step == 1:  # a name MLflow refuses: that row is left out, the others are not held up
                logger.log(step, {"bad@name": 1.0})
        logger.log(steps[-1], {"eval_joint_loss": 7.5, "eval_ntp_loss": 2.5, "eval_ntp_ppl": 12.0})
        logger.close(status)

    run = tmp_path / "run"
    log_run(run, range(1, 3), status="KILLED")
    assert (run / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (first,) = client.search_runs([client.get_experiment_by_name("local").experiment_id])
    assert first.info.status == "KILLED" and first.data.params == {"model.cp.rank": "5"}
    assert first.info.run_id == run_id_of(run)

    log_run(run, range(3, 5), rank=6)  # the same run directory again: the same MLflow run, continued
    (again,) = client.search_runs([client.get_experiment_by_name("local").experiment_id])
    assert again.info.run_id == first.info.run_id and again.info.status == "FINISHED"
    assert again.data.params == {"model.cp.rank": "5"}  # params cannot change: the new value is a tag
    assert again.data.tags["changed_on_resume.model.cp.rank"] == "6"
    assert [(m.step, m.value) for m in client.get_metric_history(again.info.run_id, "joint_loss")] == [
        (1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)
    ]  # fmt: skip
    assert [m.step for m in client.get_metric_history(again.info.run_id, "expert_usage_2")] == [1, 2, 3, 4]
    system = [m.step for m in client.get_metric_history(again.info.run_id, "system/disk_usage_percentage")]
    assert system and system == list(range(len(system)))  # the second process went on counting
    arts = {a.path for a in client.list_artifacts(again.info.run_id)}
    arts |= {a.path for a in client.list_artifacts(again.info.run_id, "plots")}
    assert {"config.yaml", "plots/joint_loss.png", "plots/head_losses.png", "plots/eval_losses.png"} <= arts
    assert (run / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()  # nothing outside the run
    assert len(list((tmp_path / "cache").glob("mlflow-*-empty.db"))) == 1  # later stores start from it
    log_run(tmp_path / "other", range(1, 3))
    other = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}")
    assert len(other.search_runs([other.get_experiment_by_name("local").experiment_id])) == 1
    # A shared sqlite store (--tracking-uri sqlite:///..., as the experiment scripts use) keeps the artifacts
    # beside it too, not in ./mlruns. (Started from the cached empty store: no schema migration here.)
    (tmp_path / "shared").mkdir()
    shutil.copy(next((tmp_path / "cache").glob("mlflow-*-empty.db")), tmp_path / "shared" / "mlflow.db")
    shared = TrackingConfig(experiment="local", system_metrics_interval_s=0.2,
                            uri=f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}")  # fmt: skip
    log_run(tmp_path / "third", range(1, 3), config=shared)
    assert (tmp_path / "shared" / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


# --- against a real server -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_on_the_server_has_params_metrics_and_artifacts(server, shards, cache, tmp_path) -> None:
    run = tmp_path / "run"
    flags = ["--tracking-uri", server, "--experiment", "cpmtp-test"]
    res = train(run, cache, "model.cp.rank=3", f"data.path={shards}", flags=flags)  # with 2 loader workers
    assert res.returncode == 0, res.stderr[-3000:]
    run_id = run_id_of(run)
    assert f"mlflow: run {run_id} of experiment 'cpmtp-test' at {server}" in res.stdout
    (found,) = search_runs(server, "cpmtp-test")
    assert found["info"]["run_id"] == run_id and found["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in api(server, "runs/get", run_id=run_id)["run"]["data"]["params"]}
    assert params["model.cp.rank"] == "3" and params["train.steps"] == "6"
    assert params["data.path"] == str(shards)
    assert params["tracking.uri"] == server and params["tracking.experiment"] == "cpmtp-test"

    assert_histories_equal_metrics_jsonl(server, run_id, run)
    assert history(server, run_id, "system/cpu_utilization_percentage")

    assert {"config.yaml", "tokenizer/tokenizer.json", "data/json_code/manifest.json", "plots/joint_loss.png",
            "plots/head_losses.png", "plots/eval_losses.png"} <= artifact_paths(server, run_id)  # fmt: skip
    assert artifact(server, run_id, "config.yaml") == (run / "config.yaml").read_bytes()
    assert artifact(server, run_id, "data/json_code/manifest.json") == (shards / "manifest.json").read_bytes()
    card = shards.parent / "tok" / "tokenizer.json"
    assert artifact(server, run_id, "tokenizer/tokenizer.json") == card.read_bytes()
    for name in ("joint_loss", "head_losses", "eval_losses"):
        png = artifact(server, run_id, f"plots/{name}.png")
        assert png.startswith(b"\x89PNG") and png == (run / "plots" / f"{name}.png").read_bytes()


@pytest.mark.slow
def test_a_preempted_run_resumed_continues_its_mlflow_run(server, cache, tmp_path) -> None:
    run, steps = tmp_path / "run", 24
    flags = ["--tracking-uri", server, "--experiment", "cpmtp-resume"]
    overrides = [f"train.steps={steps}", "train.eval_every=0"]
    out = tmp_path / "first.out"
    with out.open("w") as f:
        proc = subprocess.Popen(command(run, *overrides, flags=flags), cwd=ROOT, env=env(cache), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            if (run / "metrics.jsonl").exists() and len(metrics_rows(run)) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before the signal"
        os.killpg(proc.pid, signal.SIGTERM)  # preemption: checkpoint, end the MLflow run as KILLED, exit 3
        assert proc.wait(timeout=300) == 3, out.read_text()[-3000:]
    run_id = run_id_of(run)
    stopped = max(r["step"] for r in metrics_rows(run))
    assert stopped < steps
    assert api(server, "runs/get", run_id=run_id)["run"]["info"]["status"] == "KILLED"
    assert {"config.yaml", "plots/joint_loss.png"} <= artifact_paths(server, run_id)

    res = train(run, cache, *overrides, flags=[*flags, "--resume", "auto"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"at step {stopped}" in res.stdout and f"mlflow: continuing run {run_id}" in res.stdout
    assert run_id_of(run) == run_id
    (found,) = search_runs(server, "cpmtp-resume")
    assert found["info"]["run_id"] == run_id and found["info"]["status"] == "FINISHED"
    assert [s for s, _ in history(server, run_id, "joint_loss")] == list(range(1, steps + 1))
    assert_histories_equal_metrics_jsonl(server, run_id, run)
    system = [s for s, _ in history(server, run_id, "system/cpu_utilization_percentage")]
    assert len(system) >= 2 and system == list(range(len(system)))  # one series over both processes


@pytest.mark.slow
def test_an_unreachable_server_does_not_stop_training(cache, tmp_path) -> None:
    run, uri = tmp_path / "run", f"http://127.0.0.1:{free_port()}"  # nothing listens there
    res = train(run, cache, "tracking.flush_timeout_s=10", flags=["--tracking-uri", uri])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"warning: mlflow: {uri} does not answer" in res.stderr and "training goes on" in res.stderr
    assert re.search(r"(\d+) of \1 metric rows were not sent", res.stderr), res.stderr[-3000:]
    assert f"Every metrics row is in {run / 'metrics.jsonl'}" in res.stderr
    assert [r["step"] for r in metrics_rows(run) if "loss" in r] == list(range(1, 7))
    assert "done: 6 steps" in res.stdout
    assert (run / "plots" / "joint_loss.png").is_file()  # drawn in the run directory all the same


@pytest.mark.slow
def test_buffered_metrics_reach_the_server_once_it_answers(server, cache, tmp_path) -> None:
    run, forwarder = tmp_path / "run", Forwarder()
    uri = f"http://127.0.0.1:{forwarder.port}"
    flags = ["--tracking-uri", uri, "--experiment", "cpmtp-late"]
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as fo, err.open("w") as fe:
        cmd = command(run, "tracking.flush_timeout_s=600", flags=flags)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(cache), stdout=fo, stderr=fe)
        try:
            deadline = time.time() + 600
            while "does not answer" not in err.read_text() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.1)
            assert "does not answer" in err.read_text(), err.read_text()[-3000:]
            forwarder.answer(urllib.parse.urlparse(server).port)  # the server is reachable from now on
            assert proc.wait(timeout=600) == 0, err.read_text()[-3000:]
        finally:
            proc.kill()
            forwarder.close()
    assert "answers again" in out.read_text()
    (found,) = search_runs(server, "cpmtp-late")
    assert found["info"]["status"] == "FINISHED" and found["info"]["run_id"] == run_id_of(run)
    assert_histories_equal_metrics_jsonl(server, run_id_of(run), run)
    assert "plots/joint_loss.png" in artifact_paths(server, run_id_of(run))


@pytest.mark.slow
def test_tracking_uri_none_turns_tracking_off(cache, tmp_path) -> None:
    run = tmp_path / "run"
    res = train(run, cache, "train.steps=2", flags=["--tracking-uri", "none"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (run / "mlflow.db").exists() and not (run / RUN_FILE).exists() and "mlflow" not in res.stdout
