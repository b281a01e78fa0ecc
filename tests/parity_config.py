"""The tiny model and data that the parity tests train: every layout must reproduce one process."""

PARITY = [
    "model.trunk.num_layers=2",
    "model.trunk.hidden_size=32",
    "model.trunk.num_attention_heads=4",
    "model.trunk.seq_length=32",
    "model.trunk.vocab_size=512",
    "model.cp.horizon=3",
    "model.cp.rank=2",
    # No balancing loss: it is a per-micro-batch statistic, so it depends on the accumulation layout.
    "model.cp.aux_loss_weight=0",
    "data.tokenizer_vocab_size=512",
    "data.max_chars=300000",
    "train.global_batch_size=8",
    "train.log_every=1",
    # Adam divides by sqrt(v) + eps: with the default 1e-8 it turns near-zero gradients (W1 and the gate
    # while the components are still identical) into steps of +-lr whatever their rounding noise.
    "optim.eps=1e-5",
    "checkpoint.every=0",
]
