"""Memory and FLOPs of a training layout, estimated from the config alone (`cpmtp plan`; no torch).

Per rank, in bytes: the parameters this rank holds (tp, pp and ep sharding), their gradients and the
optimizer's state under the ZeRO stage and precision (the DeepSpeed optimizer `training/optim.py` builds),
DeepSpeed's gradient buckets, the activations the backward keeps, the chunked CP loss's buffers and the
KV cache of one decoded sequence. The largest stage of a pipeline is reported (the first keeps the most
activations, the last holds the head and the loss).

Note: where the activation counts come from. Per transformer layer and token, the tensors autograd keeps
(read off `saved_tensors_hooks` on the Megatron layer this project builds, `docs/PLAN.md`): each torch
RMSNorm/LayerNorm keeps its input, the normalised input and its output (3d); attention keeps q, k, v and
its output, with sdpa (flash kernels: no s x s scores) either k after RoPE and the whole fused QKV output
(which v is a view of) or, under grouped-query attention, the repeated k and v (4d); `local` attention also
keeps the softmax (heads x s per token); the GELU MLP its two f-wide activations (2f), the gated SwiGLU
MLP the fused first projection and three f-wide intermediates (5f). Tensor parallelism splits everything
but the norms, sequence parallelism the norms too (Korthikanti et al. 2022). Under 1F1B the first
pipeline stage holds min(pp, micro-batches) micro-batches in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from cpmtp_dist.config import Config
from cpmtp_dist.flops import flops_per_token, forward_flops_per_token
from cpmtp_dist.layout import Layout

__all__ = [
    "Candidate",
    "MemoryEstimate",
    "candidate_layouts",
    "estimate",
    "one_line",
    "optimizer_bytes",
    "params_per_rank",
    "step_flops_per_rank",
]

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank of the most loaded rank of a layout, and what the estimate assumes."""

    params: float
    grads: float
    optimizer: float
    buffers: float
    """DeepSpeed's gradient staging buckets (ZeRO 1/2 with contiguous gradients)."""
    activations: float
    cp_loss: float
    """The chunked CP loss: the chunk of logits and its gradient, its per-position buffers and the fp32
    gradient accumulators of the head and of the unembedding."""
    kv_cache: float
    """Decoding one sequence of seq_length tokens in one process (not part of the training total)."""
    assumptions: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total(self) -> float:
        """Training peak: everything but the KV cache."""
        return self.params + self.grads + self.optimizer + self.buffers + self.activations + self.cp_loss


def _bf16(cfg: Config, cuda: bool) -> bool:
    precision = cfg.train.precision
    return precision == "bf16" or (precision == "auto" and cuda)


