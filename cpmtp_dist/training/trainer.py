"""The trainer: `train()` -> `train_step()` -> `forward_backward()`.

Note: loss normalisation. docs/MODEL.md ("Training loss") asks for the sum of L_t divided by the *global*
number of positions that have at least one target, over all micro-batches and data-parallel ranks, so that
accumulation and data parallelism give the gradient of one big batch. `train_step` therefore counts those
positions for the whole step first (one all-reduce over dp), and each micro-batch back-propagates
`loss_sum * dp / count`: DeepSpeed averages gradients over dp ranks, which the factor dp undoes.
The auxiliary balancing loss is a per-micro-batch statistic and is averaged over micro-batches.
Head-only fine-tuning with distillation (`finetune.distill_weight` = beta) back-propagates
`(1 - beta) * loss_sum + beta * distill_kl_sum` with the same scale: both are sums over the same positions.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from cpmtp_dist.checkpoint_paths import checkpoint_step, resolve_init_checkpoint
from cpmtp_dist.config import Config
from cpmtp_dist.config_io import config_to_dict
from cpmtp_dist.data.loader import make_targets
from cpmtp_dist.data.source import build_training_data
from cpmtp_dist.flops import flops_per_token
from cpmtp_dist.layout import Layout
from cpmtp_dist.model.cp_head import IGNORE_INDEX
from cpmtp_dist.model.cp_loss import CPLossOutput
from cpmtp_dist.model.cp_model import CPModel
from cpmtp_dist.parallel.collectives import all_reduce_
from cpmtp_dist.parallel.deepspeed_experts import apply_deepspeed_expert_parallel
from cpmtp_dist.parallel.layout import (
    DeepSpeedMPU,
    build_expert_shard,
    build_vocab_shard,
    count_parameters,
    global_grad_norm,
)
from cpmtp_dist.parallel.peers import Placement, is_peer_failure, lost_ranks_error
from cpmtp_dist.parallel.pipeline import PipelineStage, prepare_trunk_for_schedule, run_schedule
from cpmtp_dist.parallel.state import ParallelGroups, initialize_parallel
from cpmtp_dist.training.checkpoint import start_checkpoint_writer
from cpmtp_dist.training.checkpointer import Checkpointer, layout_of
from cpmtp_dist.training.finetune import (
    build_teacher,
    freeze_trunk,
    load_initial_weights,
)
from cpmtp_dist.training.memory import LiveTensorBytes, measured_peak_gib, print_plan
from cpmtp_dist.training.metrics import MetricsLogger, entropy, peak_flops
from cpmtp_dist.training.nonfinite import NonFiniteSteps, StepGuard
from cpmtp_dist.training.optim import build_engine
from cpmtp_dist.training.preemption import PreemptionWatch
from cpmtp_dist.training.spikes import Spike, SpikeWatch
from cpmtp_dist.training.tracking import Tracker, maybe_build_tracker, run_files


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    final_metrics: dict[str, Any]
    eval_metrics: dict[str, float]
    checkpoint: Path | None
    preempted: bool = False
    """The run stopped early on SIGTERM / SIGUSR2, after saving `checkpoint`."""
    diverged: str | None = None
    """Why the run stopped diverging (a non-finite step, `train.on_nonfinite`; or a loss spike after
    `train.spike_max_rewinds` rewinds), naming the step and what to try; None if it did not."""


def resolve_precision(cfg: Config) -> tuple[torch.device, torch.dtype]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return device, training_dtype(cfg, device)


def training_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """`train.precision` on `device`: auto is bf16 on GPUs, fp32 on CPUs."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def build_model(
    cfg: Config, groups: ParallelGroups, params_dtype: torch.dtype, device: torch.device
) -> CPModel:
    """This rank's part of the trunk + CP head. The weights are fixed by `train.seed` alone: tensors
    are drawn whole (per name) and sliced, so every layout starts from the single-process weights."""
    vocab = build_vocab_shard(groups, cfg.model.trunk.vocab_size)
    experts = build_expert_shard(groups, cfg.model.cp.rank)
    stage = PipelineStage(groups.pp_rank, groups.pp_size)
    model = CPModel(
        cfg.model,
        vocab=vocab,
        experts=experts,
        stage=stage,
        params_dtype=params_dtype,
        sequence_parallel=cfg.parallel.sequence_parallel,
        seed=cfg.train.seed,
    ).to(device)
    apply_deepspeed_expert_parallel(model, groups)
    if groups.pp_size > 1:
        prepare_trunk_for_schedule(model.trunk, stage, params_dtype)
    return model


