"""The tracking process of a run: it makes every MLflow call for `tracking.Tracker`, and imports no torch.

`Tracker` starts it as `python -m cpmtp_dist.training.tracking_worker` and talks to it in JSON lines.
On its stdin, from the trainer: `{"op": "open", "settings": {...}}` first (the fields of `Settings`), then
`{"op": "metrics", "step", "timestamp_ms", "values"}` per logged row, and last
`{"op": "close", "status", "files": [[path, artifact folder], ...]}`. On its stdout, to the trainer:
`{"say": text, "warn": bool}` (a line for the console), and its progress: `run_id`, `sent_rows`,
`sent_files`, `ended`.

Note: MLflow is imported and the store opened at once, but the MLflow run is opened (or reopened, from
`mlflow_run.json`) only with the trainer's first row or its close, so that a trainer failing before it
trains can stop this process without touching the run. The items are delivered in order. When MLflow
does not answer they stay buffered, a warning says so once, and they are sent again every
`retry_every_s` (every second once the run has ended); an item the server refuses (a bad metric name) is
dropped with a warning rather than holding up the rest. The process ignores SIGINT, SIGTERM and SIGUSR2,
which reach the trainer's whole process group on a Ctrl-C or a preemption: the trainer ends tracking
itself, with `close` (or kills this process after its flush timeout). If the trainer dies without `close`
(stdin ends), what is buffered is still sent for up to `flush_timeout_s`, and the run is left as it is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

RUN_FILE = "mlflow_run.json"
PLOTS_DIR = "plots"
# Short HTTP retries: the worker retries by itself, without holding up the other buffered items.
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
MAX_METRICS_PER_BATCH = 1000  # MLflow's limits per log_batch call
MAX_PARAMS_PER_BATCH = 100
SYSTEM_PROBE = "system/cpu_utilization_percentage"


@dataclass
class Settings:
    """What the trainer tells the worker first (from the `tracking` config section and the run)."""

    uri: str
    experiment: str
    run_dir: str
    local: bool  # the default store, a sqlite file in the run directory
    params: dict[str, str]
    cache_dir: str
    system_metrics: bool
    system_metrics_interval_s: float
    retry_every_s: float
    flush_timeout_s: float


def artifact_location(store_dir: Path) -> str:
    """Where a local sqlite store in `store_dir` keeps its artifacts: beside it (MLflow's default is
    ./mlruns, wherever the command runs)."""
    return (store_dir.resolve() / "mlartifacts").as_uri()


def sqlite_artifact_location(uri: str) -> str | None:
    """`artifact_location` of a `sqlite:///PATH` store (beside PATH); None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return artifact_location(Path(uri.removeprefix("sqlite:///")).parent)


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash
    return rows


