"""A Hugging Face fast tokenizer (a model folder's `tokenizer.json`) as a cpmtp tokenizer folder, so that a
model converted by `cpmtp convert from-hf` decodes, evaluates and tokenises shards with its own ids.

The folder holds the Hugging Face file as `hf_tokenizer.json` and the cpmtp card `tokenizer.json` (kind `hf`,
vocab_size, eos_id, pad_id, sha256). Needs the `tokenizers` package (the `hf` extra). Text is encoded without
special tokens (documents are separated by EOS in the packed stream, as with our own tokenizers) and decoded
without them. Unlike our SentencePiece setup, `decode(encode(s)) == s` holds only where the Hugging Face
tokenizer itself round-trips (byte-level BPE such as Llama 3's does).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HF_FILE = "hf_tokenizer.json"
CARD_FILE = "tokenizer.json"  # the cpmtp card, as in `tokenizer.py`
KIND = "hf"


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as err:
        raise ValueError("a Hugging Face tokenizer needs the hf extra: pip install -e .[hf]") from err
    return tokenizers


class HFTokenizer:
    """`tokenizers.Tokenizer` behind the `Tokenizer` protocol."""

    def __init__(self, tokenizer_file: Path, eos_id: int, pad_id: int) -> None:
        data = Path(tokenizer_file).read_bytes()
        self._tok = _tokenizers().Tokenizer.from_str(data.decode("utf-8"))
        self.fingerprint = hashlib.sha256(data).hexdigest()
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eos_id, self.pad_id = int(eos_id), int(pad_id)

    @classmethod
    def from_dir(cls, tokenizer_dir: Path) -> HFTokenizer:
        card = json.loads((tokenizer_dir / CARD_FILE).read_text())
        tok = cls(tokenizer_dir / HF_FILE, card["eos_id"], card["pad_id"])
        if card.get("sha256") != tok.fingerprint:
            raise ValueError(f"{tokenizer_dir}: {HF_FILE} does not match the sha256 in {CARD_FILE}")
        return tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _token_id(tok: Any, entry: Any) -> int | None:
    """The id of a tokenizer_config.json token entry (a string or {"content": ...})."""
    content = entry.get("content") if isinstance(entry, dict) else entry
    return None if content is None else tok.token_to_id(content)


def _special_ids(model_dir: Path, tok: Any) -> tuple[int | None, int | None]:
    """(eos, pad) from tokenizer_config.json's eos_token / pad_token, else config.json's eos_token_id
    (the first of a list); pad defaults to eos."""
    eos = pad = None
    tc = model_dir / "tokenizer_config.json"
    if tc.is_file():
        cfg = json.loads(tc.read_text())
        eos, pad = _token_id(tok, cfg.get("eos_token")), _token_id(tok, cfg.get("pad_token"))
    if eos is None and (model_dir / "config.json").is_file():
        value = json.loads((model_dir / "config.json").read_text()).get("eos_token_id")
        eos = value[0] if isinstance(value, list) and value else value
    return eos, pad if pad is not None else eos


def write_hf_tokenizer(model_dir: Path, out_dir: Path) -> Path:
    """Make `out_dir` a cpmtp tokenizer folder from `model_dir`'s `tokenizer.json`; ValueError naming what is
    missing (no tokenizer.json, no EOS token)."""
    src = model_dir / "tokenizer.json"
    if not src.is_file():
        raise ValueError(f"{model_dir} has no tokenizer.json (a Hugging Face fast tokenizer)")
    tok = _tokenizers().Tokenizer.from_file(str(src))
    eos, pad = _special_ids(model_dir, tok)
    if eos is None:
        raise ValueError(
            f"{model_dir}: no EOS token in tokenizer_config.json (eos_token) or config.json (eos_token_id); "
            "set one there"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out_dir / HF_FILE)
    data = (out_dir / HF_FILE).read_bytes()
    card = {
        "kind": KIND,
        "vocab_size": int(tok.get_vocab_size(with_added_tokens=True)),
        "eos_id": int(eos),
        "pad_id": int(pad),
        "sha256": hashlib.sha256(data).hexdigest(),
        "source": str(src),
    }
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return out_dir