def apply_finetune(
    model: CPModel, cfg: Config, groups: ParallelGroups, *, init: Path | None, resuming: bool
) -> str | None:
    """`cfg.finetune` on a freshly built model, before the engine exists: the source checkpoint's weights
    (unless the run resumes from its own checkpoint, which holds them), the frozen trunk, the teacher (on
    resume too: it always comes from `init`). Returns what was done, for the log, or None."""
    ft = cfg.finetune
    notes = []
    if init is not None:
        if resuming:
            notes.append(f"weights from the resumed checkpoint, not from {init}")
        else:
            notes.append(load_initial_weights(model, init, groups, cfg.train.seed))
    if ft.freeze_trunk:
        freeze_trunk(model)
        notes.append("trunk frozen (tied unembedding included): only the CP head trains")
    if ft.distill_weight > 0 and init is not None:
        model.set_teacher(build_teacher(model, init))
        notes.append(f"distilling the head of {init} with weight {ft.distill_weight}")
    return "; ".join(notes) or None


# --------------------------------------------------------------------------------------------------
def objective_sum(out: CPLossOutput, distill_weight: float) -> torch.Tensor:
    """The summed training objective of one micro-batch before normalisation (the auxiliary loss aside):
    the CP loss, or `(1 - beta) * loss_sum + beta * distill_kl_sum` when distilling."""
    if out.distill_kl_sum is None:
        return out.loss_sum
    return (1.0 - distill_weight) * out.loss_sum + distill_weight * out.distill_kl_sum


def forward_backward(
    engine: Any,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    *,
    scale: torch.Tensor,
    aux_weight: float,
    with_accuracy: bool,
    distill_weight: float = 0.0,
) -> tuple[CPLossOutput, torch.Tensor]:
    """One micro-batch: forward, normalised loss, backward. Returns the loss output and L_aux."""
    out: CPLossOutput = engine(tokens, targets, with_accuracy=with_accuracy)
    total = objective_sum(out, distill_weight)
    loss = total * scale.to(total.dtype)
    aux = torch.zeros((), device=tokens.device)
    if out.aux_loss is not None:
        aux = out.aux_loss
        loss = loss + aux_weight * aux / engine.gradient_accumulation_steps()
    engine.backward(loss, scale_wrt_gas=False)
    return out, aux.detach()


def train_step(
    engine: Any,
    micro_batches: list[torch.Tensor],
    cfg: Config,
    groups: ParallelGroups,
    *,
    log_now: bool,
    guard: StepGuard | None = None,
) -> dict[str, Any]:
    """One optimizer step over this rank's micro-batches. On logging steps it returns the step's
    metrics (reduced over dp); otherwise {} and no host synchronisation beyond DeepSpeed's own and
    `guard`'s (which may hold the update back: `training/nonfinite.py`)."""
    n = cfg.model.cp.horizon
    device = next(engine.module.parameters()).device
    pairs = [make_targets(mb.to(device), n, IGNORE_INDEX) for mb in micro_batches]
    count = torch.stack([(tg != IGNORE_INDEX).any(-1).sum() for _, tg in pairs]).sum().double()
    if groups.dp_size > 1:
        all_reduce_(count, groups.dp_group)
    scale = groups.dp_size / count  # a tensor: no host sync
    sums = StatSums(n, cfg.model.cp.rank, device)
    if guard is not None:
        guard.begin([sums.loss, sums.aux, sums.kl], count)  # filled in place by the micro-batches
    if groups.pp_size > 1:
        _pipeline_forward_backward(engine, pairs, cfg, scale=scale, sums=sums, with_accuracy=log_now)
        engine.step()
        if not log_now:
            return {}
        return sums.reduce(groups, num_micro=len(pairs)) | {"grad_norm": float(engine.get_global_grad_norm())}
    norm = None
    for i, (tokens, targets) in enumerate(pairs):
        out, aux = forward_backward(
            engine,
            tokens,
            targets,
            scale=scale,
            aux_weight=cfg.model.cp.aux_loss_weight,
            with_accuracy=log_now,
            distill_weight=cfg.finetune.distill_weight,
        )
        sums.add(out, aux)
        if log_now and i == len(pairs) - 1 and engine.zero_optimization_stage() == 0:
            # Without ZeRO, DeepSpeed clips but does not keep the norm: measure it before the step.
            norm = global_grad_norm(engine.module, groups)
        engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
    if not log_now:
        return {}
    norm = engine.get_global_grad_norm() if norm is None else norm
    return sums.reduce(groups, num_micro=len(pairs)) | {
        "grad_norm": float("nan") if norm is None else float(norm)
    }


