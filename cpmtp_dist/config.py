"""Typed configuration: one dataclass section per component.

Precedence is defaults < YAML file < dotted command-line overrides (``model.cp.rank=8``).
The resolved config is saved with every run. Each component receives only its own section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class TrunkConfig:
    """The causal transformer trunk (Megatron-core ``GPTModel``, local layer spec)."""

    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 256
    """Model width d."""
    num_attention_heads: int = 4
    """Attention heads per layer; must divide hidden_size (and, under TP, be divisible by tp)."""
    num_query_groups: int | None = None
    """Key/value heads (grouped-query attention): must divide num_attention_heads (and, under TP, be divisible
    by tp); None means one per attention head (multi-head attention)."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """MLP kind: `gelu` (W2 GELU(W1 h), GPT-style) or `swiglu` (W2 (SiLU(W1 h) * W3 h), Llama-style gated)."""
    ffn_hidden_size: int | None = None
    """Width of the MLP (of each of the gated MLP's two inner projections); None means 4 * hidden_size."""
    untie_embeddings: bool = False
    """Give the output layer its own (V, d) weight instead of the input embedding's (Llama-3-8B unties them).
    The `shared` CP head then uses the output layer's weight as U."""
    norm_epsilon: float = 1e-5
    """Epsilon of every norm (Llama uses 1e-5, GPT-2 style LayerNorm 1e-5)."""
    seq_length: int = 256
    """Tokens per training sequence (the trunk's context length)."""
    vocab_size: int = 2048
    """Model vocabulary V; must be >= the tokenizer's vocabulary (extra rows are never targets)."""
    normalization: Literal["LayerNorm", "RMSNorm"] = "RMSNorm"
    """Norm used inside the layers and as the final norm."""
    rotary_base: int = 10000
    """RoPE base frequency."""
    rope_scaling_factor: float = 0.0
    """0: plain RoPE. > 0: Llama 3.1's scaling of the RoPE frequencies by this factor (low- and high-frequency
    factors 1 and 4, original context 8192; Llama-3.2-1B uses 32)."""
    init_method_std: float = 0.02
    """Std of the normal init of the trunk's weights."""
    dropout: float = 0.0
    """Attention and hidden dropout probability."""
    attention: Literal["auto", "local", "sdpa", "te"] = "auto"
    """Core attention: `sdpa` (torch's scaled_dot_product_attention: flash / cuDNN kernels on GPUs), `local`
    (Megatron's unfused DotProductAttention, full score matrix), `te` (Transformer Engine's fused attention; needs
    transformer_engine and CUDA), `auto` = te where it can run, else sdpa (cpmtp_dist/model/attention.py). The
    parameters are the same for every choice."""


@dataclass
class CPHeadConfig:
    """The rank-r CP multi-token head (docs/MODEL.md)."""

    horizon: int = 4
    """n: how many future tokens are predicted (n >= 1)."""
    rank: int = 4
    """r: number of mixture components, also called experts (r >= 1)."""
    parameterisation: Literal["shared", "separate"] = "shared"
    """`shared`: U · phi_{a,s}(h) with the trunk's tied unembedding U; `separate`: own U_a^(s) per (a, s)."""
    phi: Literal["residual", "linear"] = "residual"
    """Per-(a, s) map under `shared`: residual h + W2 SiLU(W1 h) (W2 zero-init) or linear d x d."""
    phi_hidden_size: int | None = None
    """Hidden width of the residual map's W1; None means hidden_size."""
    init_noise_std: float = 0.02
    """Std of the per-component random init that breaks the symmetry between components."""
    loss_impl: Literal["chunked", "naive"] = "chunked"
    """`chunked`: exact loss via responsibilities, never holding r*n*V logits; `naive`: materialise them."""
    chunk_tokens: int = 4096
    """Token rows per chunk in the chunked loss (bounds the peak logit memory to chunk_tokens * V)."""
    aux_loss_weight: float = 0.0
    """lambda_aux: weight of the load-balancing loss r * sum_a f_a * mean_w_a (0 turns it off)."""


@dataclass
class ModelConfig:
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    cp: CPHeadConfig = field(default_factory=CPHeadConfig)


@dataclass
class ParallelConfig:
    """Parallel layout. dp is derived: world_size / (tp * pp)."""

    tp: int = 1
    """Tensor-parallel degree of the trunk (vocabulary-parallel unembedding)."""
    pp: int = 1
    """Pipeline-parallel degree of the trunk."""
    ep: int = 1
    """Expert-parallel degree of the CP head: each rank holds r / ep components."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1)."""
    timeout_s: float = 600.0
    """Seconds a collective waits for its peers before it fails: after a node is lost or a rank hangs, the
    other ranks stop within about twice this (`cpmtp_dist/parallel/peers.py`) instead of hanging."""


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay, wrapped by a DeepSpeed engine."""

    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 20
    """Linear warmup from 0 to lr over this many optimizer steps."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to biases and norms)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables clipping."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage (0: none, 1: optimizer states, 2: + gradients, 3: + parameters)."""
    grad_accum_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """dtype in which a bf16 run accumulates gradients over micro-batches (DeepSpeed
    `data_types.grad_accum_dtype`). `auto`: fp32 under ZeRO 1 and 2, else bf16: DeepSpeed has no fp32
    accumulation without ZeRO, and under parallel.pp > 1 Megatron's schedule accumulates in the bf16 `.grad`
    (fp32 is refused in both cases). fp32 runs accumulate in fp32."""
    grad_reduce_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """dtype of the gradient reduction over data-parallel ranks in a bf16 run (DeepSpeed
    `communication_data_type`). `auto`: fp32 (DeepSpeed's own default is the model's dtype, bf16); bf16 halves
    the traffic. fp32 runs reduce in fp32."""
    overlap_comm: bool = True
    """ZeRO-2: reduce gradient buckets on a side stream while the backward goes on (GPUs; DeepSpeed's default
    is false). It double-buffers the reduce bucket. Not passed on under ZeRO 0 and 1: DeepSpeed 0.19's ZeRO-1
    with overlap_comm sums accumulated micro-batches wrongly once the gradients span more than one reduce
    bucket (measured: a gradient norm 9 % high from the first step, dp2 with 2 micro-batches and buckets of
    1e4 elements; `tests/layout_runs.py` trains that layout)."""
    contiguous_gradients: bool = True
    """ZeRO 1/2: copy gradients into one contiguous buffer as they are produced (less fragmentation; DeepSpeed's
    default). Must stay true for ZeRO-2 with parallel.ep > 1."""
    reduce_scatter: bool = True
    """ZeRO 1/2: reduce gradients with reduce-scatter instead of all-reduce (DeepSpeed's default). Must stay true
    with parallel.ep > 1."""
    reduce_bucket_size: int = 200_000_000
    """ZeRO 1/2: elements reduced at a time. With contiguous_gradients DeepSpeed allocates a staging buffer of
    this many gradient elements, two with overlap_comm, whatever the model's size: 0.8 GB in bf16 at 2e8
    (DeepSpeed's default 5e8 would take 2 GB); 2e8 elements per collective still saturate GPU links."""
    allgather_bucket_size: int = 200_000_000
    """ZeRO 1/2 and the bf16 optimizer: elements all-gathered at a time after the step (DeepSpeed's default:
    5e8); an even number."""


@dataclass
class TrainConfig:
    steps: int = 200
    """Optimizer steps to train."""
    global_batch_size: int = 16
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank; accumulation = global / (micro * dp)."""
    seed: int = 1234
    """Seed for weights, data order and sampling."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 on GPU, fp32 on CPU. bf16 runs on CPUs too (torch's CPU bf16 kernels), for tests. Weights and
    activations in bf16; the CP loss math, the optimizer's master weights and Adam moments in fp32."""
    log_every: int = 10
    """Log metrics every this many steps."""
    eval_every: int = 0
    """Evaluate on held-out data every this many steps (0: only at the end)."""
    eval_batches: int = 4
    """Micro-batches per evaluation."""
    measure_memory: bool = False
    """Measure the peak of live tensor memory per rank during the training steps and log its maximum over
    the ranks as `measured_memory_gib` (`cpmtp plan`'s estimates are checked against it). CUDA: the
    allocator's peak; CPU: every tensor storage counted while alive (`training/memory.py`), which slows
    each operator a little."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """When a step's loss or gradient norm is not finite (checked every step, on every rank), its update is
    not applied, and `stop` ends training there (`cpmtp train` exits with status 4; no checkpoint of that step
    is written), while `skip` logs the step (`nonfinite_skips` in metrics.jsonl) and goes on with the next
    batch."""
    max_nonfinite_skips: int = 10
    """With `on_nonfinite=skip`: stop after this many non-finite steps in a row."""
    spike_rewind: bool = False
    """Rewind loss spikes: when the step's loss exceeds the running mean of the last `spike_window` steps by
    more than `spike_sigmas` running standard deviations in `spike_steps` steps in a row, reload the newest
    healthy checkpoint saved before the spike, delete the newer ones, and go on with the batches after the
    spike (those between the checkpoint and the spike are skipped); logged as a `spike_rewind` event
    (`training/spikes.py`). Needs `checkpoint.every`."""
    spike_sigmas: float = 6.0
    """How many running standard deviations above the running mean make a step's loss a spike."""
    spike_steps: int = 3
    """Spiking steps in a row that confirm a spike (a single noisy step is not one)."""
    spike_window: int = 50
    """Steps of running statistics; nothing is called a spike before the window is full."""
    spike_max_rewinds: int = 5
    """Rewinds in one run (since its start or resume); the next confirmed spike stops training (status 4)."""
    peak_tflops: float = 0.0
    """Dense bf16 peak of one GPU in TFLOP/s, for MFU; 0: the built-in table by GPU name (A100, H100, H200 in
    their SXM, PCIe and NVL variants, GH200, B200, L40S, A10). Set it for a GPU the table lacks."""


@dataclass
class DataConfig:
    corpus: Literal["stdlib-code"] = "stdlib-code"
    """Built-in corpus used when `path` is not set."""
    path: str | None = None
    """Folder of prepared shards (`cpmtp data shards`), overriding `corpus`; or a blend written as weight/folder
    pairs: "0.7 /data/code 0.3 /data/prose"."""
    num_workers: int = 2
    """Loader worker processes per data-parallel rank reading shards (0: read in the training process)."""
    shuffle_buffer: int = 1024
    """Samples in each worker's shuffle buffer (shard order is shuffled per epoch as well)."""
    verify_checksums: bool = True
    """Check each shard's sha256 against the manifest before reading it."""
    skip_corrupt_shards: bool = False
    """Skip (with a warning, counted in the metrics) a shard that is corrupt, instead of stopping."""
    tokenizer_vocab_size: int = 2048
    """Vocabulary size of the tokenizer trained for a built-in corpus."""
    max_chars: int = 8_000_000
    """Cap on characters of the built-in corpus that are tokenised (0: no cap)."""
    heldout_fraction: float = 0.02
    """Fraction of documents held out for evaluation (chosen by a hash of the path, so fixed)."""


@dataclass
class CheckpointConfig:
    every: int = 100
    """Save every this many steps (0: only at the end)."""
    keep_last: int = 2
    """How many of the newest checkpoints to keep."""
    keep_every: int = 0
    """Also keep, for good, the checkpoints of steps that are multiples of this (0: none)."""
    async_save: bool = False
    """Write the weights and optimizer state in a background process while training goes on; the
    checkpoint appears (renamed into place, `latest` updated) once every rank has written its part."""


@dataclass
class TrackingConfig:
    """MLflow tracking, by rank 0 only: config as params, metrics, system metrics, artifacts."""

    enabled: bool = True
    """Track the run in MLflow (`cpmtp train --tracking-uri none` sets this to false)."""
    uri: str | None = None
    """MLflow tracking URI, e.g. http://127.0.0.1:5000; None: a sqlite file in the run directory,
    sqlite:///<run_dir>/mlflow.db (`cpmtp train --tracking-uri URI` sets it)."""
    experiment: str | None = None
    """MLflow experiment; None: the config file's stem under `cpmtp train --config`, else "cpmtp"."""
    system_metrics: bool = True
    """Also log MLflow's system metrics (CPU, memory, disk, network, GPU) as `system/...`."""
    system_metrics_interval_s: float = 10.0
    """Seconds between two system-metric samples."""
    retry_every_s: float = 30.0
    """While the tracking server does not answer, retry sending what is buffered this often."""
    flush_timeout_s: float = 30.0
    """At the end of the run, wait at most this long for buffered metrics and artifacts to be sent."""


@dataclass
class FinetuneConfig:
    """Head-only fine-tuning: start from a trained checkpoint, optionally freeze the trunk and distil the
    source model's next-token distribution into the CP head (docs/FINETUNE.md)."""

    init_from: str | None = None
    """A checkpoint folder, or a run's `checkpoints/` folder (its newest checkpoint), whose weights start this
    run at step 0 with a fresh optimizer. The trunk must match in shape; head tensors of another shape (other
    n or r) are built from the source head. None: the weights come from `train.seed`."""
    freeze_trunk: bool = False
    """Train the CP head only: the trunk, tied unembedding included, gets no gradient and no optimizer state.
    Needs init_from."""
    distill_weight: float = 0.0
    """beta in [0, 1]: the loss is (1 - beta) * CP joint NLL + beta * KL(base || draft), where base is the
    source checkpoint's next-token distribution at each future position. Needs init_from and freeze_trunk,
    and tp = pp = ep = 1. 0 turns distillation off."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
