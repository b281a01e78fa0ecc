"""MLflow tracking of a run, by rank 0: the resolved config as params, every logged metrics row, MLflow's
system metrics, and at the end the config, tokenizer card, data manifests and loss-curve plots as artifacts.

Note: tracking never holds up training. `Tracker` hands each row, without blocking, to a separate process
(`tracking_worker.py`) through a pipe; that process makes every MLflow call. A thread in the training
process would do too, but importing MLflow and opening a sqlite store cost ≈3 s of Python, which under
the GIL would add ≈3 s to every `cpmtp train`; in its own process, started by `cpmtp train` before it
imports the trainer, that work runs beside the trainer's imports and set-up. When the tracking server does
not answer, the worker buffers the items in order, warns once (the warning is printed with the next logged
step) and retries every `tracking.retry_every_s`. At the end the trainer waits at most
`tracking.flush_timeout_s` for the worker to deliver the rest and end the MLflow run; what it could not
deliver is reported (every metrics row stays in `metrics.jsonl`), and the worker is stopped.

The MLflow run id is kept in `<run_dir>/mlflow_run.json`: a resumed run (`--resume auto`) continues the
same MLflow run. Params cannot change in MLflow; a resume that changes a setting (e.g. `train.steps`)
records the new value as the tag `changed_on_resume.<key>`.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from cpmtp_dist.config import TrackingConfig
from cpmtp_dist.config_io import flatten
from cpmtp_dist.training.tracking_worker import RUN_FILE, Settings, is_number, sqlite_artifact_location

DEFAULT_EXPERIMENT = "cpmtp"
__all__ = [
    "RUN_FILE",
    "Tracker",
    "maybe_build_tracker",
    "run_files",
    "numeric_metrics",
    "flatten_params",
    "log_summary_run",
]


def local_tracking_uri(run_dir: Path) -> str:
    """The default store: a sqlite file in the run directory."""
    return f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"


def flatten_params(tree: dict[str, Any]) -> dict[str, str]:
    """Nested sections -> {"model.cp.rank": "4", ...}, values as MLflow stores them (strings)."""
    return {key: str(value) for key, value in flatten(tree).items()}


def numeric_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row; a list of numbers (`expert_usage`) gives `key_1`, `key_2`, ..."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "step":
            continue
        if isinstance(value, list):
            for i, v in enumerate(value):
                if is_number(v):
                    out[f"{key}_{i + 1}"] = float(v)
        elif is_number(value):
            out[key] = float(value)
    return out


def run_files(run_dir: Path, tokenizer_dir: Path | None, data_path: str | None) -> list[tuple[Path, str]]:
    """(local file, artifact folder) of the files a run's MLflow artifacts hold besides the plots: the
    resolved config, the tokenizer card and the manifest of each dataset folder of `data.path`."""
    from cpmtp_dist.data.data_path import parse_data_path
    from cpmtp_dist.data.shards import MANIFEST
    from cpmtp_dist.data.tokenizer import CARD_FILE

    files = [(run_dir / "config.yaml", "")]
    if tokenizer_dir is not None:
        files.append((Path(tokenizer_dir) / CARD_FILE, "tokenizer"))
    if data_path:
        names: set[str] = set()
        for i, (_, folder) in enumerate(parse_data_path(data_path)):
            name = Path(folder).resolve().name or f"dataset_{i}"
            name = name if name not in names else f"{name}_{i}"
            names.add(name)
            files.append((Path(folder) / MANIFEST, f"data/{name}"))
    return files


def _cache_dir() -> Path:
    """`data.builtin.default_cache_dir()`, without importing the data stack (torch) that it sits in."""
    return Path(os.environ.get("CPMTP_CACHE_DIR", Path.home() / ".cache" / "cpmtp_dist"))


class Tracker:
    """The training process's side of tracking (see the module docstring). `log_metrics` returns at once;
    `close` waits up to `cfg.flush_timeout_s` for the worker to finish. `files` (see `run_files`) are sent
    as artifacts at the end, with the loss curves; `add_files` adds to them."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_dir: Path,
        *,
        params: dict[str, Any],
        files: list[tuple[Path, str]] | None = None,
        stream: TextIO = sys.stdout,
        warn_stream: TextIO = sys.stderr,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.uri = cfg.uri or local_tracking_uri(run_dir)
        self.experiment = cfg.experiment or DEFAULT_EXPERIMENT
        self.files = list(files or [])
        self.stream, self.warn_stream = stream, warn_stream
        self.rows_logged = 0
        # What the worker reports back.
        self.run_id: str | None = None
        self.sent_rows = self.sent_files = 0
        self.ended = False
        self._closed = False
        self._pid = os.getpid()  # a forked child (a loader worker) holds a copy that must do nothing
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "cpmtp_dist.training.tracking_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        self._to_worker = self._proc.stdin.fileno()
        self._from_worker = self._proc.stdout.fileno()
        os.set_blocking(self._to_worker, False)
        self._poll = select.poll()
        self._poll.register(self._from_worker, select.POLLIN)
        self._unsent = b""  # bytes the worker's stdin did not take yet
        self._partial = b""  # the start of a line from the worker
        self._eof = False
        settings = Settings(
            uri=self.uri,
            experiment=self.experiment,
            run_dir=str(run_dir.resolve()),
            local=cfg.uri is None,
            params=flatten_params(params),
            cache_dir=str(_cache_dir()),
            system_metrics=cfg.system_metrics,
            system_metrics_interval_s=cfg.system_metrics_interval_s,
            retry_every_s=cfg.retry_every_s,
            flush_timeout_s=cfg.flush_timeout_s,
        )
        self._send({"op": "open", "settings": asdict(settings)})
        atexit.register(self._at_exit)

    def add_files(self, files: list[tuple[Path, str]]) -> None:
        self.files += [f for f in files if f not in self.files]

    def log_metrics(self, step: int, row: dict[str, Any]) -> None:
        values = numeric_metrics(row)
        if values:
            self.rows_logged += 1
            self._send(
                {"op": "metrics", "step": step, "timestamp_ms": int(time.time() * 1000), "values": values}
            )

    def close(self, status: str = "FINISHED") -> None:
        """End the MLflow run with `status` (FINISHED; KILLED on preemption; FAILED) after the artifacts;
        wait at most `flush_timeout_s` for it, then stop the worker."""
        if self._closed or os.getpid() != self._pid:
            return
        self._closed = True
        atexit.unregister(self._at_exit)
        files = [[str(p), folder] for p, folder in self.files]
        self._send({"op": "close", "status": status, "files": files})
        deadline = time.monotonic() + self.cfg.flush_timeout_s
        while not self.ended and self._proc.poll() is None and time.monotonic() < deadline:
            self._pump(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
        if self._proc.poll() is None:
            self._proc.kill()  # done (the run has ended: no need to wait for its interpreter to exit), or late
        self._proc.wait()
        for _ in range(100):  # what the worker said last, up to the end of its output
            if self._eof:
                break
            self._pump(timeout=0.1)
        self._proc.stdin.close()
        self._proc.stdout.close()
        if self.ended:
            print(
                f"mlflow: run {self.run_id} of experiment '{self.experiment}' at {self.uri}: "
                f"{self.sent_rows} metric rows, {self.sent_files} artifacts",
                file=self.stream,
                flush=True,
            )
            return
        print(
            f"warning: mlflow: {self.uri} did not take the run within tracking.flush_timeout_s="
            f"{self.cfg.flush_timeout_s:g}s of its end: {self.rows_logged - self.sent_rows} of "
            f"{self.rows_logged} metric rows were not sent, nor all the artifacts, and the run was not "
            f"ended there. Every metrics row is in {self.run_dir / 'metrics.jsonl'}, the artifacts are in "
            f"{self.run_dir}.",
            file=self.warn_stream,
            flush=True,
        )

    def discard(self) -> None:
        """Stop the worker before the first row: the run fails before training (a checkpoint that cannot
        be resumed, unreadable data), and its MLflow run, if any, is left as it is."""
        if self._closed or os.getpid() != self._pid:
            return
        self._closed = True
        atexit.unregister(self._at_exit)
        self._proc.kill()
        self._proc.wait()
        self._proc.stdin.close()
        self._proc.stdout.close()

    def _at_exit(self) -> None:
        """The process ends without `close` (an exception in training): mark the run failed."""
        self.close(status="FAILED")

    def _send(self, msg: dict[str, Any]) -> None:
        self._unsent += (json.dumps(msg) + "\n").encode()
        self._pump()

    def _pump(self, timeout: float = 0.0) -> None:
        """Write to the worker what its stdin takes now, without blocking (the pipe is full only if the
        worker stalls); read and handle what it has said, waiting up to `timeout` for it. No threads: the
        trainer forks helper processes."""
        try:
            while self._unsent:
                self._unsent = self._unsent[os.write(self._to_worker, self._unsent) :]
        except BlockingIOError:
            pass
        except OSError:  # the worker is gone; its last words say why
            self._unsent = b""
        if self._eof or not self._poll.poll(int(timeout * 1000)):
            return
        data = os.read(self._from_worker, 1 << 16)
        self._eof = not data
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "say" in msg:
                print(msg["say"], file=self.warn_stream if msg.get("warn") else self.stream, flush=True)
            self.run_id = msg.get("run_id", self.run_id)
            self.sent_rows = msg.get("sent_rows", self.sent_rows)
            self.sent_files = msg.get("sent_files", self.sent_files)
            self.ended = msg.get("ended", self.ended)


def maybe_build_tracker(
    cfg: TrackingConfig, run_dir: Path, *, enabled: bool, params: dict[str, Any]
) -> Tracker | None:
    """A tracker on the logging rank (`enabled`) when `cfg.enabled`, else None. Its worker starts at once,
    so that importing MLflow and opening the store overlap the trainer's own imports and set-up; this module
    imports no torch, so `cpmtp train` builds it before importing the trainer."""
    if not (enabled and cfg.enabled):
        return None
    return Tracker(cfg, run_dir, params=params)


def log_summary_run(
    uri: str,
    experiment: str,
    run_name: str,
    *,
    params: dict[str, Any],
    metrics: dict[str, float],
    artifacts: list[Path | tuple[Path, str]] = (),
    tags: dict[str, str] | None = None,
) -> str:
    """One finished MLflow run holding a summary (an evaluation, a benchmark, an experiment's table):
    synchronous MLflow calls, for commands that are not training. An artifact is a file, or (file, folder
    in the run's artifacts). Returns the run id."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        exp_id = client.create_experiment(experiment, artifact_location=sqlite_artifact_location(uri))
    run = client.create_run(exp_id, run_name=run_name, tags=tags or {})
    rid = run.info.run_id
    for key, value in flatten_params(params).items():
        client.log_param(rid, key, value)
    stamp = int(time.time() * 1000)
    for key, value in numeric_metrics(metrics).items():
        client.log_metric(rid, key, value, timestamp=stamp, step=0)
    for item in artifacts:
        path, folder = item if isinstance(item, tuple) else (item, None)
        client.log_artifact(rid, str(path), folder)
    client.set_terminated(rid, "FINISHED")
    return rid