def _pipeline_forward_backward(
    engine: Any,
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: Config,
    *,
    scale: torch.Tensor | None,
    sums: StatSums,
    with_accuracy: bool,
) -> None:
    """Forward and backward of a step's micro-batches through the pipeline (1F1B); the loss, as in
    `forward_backward`, on the last stage. `scale=None` runs forward only (evaluation)."""
    model: CPModel = engine.module
    aux_weight = cfg.model.cp.aux_loss_weight

    def loss_func(pair: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor):
        out = model.loss_from_output(output, pair[1], with_accuracy=with_accuracy)
        aux = torch.zeros((), device=output.device)
        total = objective_sum(out, cfg.finetune.distill_weight)
        loss = total if scale is None else total * scale.to(total.dtype)
        if out.aux_loss is not None and scale is not None:
            aux = out.aux_loss
            loss = loss + aux_weight * aux / len(pairs)
        sums.add(out, aux.detach())
        return loss, torch.ones((), dtype=torch.int), None  # the schedule's token count is not used

    run_schedule(
        model.trunk,
        pairs,
        stage_forward=lambda pair: model.stage_output(pair[0]),
        loss_func=loss_func,
        seq_length=cfg.model.trunk.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        forward_only=scale is None,
        engine=engine,
    )


@torch.no_grad()
def evaluate(
    engine: Any, batches: list[torch.Tensor], cfg: Config, groups: ParallelGroups
) -> dict[str, float]:
    """Held-out joint loss, next-token loss and perplexity, per-head accuracy."""
    model: CPModel = engine.module
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = StatSums(cfg.model.cp.horizon, cfg.model.cp.rank, device)
    pairs = [make_targets(mb.to(device), cfg.model.cp.horizon, IGNORE_INDEX) for mb in batches]
    if groups.pp_size > 1:
        _pipeline_forward_backward(engine, pairs, cfg, scale=None, sums=sums, with_accuracy=True)
    else:
        for tokens, targets in pairs:
            sums.add(model(tokens, targets, with_accuracy=True), torch.zeros((), device=device))
    model.train(was_training)
    stats = sums.reduce(groups, num_micro=len(batches))
    keys = ["joint_loss", "ntp_loss"] + [f"acc_head_{s + 1}" for s in range(cfg.model.cp.horizon)]
    out = {f"eval_{k}": stats[k] for k in keys}
    out["eval_ntp_ppl"] = math.exp(min(stats["ntp_loss"], 50.0))
    return out


