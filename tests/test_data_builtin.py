"""Tests of the built-in data path: stdlib corpus split, tokenizers, token stream + cache, loader, targets."""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from cpmtp_dist.config import TrainConfig, TrunkConfig
from cpmtp_dist.data.corpus import (
    Document,
    corpus_stats,
    is_heldout,
    list_source_files,
    stdlib_code_documents,
    stdlib_root,
)
from cpmtp_dist.data.loader import (
    PackedSequenceLoader,
    build_token_stream,
    eval_batches,
    make_targets,
)
from cpmtp_dist.data.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)

TRICKY_TEXTS = [
    "",
    " ",
    "\n",
    "\n\n\n",
    "   leading spaces",
    "trailing spaces   \n   \n",
    "\tdef f():\n\t\treturn 1\n\n\t \t\n",
    "if x:\r\n    y = 1\r\n",
    "a\u2581b \u2581 \u2581\u2581",  # SentencePiece's own space symbol, literally
    "<0x0A> <unk> </s> <pad> <s>",  # piece names must not be read as special tokens
    "nul\x00 bell\x07 ff\x0c vt\x0b",
    "unicode: é e\u0301 ﬁ ∑ 😀 \u3000 \u200b \ufeff",
    "x = 1234567890 + 0x1F",
]


# ----------------------------------------------------------------------------------------------------------
# corpus


def test_stdlib_split_disjoint_stable_and_hash_based() -> None:
    fraction = 0.2
    train = stdlib_code_documents("train", heldout_fraction=fraction)
    valid = stdlib_code_documents("valid", heldout_fraction=fraction)
    train_names = [d.name for d in train]
    valid_names = [d.name for d in valid]
    assert train_names == [d.name for d in stdlib_code_documents("train", heldout_fraction=fraction)]
    assert valid_names == [d.name for d in stdlib_code_documents("valid", heldout_fraction=fraction)]
    assert train_names == sorted(train_names) and valid_names == sorted(valid_names)
    assert not set(train_names) & set(valid_names)
    # Together the splits cover every decodable file; the rule is the documented crc32 rule, not hash().
    stats = corpus_stats(heldout_fraction=fraction)
    assert len(train_names) + len(valid_names) + stats.skipped == len(list_source_files())
    assert all(zlib.crc32(n.encode()) % 10000 < 2000 for n in valid_names)
    assert all(zlib.crc32(n.encode()) % 10000 >= 2000 for n in train_names)
    assert 0.15 < len(valid_names) / (len(train_names) + len(valid_names)) < 0.25
    assert not any(part in {"site-packages", "__pycache__"} for n in train_names for part in n.split("/"))
    assert (stats.train.documents, stats.valid.documents) == (len(train), len(valid))
    # Texts are the exact file contents.
    root = stdlib_root()
    for doc in valid[:5]:
        assert doc.text == (root / doc.name).read_bytes().decode("utf-8")


def test_stdlib_max_chars_takes_a_prefix_of_whole_documents() -> None:
    full = stdlib_code_documents("train")
    capped = stdlib_code_documents("train", max_chars=300_000)
    total = sum(len(d.text) for d in capped)
    assert 0 < total <= 300_000
    assert capped == full[: len(capped)]
    assert total + len(full[len(capped)].text) > 300_000
    # The held-out membership of a document does not depend on the cap.
    valid_capped = stdlib_code_documents("valid", max_chars=100_000)
    assert valid_capped == stdlib_code_documents("valid")[: len(valid_capped)]