def params_per_rank(cfg: Config, tp: int, pp: int, ep: int, stage: int) -> tuple[int, int]:
    """(trunk, head) parameters on a rank of pipeline stage `stage` (0-based) under tp and ep sharding:
    layers split over stages; attention, MLP and vocabulary over tp (norms replicated); the embedding on
    the first stage, the output layer (untied, or the tied copy when pp > 1) on the last; the CP head on the
    last stage, its components over ep, its `separate` unembeddings by vocabulary over tp, the gate and
    `shared` φ maps replicated over tp."""
    t, c = cfg.model.trunk, cfg.model.cp
    d, v = t.hidden_size, t.vocab_size
    f = t.ffn_hidden_size or 4 * d
    kv = d * (t.num_query_groups or t.num_attention_heads) // t.num_attention_heads
    layer = (d + 2 * kv) * d // tp + d * d // tp + (3 if t.mlp == "swiglu" else 2) * f * d // tp + 2 * d
    first, last = stage == 0, stage == pp - 1
    trunk = t.num_layers // pp * layer + (v * d // tp if first else 0)
    if last:
        trunk += d + (v * d // tp if t.untie_embeddings or pp > 1 else 0)
    head = 0
    if last:
        r_local = c.rank // ep
        if c.parameterisation == "separate":
            per = v // tp * d
        elif c.phi == "residual":
            per = 2 * (c.phi_hidden_size or d) * d
        else:
            per = d * d
        head = c.rank * d + c.rank + r_local * c.horizon * per
    return trunk, head


def optimizer_bytes(
    cfg: Config, p: float, dp: int, bf16: bool, pipelined: bool
) -> tuple[float, float, float]:
    """(gradients, optimizer state, buckets) in bytes for p parameters on this rank.

    fp32: ZeRO-0 is the client AdamW (fp32 .grad, m, v); ZeRO 1/2 is DeepSpeedZeroOptimizer, which keeps an
    fp32 master partition (p/dp, a copy even of fp32 weights), m and v of it, the full .grad under ZeRO-1 and
    only an fp32 gradient partition under ZeRO-2. bf16: ZeRO-0 steps fp32 copies of every weight; ZeRO-1 with fp32
    accumulation is BF16_Optimizer (a full fp32 gradient accumulator besides the bf16 .grad); otherwise as
    fp32 with bf16 .grad. The buckets: `reduce_bucket_size` elements of the weights' dtype (DeepSpeed stages
    fp32 only for ZeRO-1 with fp32 accumulation, which is BF16_Optimizer here), twice with overlap_comm (ZeRO-2
    only), under ZeRO 1/2 with contiguous gradients."""
    opt, stage = cfg.optim, cfg.optim.zero_stage
    e = 2 if bf16 else 4
    if stage == 0:
        master = 4 * p if bf16 else 0.0
        return e * p, master + 8 * p, 0.0
    state = 12 * p / dp  # fp32 master partition, m, v
    bf16_optimizer = bf16 and stage == 1 and not pipelined and opt.grad_accum_dtype in ("auto", "fp32")
    if bf16_optimizer:
        return e * p + 4 * p, state, 0.0
    grads = 4 * p / dp if stage == 2 else e * p  # ZeRO-2 frees each .grad once it is in the partition
    buckets = 0.0
    if opt.contiguous_gradients:
        buckets = e * opt.reduce_bucket_size * (2 if opt.overlap_comm and stage == 2 else 1)
    return grads, state, buckets


def _layer_activations(cfg: Config, tp: int, sp: bool) -> float:
    """Elements kept per token by one transformer layer (see the module's note)."""
    t = cfg.model.trunk
    d, heads, s = t.hidden_size, t.num_attention_heads, t.seq_length
    f = t.ffn_hidden_size or 4 * d
    kv = d * (t.num_query_groups or heads) // heads
    norms = 2 * 3 * d / (tp if sp else 1)
    attention = 4 * d if kv < d else 2 * d + (d + 2 * kv) + d
    if t.attention == "local":
        attention += heads * s  # the softmax, b * heads * s * s
    mlp = 5 * f if t.mlp == "swiglu" else 2 * f
    return norms + (attention + mlp) / tp


def _activations(cfg: Config, tp: int, pp: int, stage: int, in_flight: int, e: int) -> float:
    """Bytes of trunk activations kept on pipeline stage `stage` for `in_flight` micro-batches."""
    t = cfg.model.trunk
    tokens = cfg.train.micro_batch_size * t.seq_length
    sp = cfg.parallel.sequence_parallel
    per_token = t.num_layers // pp * _layer_activations(cfg, tp, sp)
    if stage == pp - 1:
        per_token += 3 * t.hidden_size / (tp if sp else 1)  # the final norm
    return e * tokens * per_token * in_flight


def _cp_loss(cfg: Config, tp: int, ep: int, e: int, head_params: int, trunk_trained: bool) -> float:
    """Bytes of the chunked CP loss of one micro-batch (`model/cp_loss.py`): what its forward saves (the
    head's batch-first copy of h and the ep group's gathered rows, targets in int64, responsibilities and
    log-normalisers in fp32) and its per-position outputs, plus the larger of the forward's chunk (the
    logits, their fp32 copy in a bf16 run, logsumexp's fp32 temporaries, the accuracy's mixture on logging
    steps) and the backward's buffers (fp32
    gradients of the rows, of every head parameter and of the unembedding; the chunk's logits, in a bf16
    run their fp32 copy, which becomes the logits' gradient in place, and its bf16 cast)."""
    t, c = cfg.model.trunk, cfg.model.cp
    d, v_local = t.hidden_size, t.vocab_size // tp
    rows = cfg.train.micro_batch_size * t.seq_length
    rows_all = rows * ep
    r_local = c.rank // ep
    saved = rows_all * (e * d * (2 if ep > 1 else 1) + 8 * c.horizon + 4 * c.rank + 4 * r_local * c.horizon)
    outputs = rows * 3 * 4 * c.rank  # log w, l and gamma of this rank's rows
    chunk = min(c.chunk_tokens, rows_all) * v_local
    # Forward: the logits (and their fp32 copy in bf16), logsumexp's temporary (two under tp: the shifted
    # logits and their exponential), and on logging steps the fp32 mixture the accuracy is read from (the
    # first component's exponentiated logits, kept while the others are added: with two or more here).
    forward = chunk * ((4 if e == 4 else e + 4) + (8 if tp > 1 else 4) + (4 if r_local > 1 else 0))
    backward = 4 * rows_all * d + 4 * head_params + chunk * (4 if e == 4 else e + 4 + e)
    if trunk_trained and c.parameterisation == "shared":
        backward += 4 * v_local * d  # the accumulator of U's gradient
    return saved + outputs + max(forward, backward)


def _kv_cache(cfg: Config, e: int) -> float:
    """Megatron's static KV cache for one sequence of seq_length positions: keys and values per layer."""
    t = cfg.model.trunk
    kv = t.hidden_size * (t.num_query_groups or t.num_attention_heads) // t.num_attention_heads
    return float(2 * t.num_layers * t.seq_length * kv * e)


def estimate(cfg: Config, world_size: int, *, cuda: bool = True) -> MemoryEstimate:
    """Memory per rank of `cfg` on `world_size` ranks: the pipeline stage with the largest total. `cuda`:
    the run is on GPUs (`train.precision` auto is bf16 there, fp32 on CPUs). Raises ValueError when the
    world size does not fit the config (`Layout.problems`)."""
    par = cfg.parallel
    layout = Layout.of(cfg, world_size)
    dp, accum = layout.dp, layout.grad_accum
    bf16 = _bf16(cfg, cuda)
    e = 2 if bf16 else 4
    trained = not cfg.finetune.freeze_trunk
    best: MemoryEstimate | None = None
    for stage in range(par.pp):
        trunk, head = params_per_rank(cfg, par.tp, par.pp, par.ep, stage)
        trainable = (trunk if trained else 0) + head
        grads, optimizer, buffers = optimizer_bytes(cfg, trainable, dp, bf16, par.pp > 1)
        if head and par.ep > 1:  # the components' optimizer state is sharded over dp / ep only
            extra = 12 * head * (1 / layout.expert_dp - 1 / dp) if cfg.optim.zero_stage else 0.0
            optimizer += extra
        in_flight = min(par.pp - stage, accum)  # 1F1B: stage k holds pp - k micro-batches
        est = MemoryEstimate(
            params=float(e * (trunk + head)),
            grads=grads,
            optimizer=optimizer,
            buffers=buffers,
            activations=_activations(cfg, par.tp, par.pp, stage, in_flight, e),
            cp_loss=_cp_loss(cfg, par.tp, par.ep, e, head, trained) if head else 0.0,
            kv_cache=_kv_cache(cfg, e),
            assumptions=(
                f"{'bf16' if bf16 else 'fp32'} weights, ZeRO-{cfg.optim.zero_stage}, dp {dp}, pipeline stage "
                f"{stage + 1} of {par.pp} with {in_flight} micro-batch(es) of {cfg.train.micro_batch_size} "
                "in flight",
            ),
        )
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best


def step_flops_per_rank(cfg: Config, world_size: int) -> float:
    """Model FLOPs of one optimizer step on the busiest rank: a data-parallel replica's tokens, its pipeline
    stage's layers (the last also the CP head), split over tp. (ep shares out the components, but each rank
    then scores the rows of its whole ep group: the head's FLOPs per rank do not change.)"""
    t, par = cfg.model.trunk, cfg.parallel
    layout = Layout.of(cfg, world_size)
    tokens = cfg.train.global_batch_size * t.seq_length / layout.dp
    total = flops_per_token(cfg.model, freeze_trunk=cfg.finetune.freeze_trunk).model
    trunk_fwd, head_fwd = forward_flops_per_token(cfg.model)
    head = total * head_fwd / (trunk_fwd + head_fwd)
    trunk = total - head
    last_stage = trunk / par.pp + head
    return tokens * last_stage / par.tp


def one_line(est: MemoryEstimate, device_gib: float | None = None) -> str:
    """`plan: 31.20 GiB/rank (params 2.10, grads 2.10, ...) of 80 GiB`: what `cpmtp train` prints (in MiB
    below 1 GiB)."""
    unit, scale = ("GiB", GIB) if est.total >= GIB else ("MiB", 2**20)
    parts = [
        ("params", est.params),
        ("grads", est.grads),
        ("optimizer", est.optimizer),
        ("buckets", est.buffers),
        ("activations", est.activations),
        ("cp loss", est.cp_loss),
    ]
    inner = ", ".join(f"{name} {value / scale:.2f}" for name, value in parts)
    tail = f" of {device_gib:.0f} GiB" if device_gib else ""
    return f"plan: {est.total / scale:.2f} {unit}/rank ({inner}){tail}"


@dataclass(frozen=True)
class Candidate:
    """One layout of a config on a cluster, with its estimate."""

    tp: int
    pp: int
    ep: int
    dp: int
    micro_batch_size: int
    grad_accum: int
    zero_stage: int
    sequence_parallel: bool
    memory: MemoryEstimate
    step_flops: float
    """Model FLOPs of one optimizer step on the busiest rank (`step_flops_per_rank`)."""
    fits: bool

    def overrides(self) -> list[str]:
        """The `cpmtp train` overrides that select this layout."""
        return [
            f"parallel.tp={self.tp}",
            f"parallel.pp={self.pp}",
            f"parallel.ep={self.ep}",
            f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
            f"train.micro_batch_size={self.micro_batch_size}",
            f"optim.zero_stage={self.zero_stage}",
        ]


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _shapes_fit(cfg: Config, tp: int, pp: int, ep: int) -> bool:
    """Whether the model splits evenly (the shape checks of `validate_config`)."""
    t = cfg.model.trunk
    widths = [
        t.num_attention_heads,
        t.num_query_groups or 1,
        t.vocab_size,
        t.ffn_hidden_size or 4 * t.hidden_size,
    ]
    return all(w % tp == 0 for w in widths) and t.num_layers % pp == 0 and cfg.model.cp.rank % ep == 0


def candidate_layouts(cfg: Config, nodes: int, gpus_per_node: int, gpu_memory_gib: float) -> list[Candidate]:
    """Every layout of `cfg` on `nodes` x `gpus_per_node` GPUs (tp within a node, pp dividing the layers, ep
    dividing dp and the rank, any micro-batch dividing the batch per replica; sequence parallelism with
    tp > 1; ZeRO-1 at least where pp or ep need it), the fitting ones first, each group ranked by the model
    FLOPs the busiest rank does per step; among equals, less model parallelism (tp * pp, then ep: less
    communication) and then the larger micro-batch (larger matmuls) come first."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"--nodes {nodes} and --gpus-per-node {gpus_per_node} must be at least 1")
    world, limit = nodes * gpus_per_node, gpu_memory_gib * GIB
    out = []
    for tp in _divisors(gpus_per_node):
        for pp in _divisors(cfg.model.trunk.num_layers):
            if world % (tp * pp):
                continue
            dp = world // (tp * pp)
            for ep in _divisors(dp):
                if not _shapes_fit(cfg, tp, pp, ep) or cfg.train.global_batch_size % dp:
                    continue
                for mbs in _divisors(cfg.train.global_batch_size // dp):
                    candidate = _candidate(cfg, world, tp, pp, ep, mbs, limit)
                    if candidate is not None:
                        out.append(candidate)
    return sorted(out, key=lambda c: (not c.fits, c.step_flops, c.tp * c.pp, c.ep, -c.micro_batch_size))


def _candidate(
    cfg: Config, world: int, tp: int, pp: int, ep: int, mbs: int, limit: float
) -> Candidate | None:
    sp = tp > 1 and cfg.model.trunk.seq_length % tp == 0
    zero = max(cfg.optim.zero_stage, 1 if pp > 1 or ep > 1 else 0)
    trial = replace(
        cfg,
        parallel=replace(cfg.parallel, tp=tp, pp=pp, ep=ep, sequence_parallel=sp),
        train=replace(cfg.train, micro_batch_size=mbs),
        optim=replace(cfg.optim, zero_stage=zero),
    )
    layout = Layout.of(trial, world)
    if layout.problems():
        return None
    mem = estimate(trial, world, cuda=True)
    flops = step_flops_per_rank(trial, world)
    return Candidate(tp, pp, ep, layout.dp, mbs, layout.grad_accum, zero, sp, mem, flops, mem.total <= limit)