class StatSums:
    """Sums of the loss statistics over micro-batches, all-reduced over dp when read."""

    def __init__(self, n: int, r: int, device: torch.device) -> None:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.loss, self.positions, self.aux, self.kl = z(()), z(()), z(()), z(())
        self.head_nll, self.head_count, self.head_correct, self.usage = z(n), z(n), z(n), z(r)
        self.distill = False  # whether a micro-batch carried the distillation KL

    def add(self, out: CPLossOutput, aux: torch.Tensor) -> None:
        self.loss += out.loss_sum.detach().double()
        self.positions += out.num_positions.double()
        self.aux += aux.double()
        self.head_nll += out.head_nll_sum.double()
        self.head_count += out.head_count.double()
        if out.head_correct is not None:
            self.head_correct += out.head_correct.double()
        self.usage += out.responsibilities.sum(0).double()
        if out.distill_kl_sum is not None:
            self.kl += out.distill_kl_sum.detach().double()
            self.distill = True

    def reduce(self, groups: ParallelGroups, *, num_micro: int) -> dict[str, Any]:
        """The statistics of the whole step (all dp ranks), on every rank. Under pipeline parallelism
        they exist on the last stage only, which sends them to the others."""
        flat = torch.cat([t.reshape(-1) for t in self._tensors()])
        if groups.dp_size > 1:
            all_reduce_(flat, groups.dp_group)
        if groups.pp_size > 1:
            if not groups.is_last_stage:
                flat.zero_()
            all_reduce_(flat, groups.pp_group)
        loss, positions, aux, kl, *rest = flat.tolist()
        n, r = len(self.head_nll), len(self.usage)
        head_nll, head_count = rest[:n], rest[n : 2 * n]
        head_correct, usage = rest[2 * n : 3 * n], rest[3 * n : 3 * n + r]
        usage_t = torch.tensor(usage) / max(positions, 1.0)
        joint = loss / max(positions, 1.0)
        aux_mean = aux / (num_micro * groups.dp_size)
        metrics: dict[str, Any] = {
            "joint_loss": joint,
            "ntp_loss": head_nll[0] / max(head_count[0], 1.0),
            "aux_loss": aux_mean,
            "expert_usage": [round(u, 5) for u in usage_t.tolist()],
            "expert_usage_entropy": entropy(usage_t),
        }
        if self.distill:
            metrics["distill_kl"] = kl / max(positions, 1.0)  # per position, as the joint loss
        for s in range(n):
            metrics[f"head_loss_{s + 1}"] = head_nll[s] / max(head_count[s], 1.0)
            metrics[f"acc_head_{s + 1}"] = head_correct[s] / max(head_count[s], 1.0)
        return metrics

    def _tensors(self) -> list[torch.Tensor]:
        return [
            self.loss,
            self.positions,
            self.aux,
            self.kl,
            self.head_nll,
            self.head_count,
            self.head_correct,
            self.usage,
        ]


def optimizer_state_bytes(engine: Any) -> int:
    """Bytes of optimizer state (Adam moments) held by this rank; under ZeRO-1/2 DeepSpeed hands the
    torch optimizer only this rank's partition of the flattened parameters."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)  # DeepSpeed's ZeRO wrapper holds the torch optimizer
    total = sum(
        v.numel() * v.element_size() for st in base.state.values() for v in st.values() if torch.is_tensor(v)
    )
    return int(total)


def drop_metrics_after(path: Path, step: int) -> None:
    """Keep the rows of steps <= `step`: a resumed run logs the later steps again."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


# --------------------------------------------------------------------------------------------------
def train(
    cfg: Config, run_dir: Path, *, resume: Path | None = None, tracker: Tracker | None = None
) -> TrainResult:
    """`_train` below; with `train.measure_memory` on a CPU, under the tensor-memory meter."""
    meter = LiveTensorBytes() if cfg.train.measure_memory and not torch.cuda.is_available() else None
    with meter or contextlib.nullcontext():
        return _train(cfg, run_dir, resume=resume, tracker=tracker, meter=meter)


@dataclass
class _Run:
    """One run while it trains: what `_train` builds and `_loop` uses."""

    cfg: Config
    run_dir: Path
    groups: ParallelGroups
    engine: Any
    loader: Any
    valid: list[torch.Tensor]
    device: torch.device
    ckpt: Checkpointer
    logger: MetricsLogger
    meter: LiveTensorBytes | None

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.model.trunk.seq_length