def test_corpus_on_synthetic_root(tmp_path: Path) -> None:
    files = {
        "a.py": "print('a')\r\n",
        "pkg/b.py": "\tx = 1\n",
        "pkg/sub/c.py": "",
        "site-packages/d.py": "third party",
        "pkg/dist-packages/e.py": "third party",
        "pkg/__pycache__/f.py": "cache",
        "notes.txt": "not python",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(text.encode())
    (tmp_path / "latin1.py").write_bytes("caf\xe9\n".encode("latin-1"))
    assert list_source_files(tmp_path) == ["a.py", "latin1.py", "pkg/b.py", "pkg/sub/c.py"]
    docs = stdlib_code_documents("train", heldout_fraction=0.0, root=tmp_path)
    assert docs == [
        Document("a.py", "print('a')\r\n"),
        Document("pkg/b.py", "\tx = 1\n"),
        Document("pkg/sub/c.py", ""),
    ]
    assert stdlib_code_documents("valid", heldout_fraction=0.0, root=tmp_path) == []
    assert corpus_stats(heldout_fraction=0.0, root=tmp_path).skipped == 1
    names = {d.name for d in stdlib_code_documents("valid", heldout_fraction=0.5, root=tmp_path)}
    assert names == {n for n in ["a.py", "pkg/b.py", "pkg/sub/c.py"] if is_heldout(n, 0.5)}

    empty = tmp_path / "empty"
    (empty / "site-packages").mkdir(parents=True)
    (empty / "site-packages" / "x.py").write_text("x")
    with pytest.raises(ValueError, match=re.escape(str(empty))):
        stdlib_code_documents("train", root=empty)


# ----------------------------------------------------------------------------------------------------------
# tokenizers


def _real_texts() -> list[str]:
    """Real stdlib files plus variants with tabs, CRLF, trailing spaces and whitespace-only lines."""
    root = stdlib_root()
    names = ["json/decoder.py", "textwrap.py", "string.py", "tokenize.py"]
    texts = [(root / n).read_text(encoding="utf-8") for n in names if (root / n).is_file()]
    assert len(texts) >= 3
    base = texts[0]
    texts.append(base.replace("    ", "\t"))
    texts.append(base.replace("\n", "\r\n"))
    texts.append(base.replace("\n", "   \n").replace("\n\n", "\n \t \n\n"))
    return texts


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sp")
    docs = stdlib_code_documents("train", max_chars=600_000)
    train_sentencepiece((d.text for d in docs), vocab_size=512, out_dir=out, max_lines=20_000, seed=0)
    return out


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    for text in TRICKY_TEXTS + _real_texts():
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
    assert tok.decode([104, 105, tok.eos_id, tok.pad_id]) == "hi"
    with pytest.raises(ValueError):
        tok.decode([258])


def test_sentencepiece_round_trip_exact(sp_dir: Path) -> None:
    tok = load_tokenizer(sp_dir)
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.unk_id, tok.eos_id, tok.pad_id) == (512, 0, 1, 2)
    held_out = [d.text for d in stdlib_code_documents("valid")[:5]]
    for text in TRICKY_TEXTS + _real_texts() + held_out:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, text[:80]
        assert not {tok.unk_id, tok.eos_id, tok.pad_id} & set(ids)
    # Code-friendly pieces were learned: indentation runs, indentation merged with a keyword, and pieces
    # containing a newline.
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert "\u2581" * 8 in pieces
    assert any(re.fullmatch("\u2581{4,}[a-z]+", p) for p in pieces)
    assert any("\n" in p and len(p) > 1 for p in pieces)
    text = "".join(held_out)
    assert len(tok.encode(text)) < 0.6 * len(text)  # measured 0.53 at vocab 512 (bytes: 1.0)