def plot_losses(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Loss curves from metrics rows as PNGs (matplotlib's Agg canvas, no pyplot state): `joint_loss.png`
    (training joint loss and total loss, held-out joint loss), `head_losses.png` (each head's loss; head 1 is
    the next-token loss) and, when the run evaluated, `eval_losses.png`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in rows if "joint_loss" in r]
    evals = [r for r in rows if "eval_joint_loss" in r]

    def series(rs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in rs if is_number(r.get(key))]
        return [p[0] for p in pts], [p[1] for p in pts]

    def save(fig: Figure, ax: Any, title: str, name: str) -> Path:
        ax.set(title=title, xlabel="step", ylabel="loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        FigureCanvasAgg(fig)
        path = out_dir / name
        fig.savefig(path, dpi=100)  # the default margins fit; a tight box would draw the figure twice
        return path

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.plot(*series(train, "joint_loss"), label="joint loss (train)")
    if any(r.get("aux_loss") for r in train):
        ax.plot(*series(train, "loss"), label="loss incl. balancing term", alpha=0.6)
    if evals:
        ax.plot(*series(evals, "eval_joint_loss"), "o-", label="joint loss (held out)")
    paths.append(save(fig, ax, "joint loss over the n future tokens", "joint_loss.png"))

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    heads = sorted({int(k.rsplit("_", 1)[1]) for r in train for k in r if k.startswith("head_loss_")})
    for s in heads:
        ax.plot(*series(train, f"head_loss_{s}"), label=f"head {s}" + (" (next token)" if s == 1 else ""))
    if not heads:
        ax.plot(*series(train, "ntp_loss"), label="next token")
    if evals:
        ax.plot(*series(evals, "eval_ntp_loss"), "o-", label="next token (held out)")
    paths.append(save(fig, ax, "per-head losses (marginal of each future token)", "head_losses.png"))

    if evals:
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        ax.plot(*series(evals, "eval_joint_loss"), "o-", label="joint loss")
        ax.plot(*series(evals, "eval_ntp_loss"), "o-", label="next-token loss")
        paths.append(save(fig, ax, "held-out losses", "eval_losses.png"))
    return paths


def _warm_up_plotting() -> None:
    """Import matplotlib and draw a small figure: the first figure also loads fonts (≈0.4 s)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    ax = fig.add_subplot()
    ax.plot([0, 1], [1, 0], label="x")
    ax.set(title="t", xlabel="step", ylabel="loss")
    ax.legend(fontsize="small")
    FigureCanvasAgg(fig)
    fig.savefig(io.BytesIO(), format="png")


def seed_local_store(db: Path, cache_dir: Path) -> None:
    """Give a new run directory an empty MLflow sqlite store.

    Note: MLflow creates its tables through some 40 alembic migrations, about 2 s of CPU for every new
    store, which the many short runs of a test suite would pay each time. The first new store is
    therefore kept in the cache (one per MLflow version, written atomically) and later ones are copies
    of it; MLflow checks the copy's schema version when it opens it, as for any existing store.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    if db.exists():
        return
    template = cache_dir / f"mlflow-{mlflow.__version__}-empty.db"
    if template.exists() and _copy_atomic(template, db):
        return
    MlflowClient(tracking_uri=f"sqlite:///{db.resolve()}")  # creates the tables
    _copy_atomic(db, template)


def _copy_atomic(src: Path, dst: Path) -> bool:
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        return True
    except OSError:  # a read-only cache only costs the migrations
        return False


def _reason(err: BaseException) -> str:
    """The innermost cause of an error (`[Errno 111] Connection refused`), not MLflow's long wrapper."""
    for _ in range(20):  # a chain can loop
        inner = err.__cause__ or err.__context__
        if inner is None:
            break
        err = inner
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _refused(err: BaseException) -> bool:
    """MLflow answered with a client error (4xx other than a timeout or rate limit)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return False
    status = err.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


def _take_sample(monitor: Any) -> dict[str, float]:
    """One reading of MLflow's system-metric collectors, named as MLflow names them (`system/...`)."""
    try:
        monitor.collect_metrics()
        values = monitor.aggregate_metrics()
    except Exception:  # a collector that fails (e.g. a GPU that went away) must not stop tracking
        values = {}
    for m in monitor.monitors:
        m.clear_metrics()
    return {f"system/{k}": float(v) for k, v in values.items() if is_number(v)}


# --------------------------------------------------------------------------------------------------
@dataclass
class _Metrics:
    step: int  # for system metrics, the sample's index in this process (offset when sent)
    timestamp_ms: int
    values: dict[str, float]
    system: bool = False


@dataclass
class _Artifacts:
    files: list[tuple[Path, str]]
    drawn: bool = False


@dataclass
class _End:
    status: str


@dataclass
class _Open:
    """The MLflow run once it is open."""

    client: Any
    run_id: str
    system_step0: int = 0
    sent_rows: int = 0
    sent_files: list[str] = field(default_factory=list)


class Worker:
    """Turns the trainer's messages (from `inbox`; None when its stdin ends) into MLflow calls."""

    def __init__(self, settings: Settings, inbox: queue.Queue, out: TextIO) -> None:
        self.s = settings
        self.run_dir = Path(settings.run_dir)
        self.inbox = inbox
        self.out = out
        self.client: Any = None
        self.opened: _Open | None = None
        self.ended = False
        self.one_at_a_time = False  # after a refused batch: send the rows singly to find the refused one
        self.failing = False  # the last delivery failed: the server does not answer

    def report(self, **msg: Any) -> None:
        try:
            self.out.write(json.dumps(msg) + "\n")
            self.out.flush()
        except (OSError, ValueError):  # the trainer is gone
            pass

    def say(self, text: str, *, warn: bool = False) -> None:
        self.report(say=text, warn=warn)

    def serve(self) -> None:
        for key, value in HTTP_ENV.items():
            os.environ.setdefault(key, value)
        import mlflow  # noqa: F401

        self.run_dir.mkdir(parents=True, exist_ok=True)  # the worker may start before the trainer makes it
        # Table creation and the GPU probe report at INFO level on every run.
        for name in ("mlflow.store.db.utils", "mlflow.system_metrics.system_metrics_monitor"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        try:
            if self.s.local:
                seed_local_store(self.run_dir / "mlflow.db", Path(self.s.cache_dir))
            self.client = MlflowClient(tracking_uri=self.s.uri)  # opens a sqlite store now, a server later
        except Exception:  # opening the run reports what is wrong
            pass
        sampler = self._build_sampler()
        warm = False
        interval, retry = self.s.system_metrics_interval_s, self.s.retry_every_s
        next_sample, samples = time.monotonic() + interval, 0
        pending: deque = deque()
        self.failing = warned = False
        next_try = 0.0
        orphaned_at = None  # when stdin ended without a close: the trainer died
        while not self.ended:
            wake = ([next_sample] if sampler is not None else []) + ([next_try] if self.failing else [])
            if pending and not self.failing:
                wake.append(0.0)  # what is left after a refused item goes at once
            try:
                timeout = max(0.0, min(wake) - time.monotonic()) if wake else None
                pending.extend(self._items(self.inbox.get(timeout=timeout)))
                while True:
                    pending.extend(self._items(self.inbox.get_nowait()))
            except queue.Empty:
                pass
            if None in pending:  # stdin ended: after the close message, or because the trainer died
                pending.remove(None)
                if not any(isinstance(p, _End) for p in pending):
                    orphaned_at = time.monotonic()
            if orphaned_at is not None and (
                not pending or time.monotonic() > orphaned_at + self.s.flush_timeout_s
            ):
                return
            for item in pending:  # the plots are drawn in the run directory whether MLflow answers or not
                if isinstance(item, _Artifacts) and not item.drawn:
                    item.files += self._draw_plots()
                    item.drawn = True
            closing = orphaned_at is not None or any(isinstance(p, _End) for p in pending)
            if sampler is not None and (closing or time.monotonic() >= next_sample):
                values = _take_sample(sampler)  # at the end too, so that a short run has one
                if values:
                    at = next((i for i, p in enumerate(pending) if not isinstance(p, _Metrics)), len(pending))
                    pending.insert(at, _Metrics(samples, int(time.time() * 1000), values, system=True))
                    samples += 1
                next_sample = time.monotonic() + interval
                sampler = None if closing else sampler
            if not pending or (self.failing and not closing and time.monotonic() < next_try):
                continue
            if self.opened is None and all(isinstance(p, _Metrics) and p.system for p in pending):
                continue  # the run is opened by the trainer's first row: until then the trainer may discard us
            try:
                self._deliver(pending)
            except Exception as err:  # unreachable: keep the items, try again later
                if self.opened is not None and _refused(err) and not isinstance(pending[0], _End):
                    # The server said no: retrying cannot help, and it must not hold up the rest. Send
                    # the rows singly to find the one it refuses, and drop that one.
                    if self.one_at_a_time:
                        self.say(f"warning: mlflow: {self.s.uri} refused {pending.popleft()!r:.200}: "
                                 f"{_reason(err)}", warn=True)  # fmt: skip
                    self.one_at_a_time = not self.one_at_a_time
                    continue
                if not warned:
                    self.say(
                        f"warning: mlflow: {self.s.uri} does not answer ({_reason(err)}); training goes on, "
                        f"metrics are buffered and sent again every {retry:g}s",
                        warn=True,
                    )
                    warned = True
                self.failing = True
                next_try = time.monotonic() + (1.0 if closing else retry)
                continue
            self.one_at_a_time = False
            self._answered()
            if not warm:  # import and load the plotting now, while training runs, rather than at the end
                _warm_up_plotting()
                warm = True

    @staticmethod
    def _items(msg: dict[str, Any] | None) -> list[Any]:
        if msg is None:
            return [None]
        if msg["op"] == "metrics":
            return [_Metrics(int(msg["step"]), int(msg["timestamp_ms"]), dict(msg["values"]))]
        if msg["op"] == "close":
            return [_Artifacts([(Path(p), f) for p, f in msg["files"]]), _End(msg["status"])]
        raise ValueError(f"unknown message {msg!r:.200}")

    def _build_sampler(self) -> Any:
        if not self.s.system_metrics:
            return None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # Used for its collectors (CPU, memory, disk, network, and the GPU when there is one); the
            # samples go through this worker's buffer instead of MLflow's own logging thread.
            monitor = SystemMetricsMonitor(None, tracking_uri=self.s.uri)
            _take_sample(monitor)  # the first CPU reading only starts psutil's interval
            return monitor
        except Exception as err:
            self.say(f"warning: mlflow: no system metrics ({err})", warn=True)
            return None

    def _answered(self) -> None:
        """Say once that the server answers again after failures (before the run's end is reported: the
        trainer stops the worker as soon as it hears of the end)."""
        if self.failing:
            self.say(f"mlflow: {self.s.uri} answers again; the buffered metrics were sent")
            self.failing = False

    def _deliver(self, pending: deque) -> None:
        """Send the pending items in order, dropping each once MLflow has it; raises on the first failure."""
        from mlflow.entities import Metric

        opened = self.opened or self._start_run()
        while pending:
            item = pending[0]
            if isinstance(item, _Metrics):
                batch, count = [], 0
                for it in pending:
                    if not isinstance(it, _Metrics):
                        break
                    if batch and (self.one_at_a_time or count + len(it.values) > MAX_METRICS_PER_BATCH):
                        break
                    batch.append(it)
                    count += len(it.values)
                metrics = [
                    Metric(k, v, m.timestamp_ms, m.step + opened.system_step0 if m.system else m.step)
                    for m in batch
                    for k, v in m.values.items()
                ]
                opened.client.log_batch(opened.run_id, metrics=metrics, synchronous=True)
                for m in batch:
                    pending.popleft()
                    opened.sent_rows += not m.system
                self.report(sent_rows=opened.sent_rows)
            elif isinstance(item, _Artifacts):
                while item.files:
                    path, folder = item.files[0]
                    if path.is_file():
                        opened.client.log_artifact(opened.run_id, str(path), folder or None)
                        opened.sent_files.append(f"{folder}/{path.name}" if folder else path.name)
                    item.files.pop(0)
                pending.popleft()
                self.report(sent_files=len(opened.sent_files))
            elif isinstance(item, _End):
                opened.client.set_terminated(opened.run_id, status=item.status)
                pending.popleft()
                self._answered()
                self.ended = True
                self.report(ended=True)

    def _draw_plots(self) -> list[tuple[Path, str]]:
        try:
            paths = plot_losses(read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / PLOTS_DIR)
        except Exception as err:  # a plot is not worth losing the rest of the artifacts
            self.say(f"warning: mlflow: could not draw the loss curves ({err})", warn=True)
            return []
        return [(p, PLOTS_DIR) for p in paths]

    def _start_run(self) -> _Open:
        """Open the MLflow run: the one named in `mlflow_run.json` (resume), or a new one."""
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        s = self.s
        client = self.client or MlflowClient(tracking_uri=s.uri)
        exp = client.get_experiment_by_name(s.experiment)
        if exp is None:
            # A sqlite store keeps its artifacts beside it (MLflow's default is ./mlruns, wherever the command
            # runs): the default store in the run directory, a shared one (--tracking-uri sqlite:///...) beside it.
            location = artifact_location(self.run_dir) if s.local else sqlite_artifact_location(s.uri)
            try:
                exp_id = client.create_experiment(s.experiment, artifact_location=location)
            except MlflowException:  # created meanwhile by another run
                exp = client.get_experiment_by_name(s.experiment)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
        run_file = self.run_dir / RUN_FILE
        saved = json.loads(run_file.read_text()) if run_file.exists() else {}
        run = None
        if saved.get("uri") == s.uri and saved.get("run_id"):
            try:
                run = client.get_run(saved["run_id"])
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                self.say(f"mlflow: run {saved['run_id']} is gone from {s.uri}; starting a new one")
        if run is not None:
            opened = _Open(client, run.info.run_id)
            client.update_run(run.info.run_id, status="RUNNING")
            old = run.data.params
            new = [Param(k, v) for k, v in s.params.items() if k not in old]
            tags = [
                RunTag(f"changed_on_resume.{k}", v) for k, v in s.params.items() if k in old and old[k] != v
            ]
            if s.system_metrics:
                history = client.get_metric_history(run.info.run_id, SYSTEM_PROBE)
                opened.system_step0 = max((m.step for m in history), default=-1) + 1
            self.say(f"mlflow: continuing run {run.info.run_id} at {s.uri}")
        else:
            name, tags_ = self.run_dir.resolve().name, {"run_dir": str(self.run_dir.resolve())}
            run = client.create_run(exp_id, run_name=name, tags=tags_)
            opened = _Open(client, run.info.run_id)
            new, tags = [Param(k, v) for k, v in s.params.items()], []
        for i in range(0, max(len(new), len(tags)), MAX_PARAMS_PER_BATCH):
            client.log_batch(
                opened.run_id,
                params=new[i : i + MAX_PARAMS_PER_BATCH],
                tags=tags[i : i + MAX_PARAMS_PER_BATCH],
                synchronous=True,
            )
        run_file.write_text(
            json.dumps({"uri": s.uri, "run_id": opened.run_id, "experiment_id": exp_id}) + "\n"
        )
        self.opened = opened
        self.report(run_id=opened.run_id)
        return opened


def _read_stdin(inbox: queue.Queue) -> None:
    try:
        for line in sys.stdin:
            if line.strip():
                inbox.put(json.loads(line))
    finally:
        inbox.put(None)


def main() -> None:
    for name in ("SIGINT", "SIGTERM", "SIGUSR2"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # MLflow prints to stdout ("View run at ..."): send that to stderr, out of the protocol
    first = sys.stdin.readline()
    if not first:
        return
    settings = Settings(**json.loads(first)["settings"])
    worker = Worker(settings, queue.Queue(), out)
    threading.Thread(target=_read_stdin, args=(worker.inbox,), daemon=True).start()
    try:
        worker.serve()
    except Exception as err:  # a bug here must not end training: report it, stop tracking
        worker.say(f"warning: mlflow: tracking stopped: {err!r}", warn=True)


if __name__ == "__main__":
    main()