def _train(
    cfg: Config,
    run_dir: Path,
    *,
    resume: Path | None = None,
    tracker: Tracker | None = None,
    meter: LiveTensorBytes | None = None,
) -> TrainResult:
    """Train `cfg` and write the run directory (config, metrics, checkpoints), tracked in MLflow by
    `tracker` (`cpmtp train` starts it early), or else as `cfg.tracking` says.

    With `resume` (a checkpoint folder, saved at any layout) training continues after the checkpoint's
    step with the model, optimizer, scheduler, data-loader position and generator states it holds, so the
    steps that follow are those of an uninterrupted run. However training ends, the checkpoint writer, the
    metrics logger and the tracker are released (on an exception: the run is marked failed).
    """
    ckpt: Checkpointer | None = None
    logger: MetricsLogger | None = None
    done = False
    try:
        # First: a missing source checkpoint must fail before anything is built.
        init = resolve_init_checkpoint(cfg.finetune.init_from) if cfg.finetune.init_from is not None else None
        start_checkpoint_writer()  # it forks a small helper process
        par = cfg.parallel  # validated by config_io.validate_config before any group exists
        groups = initialize_parallel(par.tp, par.pp, par.ep, seed=cfg.train.seed, timeout_s=par.timeout_s)
        placement = Placement.gather() if groups.world_size > 1 else None
        is_logger = groups.rank == 0
        run_dir.mkdir(parents=True, exist_ok=True)
        config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
        if is_logger:
            (run_dir / "config.yaml").write_text(config_yaml)
        if tracker is None:
            tracker = maybe_build_tracker(
                cfg.tracking, run_dir, enabled=is_logger, params=config_to_dict(cfg)
            )
        engine, data, device = _build(cfg, groups, run_dir, tracker, meter, init, resuming=resume is not None)
        ckpt = Checkpointer(
            run_dir,
            cfg,
            engine=engine,
            groups=groups,
            loader=data.loader,
            device=device,
            tokenizer_dir=data.tokenizer_dir,
            config_yaml=config_yaml,
        )
        start = 0 if resume is None else _resume(ckpt, resume, run_dir, announce=is_logger)
        logger = MetricsLogger(
            run_dir, enabled=is_logger, total_steps=cfg.train.steps, start_step=start, tracker=tracker
        )
        run = _Run(cfg, run_dir, groups, engine, data.loader, data.valid, device, ckpt, logger, meter)
        result = _loop_naming_lost_peers(run, start, placement)
        done = True
        return result
    finally:
        if ckpt is not None:
            ckpt.close(failed=not done)
        if not done and logger is not None:
            logger.close(status="FAILED")  # and the tracker's run
        elif not done and tracker is not None:
            tracker.discard()  # failed before training: the MLflow run is left as it is


def _build(
    cfg: Config,
    groups: ParallelGroups,
    run_dir: Path,
    tracker: Tracker | None,
    meter: LiveTensorBytes | None,
    init: Path | None,
    *,
    resuming: bool,
) -> tuple[Any, Any, torch.device]:
    """The data, the model (with `cfg.finetune` applied) and its DeepSpeed engine; prints the run's summary."""
    is_logger = groups.rank == 0
    device, dtype = resolve_precision(cfg)
    data = build_training_data(cfg, dp_rank=groups.dp_rank, dp_size=groups.dp_size)
    if tracker is not None:
        tracker.add_files(run_files(run_dir, data.tokenizer_dir, cfg.data.path))
    t = cfg.train
    grad_accum = Layout.of(cfg, groups.world_size).grad_accum
    if meter is not None:
        meter.forget()  # the model, optimizer and steps: what `cpmtp plan` estimates
    model = build_model(cfg, groups, dtype, device)
    finetune_note = apply_finetune(model, cfg, groups, init=init, resuming=resuming)
    # Under pp, Megatron's schedule runs the micro-batches: DeepSpeed sees one batch per step.
    pipelined = groups.pp_size > 1
    engine = build_engine(
        model,
        cfg.optim,
        total_steps=t.steps,
        micro_batch_size=t.micro_batch_size * grad_accum if pipelined else t.micro_batch_size,
        grad_accum=1 if pipelined else grad_accum,
        dp=groups.dp_size,
        bf16=dtype == torch.bfloat16,
        pipelined=pipelined,
        mpu=DeepSpeedMPU(groups),
    )
    n_params = count_parameters(model, groups)
    print_plan(cfg, groups.world_size, device, enabled=is_logger)
    if is_logger:
        tokens_per_step = t.global_batch_size * cfg.model.trunk.seq_length
        print(
            f"model: {n_params / 1e6:.2f}M parameters, n={cfg.model.cp.horizon} r={cfg.model.cp.rank} "
            f"({cfg.model.cp.parameterisation}); data: {data.description}, "
            f"vocab {data.tokenizer.vocab_size}; {t.steps} steps of {tokens_per_step:,} tokens on {device}, "
            f"tp={groups.tp_size} pp={groups.pp_size} ep={groups.ep_size} dp={groups.dp_size}, accumulation {grad_accum}",
            flush=True,
        )
        if finetune_note is not None:
            print(f"finetune: {finetune_note}", flush=True)
        if data.shortfall is not None:
            print(
                f"warning: {data.shortfall}: training goes on without held-out evaluation; rebuild the shards "
                "with a larger --heldout-fraction to evaluate",
                flush=True,
            )
    return engine, data, device