def test_sentencepiece_card_determinism_and_tamper(sp_dir: Path, tmp_path: Path) -> None:
    card = json.loads((sp_dir / "tokenizer.json").read_text())
    tok = load_tokenizer(sp_dir)
    assert card["sha256"] == tok.fingerprint
    assert {k: card[k] for k in ("vocab_size", "eos_id", "pad_id", "unk_id", "model_type")} == {
        "vocab_size": 512,
        "eos_id": 1,
        "pad_id": 2,
        "unk_id": 0,
        "model_type": "bpe",
    }
    docs = stdlib_code_documents("train", max_chars=600_000)
    again = train_sentencepiece((d.text for d in docs), 512, tmp_path / "again", max_lines=20_000, seed=0)
    assert again.fingerprint == tok.fingerprint
    (tmp_path / "again" / "tokenizer.json").write_text(json.dumps({**card, "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="sha256"):
        load_tokenizer(tmp_path / "again")
    ByteTokenizer().save(tmp_path / "byte")
    assert isinstance(load_tokenizer(tmp_path / "byte"), ByteTokenizer)


# ----------------------------------------------------------------------------------------------------------
# token stream and cache


@dataclass
class CountingTokenizer:
    """A ByteTokenizer that counts encode calls (to see whether the cache skipped tokenisation)."""

    inner: ByteTokenizer
    calls: int = 0

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    @property
    def eos_id(self) -> int:
        return self.inner.eos_id

    @property
    def pad_id(self) -> int:
        return self.inner.pad_id

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return self.inner.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids)


def _split_at_eos(stream: np.ndarray, eos_id: int) -> list[list[int]]:
    ends = np.flatnonzero(stream == eos_id)
    assert len(stream) == 0 or ends[-1] == len(stream) - 1
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [stream[s:e].tolist() for s, e in zip(starts, ends, strict=True)]


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
def test_token_stream_has_eos_after_every_document(kind: str, sp_dir: Path) -> None:
    tok = ByteTokenizer() if kind == "byte" else load_tokenizer(sp_dir)
    docs = [Document(f"d{i}.py", t) for i, t in enumerate(TRICKY_TEXTS)]
    docs += stdlib_code_documents("valid")[:3]
    stream = build_token_stream(docs, tok)
    assert stream.dtype == np.uint16
    assert _split_at_eos(stream, tok.eos_id) == [tok.encode(d.text) for d in docs]


def test_token_stream_dtype_widens_for_large_vocab() -> None:
    class Wide(ByteTokenizer):
        vocab_size = 70_000
        eos_id = 69_999

    stream = build_token_stream([Document("a", "ab"), Document("b", "")], Wide())
    assert stream.dtype == np.uint32
    assert stream.tolist() == [97, 98, 69_999, 69_999]


def test_token_stream_cache_is_reused_and_keyed(tmp_path: Path) -> None:
    docs = [Document(f"d{i}.py", f"x = {i}\n" * (i + 1)) for i in range(5)]
    tok = CountingTokenizer(ByteTokenizer())
    first = build_token_stream(docs, tok, cache_path=tmp_path)
    assert tok.calls == len(docs)
    cached = list(tmp_path.glob("tokens-*.npy"))
    assert len(cached) == 1
    second = build_token_stream(docs, tok, cache_path=tmp_path)
    assert tok.calls == len(docs), "second call re-tokenised instead of using the cache"
    np.testing.assert_array_equal(first, second)
    assert second.dtype == first.dtype
    # A changed corpus (same names, one text edited) misses the cache and writes a new entry.
    edited = docs[:-1] + [Document(docs[-1].name, docs[-1].text + "#")]
    third = build_token_stream(edited, tok, cache_path=tmp_path)
    assert tok.calls == 2 * len(docs)
    assert len(third) == len(first) + 1
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 2


# ----------------------------------------------------------------------------------------------------------
# make_targets


@pytest.mark.parametrize("horizon", [1, 3, 9])
@pytest.mark.parametrize("ignore_index", [-1, -100])
def test_make_targets_matches_loop(horizon: int, ignore_index: int) -> None:
    gen = torch.Generator().manual_seed(horizon)
    batch = torch.randint(0, 1000, (3, 8), generator=gen)
    tokens, targets = make_targets(batch, horizon, ignore_index)
    b_size, t_size = batch.shape[0], batch.shape[1] - 1
    assert tokens.shape == (b_size, t_size) and targets.shape == (b_size, t_size, horizon)
    assert torch.equal(tokens, batch[:, :-1])
    expected = torch.full((b_size, t_size, horizon), ignore_index, dtype=batch.dtype)
    for b in range(b_size):
        for t in range(t_size):
            for s in range(1, horizon + 1):
                if t + s <= t_size:
                    expected[b, t, s - 1] = batch[b, t + s]
    assert torch.equal(targets, expected)


# ----------------------------------------------------------------------------------------------------------
# loader

SEQ = 5  # samples of SEQ + 1 = 6 tokens


def _stream(num_samples: int, tail: int = 3) -> np.ndarray:
    """Tokens that identify their sample: sample i is [i*6, ..., i*6 + 5]."""
    return np.arange(num_samples * (SEQ + 1) + tail, dtype=np.int64)


def _ids(batches: list[torch.Tensor]) -> list[int]:
    """Sample indices of a step's micro-batches (checks every row is an intact sample)."""
    rows = torch.cat(batches)
    assert rows.dtype == torch.long and rows.shape[1] == SEQ + 1
    assert torch.equal(rows - rows[:, :1], torch.arange(SEQ + 1).expand_as(rows))
    assert bool((rows[:, 0] % (SEQ + 1) == 0).all())
    return (rows[:, 0] // (SEQ + 1)).tolist()


def _loader(num_samples: int = 10, seed: int = 7, **kw: int) -> PackedSequenceLoader:
    args = {"micro_batch_size": 2, "global_batch_size": 4} | kw
    return PackedSequenceLoader(_stream(num_samples), SEQ, seed=seed, **args)


def test_loader_shapes_tail_and_epoch_permutations() -> None:
    loader = _loader(num_samples=10)
    assert loader.num_samples == 10 and loader.micro_batches_per_step == 2
    step = loader.next_step()
    assert [tuple(b.shape) for b in step] == [(2, SEQ + 1), (2, SEQ + 1)]
    order = _ids(step) + [i for _ in range(4) for i in _ids(loader.next_step())]  # 20 samples = 2 epochs
    for epoch in (0, 1):
        expected = np.random.default_rng([7, epoch]).permutation(10).tolist()
        assert order[10 * epoch : 10 * (epoch + 1)] == expected
    assert loader.epoch == 2 and loader.consumed_samples == 20


def test_loader_same_seed_same_order_different_seed_different_order() -> None:
    def run(seed: int) -> list[list[int]]:
        loader = _loader(num_samples=40, seed=seed)
        return [_ids(loader.next_step()) for _ in range(15)]

    assert run(3) == run(3)
    assert run(3) != run(4)


@pytest.mark.parametrize(("dp_size", "micro"), [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_loader_dp_ranks_concatenate_to_dp1_step(dp_size: int, micro: int) -> None:
    kw = {"micro_batch_size": micro, "global_batch_size": 8}
    single = _loader(num_samples=21, **kw)
    ranks = [
        PackedSequenceLoader(_stream(21), SEQ, seed=7, dp_rank=r, dp_size=dp_size, **kw)
        for r in range(dp_size)
    ]
    for _ in range(7):  # crosses two epoch boundaries (21 samples, 8 per step)
        reference = single.next_step()
        per_rank = [loader.next_step() for loader in ranks]
        assert all(len(steps) == 8 // (micro * dp_size) for steps in per_rank)
        assert torch.equal(torch.cat([b for steps in per_rank for b in steps]), torch.cat(reference))


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 8])
def test_loader_resume_equals_uninterrupted(k: int) -> None:
    total = 10
    uninterrupted = _loader(num_samples=10)
    reference = [torch.cat(uninterrupted.next_step()) for _ in range(total)]
    first = _loader(num_samples=10)
    for _ in range(k):
        first.next_step()
    state = json.loads(json.dumps(first.state_dict()))  # must survive serialisation
    resumed = _loader(num_samples=10, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    for step in range(k, total):  # 10 samples, 4 per step: epoch boundaries inside steps 2 and 7
        assert torch.equal(torch.cat(resumed.next_step()), reference[step]), step
    # The state is global, so resuming under another data-parallel layout continues the same stream.
    halves = [_loader(num_samples=10, dp_rank=r, dp_size=2, micro_batch_size=1) for r in range(2)]
    for loader in halves:
        loader.load_state_dict(state)
    if k < total:
        assert torch.equal(torch.cat([b for h in halves for b in h.next_step()]), reference[k])


def test_loader_validation_and_config() -> None:
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _loader(num_samples=3)
    with pytest.raises(ValueError, match="multiple"):
        _loader(micro_batch_size=3)
    other = _loader(num_samples=12).state_dict()
    with pytest.raises(ValueError, match="samples per epoch"):
        _loader(num_samples=10).load_state_dict(other)
    trunk, train = TrunkConfig(seq_length=SEQ), TrainConfig(global_batch_size=4, micro_batch_size=2, seed=7)
    from_cfg = PackedSequenceLoader.from_config(_stream(10), trunk, train)
    assert _ids(from_cfg.next_step()) == _ids(_loader(num_samples=10).next_step())


def test_eval_batches_fixed_and_sharded() -> None:
    stream = _stream(9)
    batches = eval_batches(stream, SEQ, micro_batch_size=2, num_batches=3)
    assert [_ids([b]) for b in batches] == [[0, 1], [2, 3], [4, 5]]
    # Short stream: only the full micro-batches that exist (4 of 2 samples from 9 samples).
    assert len(eval_batches(stream, SEQ, 2, num_batches=100)) == 4
    shards = [eval_batches(stream, SEQ, 2, 4, dp_rank=r, dp_size=2) for r in range(2)]
    assert [_ids(s) for s in shards] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    with pytest.raises(ValueError):
        eval_batches(_stream(1), SEQ, 2, 1)
