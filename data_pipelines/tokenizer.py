"""`cpmtp data tokenizer`: train a SentencePiece tokenizer on any inputs and write its folder.

The training itself is :func:`cpmtp_dist.data.tokenizer.train_sentencepiece` (lossless, byte fallback, the same
setup the built-in corpus uses); this module feeds it documents from :mod:`data_pipelines.sources` and records
the inputs in the card by their location-independent keys (``corpus/``, ``data/**/*.txt``), so that a tokenizer
folder says what it was trained on, and the same corpus gives the same card wherever it lies.

The tokenizer is trained on every document of the inputs, held-out ones included: it only decides how text is
cut into pieces, and a vocabulary that has seen the validation text does not leak its content.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cpmtp_dist.data.tokenizer import CARD_FILE, SentencePieceTokenizer, atomic_write, train_sentencepiece
from data_pipelines.sources import read_documents, resolve_inputs

MODEL_TYPES = ("bpe", "unigram")


@dataclass(frozen=True)
class TokenizerResult:
    tokenizer: SentencePieceTokenizer
    out_dir: Path
    documents: int
    """Documents read (the trainer samples at most ``max_lines`` lines of them)."""


def build_tokenizer(
    inputs: list[str],
    vocab_size: int,
    out_dir: Path,
    *,
    model_type: str = "bpe",
    max_lines: int = 200_000,
    jsonl_field: str = "text",
    seed: int = 0,
) -> TokenizerResult:
    """Train on the documents of ``inputs``; write ``out_dir/tokenizer.model`` and ``tokenizer.json``.

    The card is the one ``train_sentencepiece`` writes (vocab size, special ids, sha256 of the model, sampling
    settings) plus ``inputs`` (their keys) and ``documents``. The same inputs, settings and seed give a byte-identical model.
    """
    problems = []
    if model_type not in MODEL_TYPES:
        problems.append(f"model type must be one of {MODEL_TYPES}, got {model_type!r}")
    if vocab_size < 260:
        # 256 byte pieces (byte fallback) + unk/eos/pad come first; SentencePiece also needs room for characters.
        problems.append(f"vocab size must be > 259 (256 byte pieces + 3 special ids), got {vocab_size}")
    if max_lines < 1:
        problems.append(f"max lines must be >= 1, got {max_lines}")
    if problems:
        raise ValueError("; ".join(problems))
    resolved = resolve_inputs(inputs)  # a mistyped input fails before training starts
    count = 0

    def texts() -> Iterator[str]:
        nonlocal count
        for doc in read_documents(resolved, jsonl_field=jsonl_field):
            count += 1
            yield doc.text

    out_dir = Path(out_dir)
    try:
        tok = train_sentencepiece(
            texts(), vocab_size, out_dir, model_type=model_type, max_lines=max_lines, seed=seed
        )
    except RuntimeError as err:  # SentencePiece reports a vocabulary that does not fit the sample this way
        raise ValueError(
            f"SentencePiece could not train a {model_type} vocabulary of {vocab_size} on the inputs {inputs}: "
            f"{err}. Change --vocab-size (or --max-lines / the inputs)"
        ) from None
    card_path = out_dir / CARD_FILE
    card = json.loads(card_path.read_text())
    card.update(inputs=[res.key for res in resolved], documents=count)
    atomic_write(card_path, (json.dumps(card, indent=2) + "\n").encode())
    return TokenizerResult(tokenizer=tok, out_dir=out_dir, documents=count)