def _resume(ckpt: Checkpointer, folder: Path, run_dir: Path, *, announce: bool) -> int:
    """Check and restore checkpoint `folder` (`Checkpointer.check`, `restore`); the step it holds."""
    tic = time.perf_counter()
    ckpt.check(folder)
    start, meta = ckpt.restore(folder)
    if announce:
        drop_metrics_after(run_dir / "metrics.jsonl", start)
        saved = meta["layout"]
        changed = "" if saved == layout_of(ckpt.groups, ckpt.cfg) else f", resharded from layout {saved}"
        took = time.perf_counter() - tic
        print(f"resumed from {folder} at step {start}{changed} ({took:.2f} s)", flush=True)
    return start


def _loop_naming_lost_peers(run: _Run, start: int, placement: Placement | None) -> TrainResult:
    """`_loop`; when a collective fails because peers are gone, `PeersLost` naming them (parallel/peers.py)."""
    try:
        return _loop(run, start)
    except RuntimeError as err:
        lost = None
        if placement is not None and is_peer_failure(err):
            lost = lost_ranks_error(err, placement, run.groups.rank, run.cfg.parallel.timeout_s)
        if lost is None:
            raise
        raise lost from err


def _loop(run: _Run, start: int) -> TrainResult:
    """The training steps after step `start`, the final evaluation and checkpoint."""
    cfg, t, logger, ckpt = run.cfg, run.cfg.train, run.logger, run.ckpt
    metrics: dict[str, Any] = {}
    tic = time.perf_counter()
    watch = PreemptionWatch(run.device)
    guard = StepGuard(run.engine, watch, run.device, loss_copies=run.groups.tp_size)
    nonfinite = NonFiniteSteps(t.on_nonfinite, t.max_nonfinite_skips, logger)
    spikes = None
    if t.spike_rewind:
        spikes = SpikeWatch(t.spike_sigmas, t.spike_steps, t.spike_window, t.spike_max_rewinds)
    if run.meter is not None:
        run.meter.reset_peak()  # the training steps' peak, not the weights' construction
    with watch:
        step = start
        while step < t.steps:
            step += 1
            log_now = step % t.log_every == 0 or step == t.steps
            metrics = train_step(
                run.engine, run.loader.next_step(), cfg, run.groups, log_now=log_now, guard=guard
            )
            outcome = guard.end()
            if nonfinite.after_step(step, outcome.nonfinite):
                healthy = ckpt.newest_healthy()  # an earlier checkpoint being written is finished first
                return _diverged(run, step, healthy, nonfinite.stop_message(step, healthy, cfg.optim.lr))
            if log_now:
                metrics |= _logged_metrics(run, metrics, step, since=tic)
                metrics |= nonfinite.metrics() | (spikes.metrics() if spikes is not None else {})
                logger.log(step, metrics)
                tic = time.perf_counter()
            spike = spikes.observe(step, outcome.loss) if spikes is not None else None
            if spike is not None and spikes.rewinds >= spikes.max_rewinds:
                message = spikes.stop_message(spike, cfg.optim.lr)
                return _diverged(run, step, ckpt.newest_healthy(before=spike.first_step), message)
            if spike is not None and (back_to := _rewind(run, spikes, spike)) is not None:
                step, tic = back_to, time.perf_counter()
                continue
            if t.eval_every and step % t.eval_every == 0 and step != t.steps and run.valid:
                logger.log(step, evaluate(run.engine, run.valid, cfg, run.groups))
            ckpt.save_if_due(step)
            if outcome.preempted:
                last = ckpt.ensure_saved(step)
                ckpt.close()
                if run.groups.rank == 0:
                    print(f"preempted: checkpoint {last} saved after step {step}", flush=True)
                logger.close(status="KILLED")
                return TrainResult(run.run_dir, step, metrics, {}, last, preempted=True)
    eval_metrics: dict[str, float] = {}
    if run.valid:
        eval_metrics = evaluate(run.engine, run.valid, cfg, run.groups)
        logger.log(t.steps, eval_metrics)
    last = ckpt.ensure_saved(t.steps)
    ckpt.close()
    logger.close()
    return TrainResult(run.run_dir, t.steps, metrics, eval_metrics, last)


