"""Built-in corpora: tokenizer and token streams that every machine can build without a download.

`stdlib-code` is the running interpreter's standard-library source (see `corpus.py`). The trained
tokenizer and the token streams are cached (keyed by corpus, vocabulary size and split settings), so
only the first run on a machine pays for them.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpmtp_dist.config import DataConfig
from cpmtp_dist.data.corpus import stdlib_code_documents
from cpmtp_dist.data.loader import build_token_stream
from cpmtp_dist.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece


@dataclass
class BuiltinData:
    tokenizer: Tokenizer
    tokenizer_dir: Path
    train_stream: np.ndarray  # 1-D token ids, EOS after every document
    valid_stream: np.ndarray


def default_cache_dir() -> Path:
    """`$CPMTP_CACHE_DIR`, else `~/.cache/cpmtp_dist`."""
    return Path(os.environ.get("CPMTP_CACHE_DIR", Path.home() / ".cache" / "cpmtp_dist"))


def build_builtin_data(cfg: DataConfig, cache_dir: Path | None = None) -> BuiltinData:
    """Tokenizer and train/valid token streams of the built-in corpus `cfg.corpus`."""
    if cfg.corpus != "stdlib-code":
        raise ValueError(f"data.corpus={cfg.corpus!r} is not a built-in corpus (known: 'stdlib-code')")
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    train_docs = stdlib_code_documents("train", cfg.heldout_fraction, cfg.max_chars)
    valid_docs = stdlib_code_documents("valid", cfg.heldout_fraction)
    if not train_docs or not valid_docs:
        raise ValueError(
            f"the stdlib-code corpus gave {len(train_docs)} training and {len(valid_docs)} held-out documents: "
            "raise data.max_chars or data.heldout_fraction"
        )
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    key = f"stdlib-code-{py}-v{cfg.tokenizer_vocab_size}-c{cfg.max_chars}-h{cfg.heldout_fraction}"
    tok_dir = cache_dir / "tokenizers" / key
    if not (tok_dir / "tokenizer.json").is_file():
        # Train in a private folder and rename it into place: concurrent ranks never see half a model.
        tmp = cache_dir / "tokenizers" / f".{key}.{os.getpid()}.tmp"
        train_sentencepiece((d.text for d in train_docs), cfg.tokenizer_vocab_size, tmp)
        try:
            os.replace(tmp, tok_dir)
        except OSError:  # another process won the race; its model is identical (deterministic training)
            shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = load_tokenizer(tok_dir)
    streams = cache_dir / "tokens"
    return BuiltinData(
        tokenizer=tokenizer,
        tokenizer_dir=tok_dir,
        train_stream=build_token_stream(train_docs, tokenizer, cache_path=streams),
        valid_stream=build_token_stream(valid_docs, tokenizer, cache_path=streams),
    )
