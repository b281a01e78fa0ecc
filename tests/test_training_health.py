"""Training health. Non-finite steps (`train.on_nonfinite`): a poisoned step applies no update; `stop` ends
the run with exit status 4 and a message, `skip` goes on; no checkpoint holds non-finite numbers, and retention
keeps the newest healthy one. Loss spikes (`train.spike_rewind`): a run fed poisoned batches rewinds to the
checkpoint before the spike and ends as a run that skipped those batches. A failing run releases its checkpoint
writer, metrics logger and tracker. In-process training of the tiny model of tests/test_trainer.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cpmtp_dist.training.trainer as trainer
from cpmtp_dist.checkpoint_paths import verify_checkpoint
from cpmtp_dist.config_io import ConfigError, load_config, validate_config
from cpmtp_dist.run_status import run_status
from cpmtp_dist.training.checkpoint import prune_checkpoints, read_model_state
from cpmtp_dist.training.nonfinite import NONFINITE_EXIT_CODE
from cpmtp_dist.training.optim import lr_multiplier
from launchers.cli import main as cli_main
from parity_config import PARITY

SMALL = [
    *PARITY,
    "train.micro_batch_size=4",  # two micro-batches per step: the poison lands in both
    "train.eval_batches=1",
    "optim.warmup_steps=2",
    "optim.grad_clip=0.5",
    "tracking.enabled=false",
]


@pytest.fixture(autouse=True)
def _setting(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CPMTP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "nonfinite_cache"))
    monkeypatch.chdir(Path(__file__).resolve().parents[1])


def poison(monkeypatch, gradient_steps=(), weight_steps=()):
    """Make the gradient of `gradient_steps` infinite (the loss stays finite: the inf scales only what is
    back-propagated), or set a weight to NaN after the update of `weight_steps`."""
    real_fb, real_step = trainer.forward_backward, trainer.train_step

    def forward_backward(engine, tokens, targets, *, scale, **kwargs):
        if engine.global_steps + 1 in gradient_steps:
            scale = scale * float("inf")
        return real_fb(engine, tokens, targets, scale=scale, **kwargs)

    def train_step(engine, *args, **kwargs):
        out = real_step(engine, *args, **kwargs)
        if engine.global_steps in weight_steps:
            with torch.no_grad():
                next(engine.module.parameters()).view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(trainer, "forward_backward", forward_backward)
    monkeypatch.setattr(trainer, "train_step", train_step)


def train(tmp_path: Path, *overrides: str) -> tuple[trainer.TrainResult, list[dict]]:
    cfg = load_config("configs/tiny.yaml", [*SMALL, *overrides])
    validate_config(cfg, world_size=1, cuda_available=False)
    result = trainer.train(cfg, tmp_path / "run")
    return result, metrics(tmp_path / "run")


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def assert_finite(folder: Path) -> None:
    for prefix in ("model.", "optimizer."):
        for key, t in read_model_state(folder, prefix).items():
            assert torch.isfinite(t).all(), (folder.name, prefix, key)


def test_stop_exits_4_before_the_bad_step_is_saved(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, gradient_steps={5})
    run = tmp_path / "run"
    settings = ["train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=1"]
    argv = ["train", "--config", "configs/tiny.yaml", "--run-dir", str(run), "--tracking-uri", "none"]
    assert cli_main([*argv, *SMALL, *settings]) == NONFINITE_EXIT_CODE == 4
    err = capsys.readouterr().err
    assert "step 5: the gradient norm is not finite (train.on_nonfinite=stop)" in err
    assert f"the newest healthy checkpoint is {run / 'checkpoints' / 'step_0000004'}" in err
    assert "optim.lr" in err and "train.on_nonfinite=skip" in err
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_0000004"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000004"]
    assert_finite(ckpts / "step_0000004")
    rows = metrics(run)
    assert rows[-1]["step"] == 5 and rows[-1]["nonfinite_skips"] == 1
    assert max(r["step"] for r in rows if "loss" in r) == 4  # the bad step logs only its event


@pytest.mark.parametrize("zero", [0, 1])
def test_skip_leaves_the_weights_and_goes_on(tmp_path, monkeypatch, zero):
    """ZeRO-0 in fp32: the torch optimizer's check; ZeRO-1: DeepSpeed's own skip (schedule kept in step).
    Step 1 is skipped too: its checkpoint holds the optimizer state that AdamW had not created yet."""
    poison(monkeypatch, gradient_steps={1, 3})
    settings = ["train.steps=5", "checkpoint.every=1", "checkpoint.keep_last=5", f"optim.zero_stage={zero}"]
    result, rows = train(tmp_path, *settings, "train.on_nonfinite=skip")
    assert result.diverged is None and result.final_step == 5
    ckpts = tmp_path / "run" / "checkpoints"
    state = {s: read_model_state(ckpts / f"step_000000{s}", "") for s in (2, 3, 4)}
    for key, t in state[2].items():
        assert torch.equal(state[3][key], t), key  # weights, master weights, moments, step counts
    assert any(not torch.equal(state[4][k], t) for k, t in state[3].items())  # step 4 updates again
    event = [r for r in rows if "nonfinite" in r]
    assert [(r["step"], r["nonfinite_skips"]) for r in event] == [(1, 1), (3, 2)]
    logged = [r for r in rows if "loss" in r]
    assert [r["nonfinite_skips"] for r in logged] == [1, 1, 2, 2, 2]
    moments = [t for k, t in read_model_state(ckpts / "step_0000001", "optimizer.").items() if "exp_avg" in k]
    assert moments and all(t.eq(0).all() for t in moments)  # as AdamW creates them
    cfg = load_config("configs/tiny.yaml", SMALL).optim
    for r in logged:  # the schedule follows the step number, skipped step included
        assert r["lr"] == pytest.approx(cfg.lr * lr_multiplier(r["step"], cfg, 5)), r["step"]
    assert all(r["loss"] is not None for r in logged) and result.eval_metrics["eval_joint_loss"] < 100
    assert_finite(ckpts / "step_0000005")
    assert "health events: nonfinite_skip x2; the last: step 3 nonfinite_skip" in run_status(tmp_path / "run")


def test_max_nonfinite_skips_in_a_row_stop(tmp_path, monkeypatch):
    poison(monkeypatch, gradient_steps={2, 4, 5})
    settings = ["train.steps=6", "train.on_nonfinite=skip", "train.max_nonfinite_skips=2"]
    result, rows = train(tmp_path, *settings, "checkpoint.every=3")
    assert result.final_step == 5  # not at 4: step 3 was finite, so 2 and 4 are not in a row
    assert "step 5: the gradient norm is not finite, in 2 steps in a row (train.max_nonfinite_skips=2)" in (
        result.diverged
    )
    assert "train.on_nonfinite=skip to skip" not in result.diverged  # it is set already
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / "step_0000003"
    assert [r["nonfinite_skips"] for r in rows if "nonfinite" in r] == [1, 2, 3]


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch, capsys):
    """Weights that turn NaN after step 2's update: its checkpoint is not written, `latest` and retention
    (keep_last=1) leave step 1's, and the next step's loss stops the run."""
    poison(monkeypatch, weight_steps={2})
    result, rows = train(tmp_path, "train.steps=4", "checkpoint.every=1", "checkpoint.keep_last=1")
    assert "step 2: weights or optimizer moments not finite: no checkpoint" in capsys.readouterr().out
    ckpts = tmp_path / "run" / "checkpoints"
    assert result.final_step == 3 and "step 3: the loss is not finite" in result.diverged
    assert (ckpts / "latest").read_text() == "step_0000001" and result.checkpoint == ckpts / "step_0000001"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000001"]
    assert json.loads((ckpts / "step_0000001" / "meta.json").read_text())["healthy"] is True
    assert_finite(ckpts / "step_0000001")


def test_pruning_keeps_the_newest_healthy_checkpoint(tmp_path):
    for step, healthy in [(1, True), (2, True), (3, False), (4, None)]:
        folder = tmp_path / f"step_{step:07d}"
        folder.mkdir()
        meta = {"step": step} | ({} if healthy is None else {"healthy": healthy})
        (folder / "meta.json").write_text(json.dumps(meta))
    prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000002", "step_0000004"]


def test_max_nonfinite_skips_is_validated():
    with pytest.raises(ConfigError, match="train.max_nonfinite_skips=0 must be at least 1"):
        validate_config(load_config(None, ["train.max_nonfinite_skips=0"]), world_size=1)
    with pytest.raises(ConfigError, match="on_nonfinite"):
        load_config(None, ["train.on_nonfinite=ignore"])


def test_the_local_launcher_passes_the_first_failures_status_on(monkeypatch, tmp_path):
    """`cpmtp train --nproc-per-node N` (and `python -m launchers.local`, each node of a Slurm job) exits with
    its ranks' status 4 or 5 (torchrun would report 1); when the ranks differ, the first to fail says why."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from launchers.local import run_local

    def ranks_exit(*codes):
        def run(_):
            missing = str(tmp_path / "no_error_file.json")
            failures = {r: ProcessFailure(r, 100 + r, code, missing) for r, code in enumerate(codes)}
            for r, failure in failures.items():
                failure.timestamp = 1000 + r  # rank 0 failed first
            raise ChildFailedError("launchers.cli", failures)

        return run

    monkeypatch.setattr("signal.signal", lambda *args: None)  # the launcher's SIGUSR2 handler stays out
    monkeypatch.setattr(torch.distributed.run, "run", ranks_exit(NONFINITE_EXIT_CODE, NONFINITE_EXIT_CODE))
    assert run_local(2, ["train"]) == 4
    monkeypatch.setattr(
        torch.distributed.run, "run", ranks_exit(5, -15)
    )  # peers lost; the other rank stopped
    assert run_local(2, ["train"]) == 5
    monkeypatch.setattr(torch.distributed.run, "run", ranks_exit(7, 7))
    assert run_local(2, ["train"]) == 1