def _diverged(run: _Run, step: int, healthy: Path | None, message: str) -> TrainResult:
    """End training at step `step` without a checkpoint of it: the run diverged (`TrainResult.diverged`)."""
    run.ckpt.close()
    run.logger.close(status="FAILED")
    return TrainResult(run.run_dir, step, {}, {}, healthy, diverged=message)


def _rewind(run: _Run, spikes: SpikeWatch, spike: Spike) -> int | None:
    """Rewind a confirmed loss spike (`training/spikes.py`): reload the newest healthy checkpoint saved before
    it and delete the newer ones; the loader stays where it is. Returns the checkpoint's step, which training
    goes on after, or None when no checkpoint precedes the spike (a warning; training goes on)."""
    announce = run.groups.rank == 0
    target = run.ckpt.newest_healthy(before=spike.first_step)
    if target is None:
        if announce:
            print(
                f"warning: step {spike.step}: loss spike, but no checkpoint before step {spike.first_step}",
                flush=True,
            )
        run.logger.log(spike.step, spikes.event(spike, None, []))
        return None
    discarded = run.ckpt.discard_after(checkpoint_step(target))
    back_to, _ = run.ckpt.restore(target, data=False)
    spikes.rewinds += 1
    run.logger.log(spike.step, spikes.event(spike, back_to, discarded))
    if announce:
        print(
            f"step {spike.step}: loss spike since step {spike.first_step} ({spike.loss:.4f}, running mean "
            f"{spike.mean:.4f} ± {spike.std:.4f}): rewound to {target.name}, skipping the data of steps "
            f"{back_to + 1}-{spike.step}" + (f"; deleted {', '.join(discarded)}" if discarded else ""),
            flush=True,
        )
    return back_to


def _logged_metrics(run: _Run, metrics: dict[str, Any], step: int, *, since: float) -> dict[str, Any]:
    """What a logging step adds to `train_step`'s metrics: the objective, learning rate, throughput, MFU,
    memory, skipped shards; the throughput of the steps since `time.perf_counter()` was `since`."""
    cfg, t, device = run.cfg, run.cfg.train, run.device
    if device.type == "cuda":
        torch.cuda.synchronize()  # the steps' kernels are done: the time is theirs
    elapsed = time.perf_counter() - since
    steps_done = t.log_every if step % t.log_every == 0 else step % t.log_every
    tps = run.tokens_per_step * steps_done / elapsed
    beta = cfg.finetune.distill_weight
    objective = metrics["joint_loss"]
    if "distill_kl" in metrics:
        objective = (1 - beta) * objective + beta * metrics["distill_kl"]
    out = {
        "loss": objective + cfg.model.cp.aux_loss_weight * metrics["aux_loss"],
        "lr": run.engine.get_lr()[0],
        "tokens_per_s": tps,
        "tokens_seen": step * run.tokens_per_step,
    }
    skipped = getattr(run.loader, "skipped_shards", None)
    if skipped is not None:
        out["data_skipped_shards"] = skipped
    if step == t.log_every or step == t.steps:
        out["optim_state_mib_rank0"] = optimizer_state_bytes(run.engine) / 2**20
    peak = peak_flops(device, t.peak_tflops)
    if peak is not None:
        flops = flops_per_token(cfg.model, freeze_trunk=cfg.finetune.freeze_trunk)
        world = run.groups.world_size
        out["mfu"] = tps * flops.model / (peak * world)
        out["hfu"] = tps * flops.hardware / (peak * world)
        out["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if t.measure_memory:
        out["measured_memory_gib"] = measured_peak_gib(run.meter, device)
    return out