class FakeTracker:
    """Records what the trainer does with its MLflow tracker."""

    def __init__(self) -> None:
        self.ended: str | None = None
        self.rows: list[dict] = []

    @property
    def rows_logged(self) -> int:
        return len(self.rows)

    def add_files(self, files) -> None:
        pass

    def log_metrics(self, step, row) -> None:
        self.rows.append(row)

    def close(self, status: str = "FINISHED") -> None:
        self.ended = status

    def discard(self) -> None:
        self.ended = "discarded"


@pytest.mark.parametrize("async_save", [False, True])
def test_a_run_that_raises_releases_its_writer_logger_and_tracker(tmp_path, monkeypatch, async_save):
    """An exception in step 5, after step 4's checkpoint (in the background, maybe still being written: the
    failure drops it, step 2's was finished before it began): the exception reaches the caller, the tracker's
    run ends FAILED, metrics.jsonl is closed and the heartbeat says failed; `latest` names a complete
    checkpoint, never an unfinished one."""
    real_step = trainer.train_step

    def train_step(engine, *args, **kwargs):
        if engine.global_steps == 4:
            raise RuntimeError("injected failure in step 5")
        return real_step(engine, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", train_step)
    cfg = load_config(
        "configs/tiny.yaml", [*SMALL, "train.steps=6", "train.log_every=1", "checkpoint.every=2"]
    )
    cfg.checkpoint.async_save = async_save
    tracker = FakeTracker()
    with pytest.raises(RuntimeError, match="injected failure"):
        trainer.train(cfg, tmp_path / "run", tracker=tracker)
    assert tracker.ended == "FAILED" and tracker.rows_logged == 4
    assert json.loads((tmp_path / "run" / "heartbeat.json").read_text())["state"] == "failed"
    ckpts = tmp_path / "run" / "checkpoints"
    latest = (ckpts / "latest").read_text()
    assert latest == "step_0000004" if not async_save else latest in ("step_0000002", "step_0000004")
    assert verify_checkpoint(ckpts / latest, full=True) is None
    assert_finite(ckpts / latest)
    # Failing before the first step: the tracker's run is left as it is (discarded, not marked).
    tracker = FakeTracker()
    monkeypatch.setattr(
        trainer, "build_training_data", lambda *a, **k: (_ for _ in ()).throw(OSError("disk"))
    )
    with pytest.raises(OSError, match="disk"):
        trainer.train(cfg, tmp_path / "run2", tracker=tracker)
    assert tracker.ended == "discarded"


def feed(monkeypatch, poisoned=(), dropped=()) -> dict[str, set[int]]:
    """Replace the batches of the loader's `poisoned` steps (counted from 1 as the loader serves them) by
    uniformly random tokens, and throw away the batches of its `dropped` steps unseen. Returns the two sets,
    which a test may change before its next run."""
    plan = {"poisoned": set(poisoned), "dropped": set(dropped)}
    real = trainer.build_training_data

    def build(cfg, **kwargs):
        data = real(cfg, **kwargs)
        serve, served = data.loader.next_step, [0]

        def next_step():
            served[0] += 1
            while served[0] in plan["dropped"]:
                serve()
                served[0] += 1
            batches = serve()
            if served[0] in plan["poisoned"]:
                g = torch.Generator().manual_seed(served[0])
                batches = [torch.randint(0, 512, b.shape, generator=g) for b in batches]
            return batches

        data.loader.next_step = next_step
        return data

    monkeypatch.setattr(trainer, "build_training_data", build)
    return plan


SPIKES = [
    "train.steps=20",
    "checkpoint.every=3",
    "train.spike_window=4",
    "train.spike_sigmas=3",
    "train.spike_steps=3",
]


def test_a_spike_rewinds_to_the_checkpoint_before_it_and_skips_its_batches(tmp_path, monkeypatch):
    """Steps 14-16 read random tokens: their loss jumps (about 18.2 against a running mean of 17.6); step 16
    confirms the spike, the run reloads step 12's checkpoint, deletes step 15's (saved inside the spike) and
    trains steps 13-20 on the batches after the spike. It ends exactly as a run that never saw the batches
    of steps 13-16."""
    plan = feed(monkeypatch, poisoned={14, 15, 16})
    cfg = load_config("configs/tiny.yaml", [*SMALL, *SPIKES, "train.spike_rewind=true"])
    validate_config(cfg, world_size=1, cuda_available=False)
    tracker = FakeTracker()
    rewound = trainer.train(cfg, tmp_path / "rewound", tracker=tracker)
    rows = metrics(tmp_path / "rewound")
    [event] = [r for r in rows if "event" in r]
    assert event["event"] == "spike_rewind" and event["step"] == 16 and event["spike_first_step"] == 14
    assert event["rewound_to"] == 12 and event["discarded_checkpoints"] == ["step_0000015"]
    assert event["spike_loss"] > event["spike_running_mean"] + 3 * event["spike_running_std"]
    assert [r["step"] for r in rows if "loss" in r] == [*range(1, 17), *range(13, 21)]
    assert any(r.get("spike_rewinds") == 1 for r in tracker.rows)  # the event reaches MLflow as well
    assert rewound.diverged is None and rewound.final_step == 20
    assert "health events: spike_rewind x1; the last: step 16 spike_rewind" in run_status(
        tmp_path / "rewound"
    )

    plan.update(poisoned=set(), dropped={13, 14, 15, 16})
    cfg = load_config("configs/tiny.yaml", [*SMALL, *SPIKES])
    skipped = trainer.train(cfg, tmp_path / "skipped")
    assert rewound.eval_metrics == skipped.eval_metrics
    got = read_model_state(tmp_path / "rewound" / "checkpoints" / "step_0000020", "")
    want = read_model_state(tmp_path / "skipped" / "checkpoints" / "step_0000020", "")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_spikes_that_rewinds_do_not_cure_stop_the_run(tmp_path, monkeypatch, capsys):
    """Every batch from step 14 on is random: the rewind to step 12 meets more of them, and with
    train.spike_max_rewinds=1 the second spike stops the run (status 4 through `cpmtp train`)."""
    feed(monkeypatch, poisoned=set(range(14, 40)))
    run = tmp_path / "run"
    argv = ["train", "--config", "configs/tiny.yaml", "--run-dir", str(run), "--tracking-uri", "none"]
    settings = [*SPIKES, "train.spike_rewind=true", "train.spike_max_rewinds=1"]
    assert cli_main([*argv, *SMALL, *settings]) == NONFINITE_EXIT_CODE
    err = capsys.readouterr().err
    assert "step 15: the loss" in err and "since step 13, after 1 rewinds (train.spike_max_rewinds=1)" in err
    assert "optim.lr" in err
    assert (run / "checkpoints" / "latest").read_text() == "step_0000012"
    assert [r["event"] for r in metrics(run) if "event" in r] == ["spike_rewind"]


def test_spike_settings_are_validated():
    with pytest.raises(
        ConfigError, match=r"train.spike_rewind=true rewinds to a checkpoint, but checkpoint.every=0"
    ):
        validate_config(load_config(None, ["train.spike_rewind=true", "checkpoint.every=0"]), world_size=1)
    with pytest.raises(ConfigError, match=r"train.spike_window=1 must be at least 2"):
        validate_config(load_config(None, ["train.spike_rewind=true", "train.spike_window=1"]), world_size=1)
