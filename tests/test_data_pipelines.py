"""The shard-building data pipeline: sources, `cpmtp data tokenizer`, `cpmtp data shards` (format, resume),
and the built-in stdlib-prose corpus. Small real English inputs (reference-manual help topics), vocabulary 384."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from cpmtp_dist.data.corpus import HELDOUT_RULE, Document, is_heldout, stdlib_root
from cpmtp_dist.data.prose import help_topics, module_docstrings, stdlib_prose_documents
from cpmtp_dist.data.tokenizer import load_tokenizer
from data_pipelines import shards as shards_module
from data_pipelines.shards import build_shards
from data_pipelines.sources import iter_documents, read_documents, resolve_inputs
from launchers.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 384
SEQ_LEN = 32
HELDOUT = 0.2
SHARD_MB = 0.05  # ~50 samples of 33 uint16 tokens per shard: dozens of shards from a small corpus


def _names(docs: list[Document]) -> list[str]:
    return [d.name for d in docs]


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real English text: 30 help topics as files in subfolders, 10 more as JSON Lines."""
    root = tmp_path_factory.mktemp("corpus")
    topics = help_topics()
    names = sorted(topics)[:40]
    for k, name in enumerate(names[:30]):
        _write(root / f"part{k % 3}" / f"{name}.txt", topics[name])
    lines = [json.dumps({"id": name, "body": topics[name]}) for name in names[30:]]
    _write(root / "extra.jsonl", "\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def tok_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    rc = cli(
        ["data", "tokenizer", "--input", str(corpus / "part*"), "--vocab-size", str(VOCAB), "--out", str(out)]
    )
    assert rc == 0
    return out


def _shards(corpus: Path, tok_dir: Path, out: Path, **kw) -> dict:
    args = {"shard_size_mb": SHARD_MB, "workers": 1, "heldout_fraction": HELDOUT, "jsonl_field": "body"}
    return build_shards([str(corpus)], tok_dir, SEQ_LEN, out, progress_bar=False, **{**args, **kw})


@pytest.fixture(scope="module")
def reference(corpus: Path, tok_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted build, made with two tokenising processes (the others use one: bytes must agree)."""
    out = tmp_path_factory.mktemp("ref") / "shards"
    _shards(corpus, tok_dir, out, workers=2)
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------
# sources


def test_sources_files_folders_globs_jsonl_in_sorted_order(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "data/b.txt", "bee\r\n")
    _write(tmp_path / "data/a/z.txt", "zed")
    _write(tmp_path / "data/a/empty.txt", "")
    _write(tmp_path / "data/.hidden.txt", "hidden")
    _write(tmp_path / "data/.git/config", "hidden folder")
    _write(
        tmp_path / "data/c.jsonl", '{"text": "one"}\n\n{"text": "", "x": 1}\n{"text": "three", "t": "T"}\n'
    )
    _write(tmp_path / "data/d.jsonl.gz", gzip.compress(b'{"text": "gz"}\n'))
    _write(tmp_path / "single.md", "# title\n")

    docs = list(iter_documents(["data", "single.md"]))
    assert _names(docs) == [
        "data/a/z.txt",  # empty documents and hidden files/folders are skipped
        "data/b.txt",
        "data/c.jsonl:1",
        "data/c.jsonl:4",
        "data/d.jsonl.gz:1",
        "single.md",
    ]
    assert [d.text for d in docs] == ["zed", "bee\r\n", "one", "three", "gz", "# title\n"]  # byte-exact
    assert _names(iter_documents(["data/**/*.txt"])) == ["data/a/z.txt", "data/b.txt"]
    assert _names(iter_documents(["./data/"])) == _names(iter_documents(["data"]))
    _write(tmp_path / "other.jsonl", '{"body": "B", "text": 1}\n')
    assert [(d.name, d.text) for d in iter_documents(["other.jsonl"], jsonl_field="body")] == [
        ("other.jsonl:1", "B")
    ]


def test_sources_errors_name_the_input_and_the_fix(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "ok.txt", "fine")
    with pytest.raises(FileNotFoundError, match=r"'missing\.txt' does not exist: pass a file, a folder"):
        iter_documents(["ok.txt", "missing.txt"])  # fails at once, before any document is read
    with pytest.raises(FileNotFoundError, match=r"'nothing/\*\.txt': the glob matches no file"):
        iter_documents(["nothing/*.txt"])
    with pytest.raises(ValueError, match=r"unknown built-in corpus 'builtin:wiki'.*builtin:stdlib-prose"):
        iter_documents(["builtin:wiki"])
    with pytest.raises(
        ValueError, match=r"'ok\.txt' \(input 'ok\.txt'\) and 'ok\.txt' \(input '\*\.txt'\) are the same"
    ):
        iter_documents(["ok.txt", "*.txt"])

    _write(tmp_path / "bad.jsonl", '{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_documents(["bad.jsonl"]))
    _write(tmp_path / "field.jsonl", '{"text": "a"}\n\n{"body": "b"}\n')
    with pytest.raises(
        ValueError, match=r"field\.jsonl:3: no string field 'text' \(found \['body'\]\).*--jsonl-field"
    ):
        list(iter_documents(["field.jsonl"]))

    _write(tmp_path / "bin/latin1.txt", "caf\xe9".encode("latin-1"))
    _write(tmp_path / "bin/utf8.txt", "café")
    with caplog.at_level(logging.WARNING, logger="data_pipelines.sources"):
        assert [d.text for d in iter_documents(["bin"])] == ["café"]
    assert "skipped 1 file(s) that are not UTF-8 text, e.g. bin/latin1.txt" in caplog.text

    _write(tmp_path / "empty/a.txt", "")
    with pytest.raises(ValueError, match=r"hold no non-empty document"):
        list(iter_documents(["empty"]))


def test_document_names_do_not_depend_on_where_the_inputs_lie(tmp_path: Path, monkeypatch) -> None:
    for place in ("here", "mnt/elsewhere"):
        _write(tmp_path / place / "corpus/a.txt", "a")
        _write(tmp_path / place / "corpus/sub/b.jsonl", '{"text": "b"}\n')
    expected = {
        "folder": (["corpus/a.txt", "corpus/sub/b.jsonl:1"], "corpus/", "corpus/<path below the folder>"),
        "glob": (["corpus/sub/b.jsonl:1"], "corpus/**/*.jsonl", "corpus/<path below the folder>"),
        "file": (["b.jsonl:1"], "b.jsonl", "b.jsonl:<line>"),
    }
    for place in ("here", "mnt/elsewhere"):
        root = tmp_path / place / "corpus"
        for kind, spelled in (
            ("folder", str(root)),
            ("folder", f"{root}/./"),
            ("glob", f"{root}/**/*.jsonl"),
            ("file", str(root / "sub/b.jsonl")),
        ):
            (resolved,) = resolve_inputs([spelled])
            names = _names(read_documents([resolved]))
            assert (names, resolved.key, resolved.names) == expected[kind], (place, spelled)
    # Relative spellings and a glob from the current folder name like the folder and file inputs do.
    monkeypatch.chdir(tmp_path / "here" / "corpus")
    assert _names(iter_documents(["."])) == expected["folder"][0]
    assert _names(iter_documents(["../corpus/sub/../"])) == expected["folder"][0]
    assert _names(iter_documents(["*.txt", "sub/*"])) == ["a.txt", "sub/b.jsonl:1"]


def test_links_within_an_input_are_read_once_and_across_inputs_refused(tmp_path: Path, caplog) -> None:
    """A mirror-like folder: a versioned file and a symlink to it (as /usr/share/common-licenses has), a hard
    link, a symlinked folder whose target lies outside the input, a link cycle and a broken link."""
    root = tmp_path / "licenses"
    _write(root / "GPL-3", "gpl three")
    (root / "GPL").symlink_to("GPL-3")
    _write(root / "docs/guide.txt", "guide")
    os.link(root / "docs/guide.txt", root / "docs/guide-copy.txt")
    _write(tmp_path / "outside/extra.txt", "extra")
    (root / "extra").symlink_to(tmp_path / "outside")
    (root / "docs/loop").symlink_to("..")  # a cycle back to the input's root
    (root / "broken.txt").symlink_to("nowhere")
    with caplog.at_level(logging.INFO, logger="data_pipelines.sources"):
        docs = list(iter_documents([str(root)]))
    assert [(d.name, d.text) for d in docs] == [
        ("licenses/GPL-3", "gpl three"),  # the name without a symlink on the way is kept
        ("licenses/docs/guide-copy.txt", "guide"),  # hard links: the first name in order
        ("licenses/extra/extra.txt", "extra"),  # reached only through a symlinked folder: followed
    ]
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == 1 and "each file is read once" in info[0], info
    for twice, kept in (("GPL", "GPL-3"), ("docs/guide.txt", "docs/guide-copy.txt")):
        assert f"{root / twice} (read as {root / kept})" in info[0]
    assert "not readable files (broken symlinks" in caplog.text and str(root / "broken.txt") in caplog.text
    # The same files through a glob that also walks the cycle: the same documents.
    assert _names(iter_documents([f"{root}/**/*"])) == _names(docs)
    # One file reached by two inputs stays an error that names both inputs and both spellings.
    with pytest.raises(ValueError) as err:
        iter_documents([str(root), str(tmp_path / "outside")])
    assert str(err.value) == (
        f"'{root / 'extra/extra.txt'}' (input '{root}') and '{tmp_path / 'outside/extra.txt'}' (input "
        f"'{tmp_path / 'outside'}') are the same file: pass every file once"
    )


# ----------------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_command_writes_the_card_and_round_trips(
    tok_dir: Path, corpus: Path, tmp_path: Path, capsys
) -> None:
    card = json.loads((tok_dir / "tokenizer.json").read_text())
    model = (tok_dir / "tokenizer.model").read_bytes()
    assert card["sha256"] == hashlib.sha256(model).hexdigest()
    assert (card["vocab_size"], card["eos_id"], card["pad_id"], card["model_type"]) == (VOCAB, 1, 2, "bpe")
    assert card["inputs"] == [f"{corpus.name}/part*"] and card["documents"] == 30
    tok = load_tokenizer(tok_dir)
    texts = [*help_topics().values()][-3:] + ["  two spaces\ttab\r\n\n\u2581 ünïcödé 😀\n", ""]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text

    out = tmp_path / "unigram"
    args = ["data", "tokenizer", "--input", str(corpus / "extra.jsonl"), "--jsonl-field", "body"]
    assert (
        cli([*args, "--vocab-size", "400", "--out", str(out), "--model-type", "unigram", "--seed", "3"]) == 0
    )
    uni = load_tokenizer(out)
    assert json.loads((out / "tokenizer.json").read_text())["model_type"] == "unigram"
    assert all(uni.decode(uni.encode(t)) == t for t in texts)
    # A vocabulary too small for the inputs' characters is a clear error, not a SentencePiece traceback.
    capsys.readouterr()
    assert cli([*args, "--vocab-size", "300", "--out", str(tmp_path / "small")]) == 2
    assert re.search(
        r"error: SentencePiece could not train a bpe vocabulary of 300 .*Change --vocab-size",
        capsys.readouterr().err,
    )


# ----------------------------------------------------------------------------------------------------------
# shards


def _read_split(out: Path, manifest: dict, split: str) -> tuple[list[str], list[np.ndarray]]:
    urls = [str(out / s["file"]) for s in manifest["splits"][split]["shards"]]
    keys, samples = [], []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        keys.append(sample["__key__"])
        samples.append(np.load(io.BytesIO(sample["tokens.npy"])))
    return keys, samples


def test_shards_format_contents_and_split(reference: Path, corpus: Path, tok_dir: Path) -> None:
    manifest = json.loads((reference / "manifest.json").read_text())
    card = json.loads((tok_dir / "tokenizer.json").read_text())
    assert {
        k: manifest[k] for k in ("format", "seq_len", "sample_tokens", "dtype", "inputs", "heldout_fraction")
    } == {
        "format": "cpmtp_dist.shards/v1",
        "seq_len": SEQ_LEN,
        "sample_tokens": SEQ_LEN + 1,
        "dtype": "uint16",
        "inputs": [f"{corpus.name}/"],  # the folder's own name: where it lies does not matter (below)
        "heldout_fraction": HELDOUT,
    }
    assert manifest["document_names"] == [f"{corpus.name}/<path below the folder>"]
    assert manifest["heldout_rule"] == HELDOUT_RULE
    assert manifest["tokenizer"] == {
        "dir": "tokenizer",
        "sha256": card["sha256"],
        "vocab_size": VOCAB,
        "eos_id": 1,
        "pad_id": 2,
    }
    assert _tree(reference / "tokenizer") == _tree(tok_dir)
    tok = load_tokenizer(reference / "tokenizer")
    docs = list(iter_documents([str(corpus)], jsonl_field="body"))
    files = {"manifest.json", "tokenizer/tokenizer.json", "tokenizer/tokenizer.model"}
    for split in ("train", "valid"):
        info = manifest["splits"][split]
        split_docs = [d for d in docs if is_heldout(d.name, HELDOUT) == (split == "valid")]
        assert info["documents"] == len(split_docs) > 0
        assert len(info["shards"]) > 2
        for k, shard in enumerate(info["shards"]):
            assert shard["file"] == f"{split}/shard-{k:06d}.tar"
            data = (reference / shard["file"]).read_bytes()
            assert (shard["bytes"], shard["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
            files.add(shard["file"])
        counts = {s["sequences"] for s in info["shards"][:-1]}
        assert (
            len(counts) == 1 and info["shards"][-1]["sequences"] <= counts.pop()
        )  # equal shards, shorter last
        keys, samples = _read_split(reference, manifest, split)
        assert keys == [f"{i:09d}" for i in range(info["sequences"])]
        assert sum(s["sequences"] for s in info["shards"]) == info["sequences"] > 0
        assert info["tokens"] == info["sequences"] * (SEQ_LEN + 1)
        assert all(s.dtype == np.uint16 and s.shape == (SEQ_LEN + 1,) for s in samples)
        # The split's stream is its documents' tokens + EOS, in reading order, minus the short tail.
        stream = [i for d in split_docs for i in [*tok.encode(d.text), tok.eos_id]]
        assert 0 <= info["dropped_tokens"] < SEQ_LEN + 1
        assert len(stream) == info["tokens"] + info["dropped_tokens"]
        assert np.concatenate(samples).tolist() == stream[: info["tokens"]]
    assert set(_tree(reference)) == files  # nothing else is left behind (no .build, no temporary files)


def test_resume_after_interruptions_is_byte_identical(
    reference: Path, corpus: Path, tok_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """Interrupted at several points (in the valid split, mid-shard, in train), twice in one build."""
    manifest = json.loads((reference / "manifest.json").read_text())
    n_valid = manifest["splits"]["valid"]["sequences"]
    per_shard = manifest["splits"]["train"]["shards"][0]["sequences"]
    add, encode = shards_module._SplitWriter._add, shards_module._encode
    tokenised: list[str] = []

    def counting_encode(tok, text: str, dtype: np.dtype) -> np.ndarray:
        tokenised.append(text)
        return encode(tok, text, dtype)

    monkeypatch.setattr(shards_module, "_encode", counting_encode)
    for stops in ([2 * per_shard + 3], [n_valid + per_shard + 7, n_valid + 5 * per_shard]):
        out = tmp_path / f"out-{stops[0]}"
        for stop in stops:
            calls = iter(range(stop))

            def interrupted_add(self, sample, calls=calls):
                if next(calls, None) is None:
                    raise KeyboardInterrupt
                add(self, sample)

            monkeypatch.setattr(shards_module._SplitWriter, "_add", interrupted_add)
            with pytest.raises(KeyboardInterrupt):
                _shards(corpus, tok_dir, out)
            assert not (out / "manifest.json").exists() and (out / ".build" / "progress.json").is_file()
            assert not [p for p in out.rglob("*.tmp")]
        monkeypatch.setattr(shards_module._SplitWriter, "_add", add)
        progress = json.loads((out / ".build" / "progress.json").read_text())
        kept = [out / s["file"] for split in progress["splits"].values() for s in split["shards"]]
        inodes = [f.stat().st_ino for f in kept]
        # Documents before the resume point are read past, not tokenised again.
        to_tokenise = 0
        for name, state in progress["splits"].items():
            if state["done"] is None:
                done_docs = state["shards"][-1]["resume"]["documents"] if state["shards"] else 0
                to_tokenise += manifest["splits"][name]["documents"] - done_docs
        tokenised.clear()
        assert _shards(corpus, tok_dir, out) == manifest
        assert _tree(out) == _tree(reference)
        assert kept and [f.stat().st_ino for f in kept] == inodes  # finished shards were kept, not rewritten
        assert len(tokenised) == to_tokenise


def test_shards_are_the_same_wherever_the_corpus_lies_and_survive_a_move(
    reference: Path, corpus: Path, tok_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """The corpus copied to two other absolute places gives the reference build byte for byte (manifest,
    splits, shards and checksums); a build interrupted at one place resumes from another after a move."""
    elsewhere = tmp_path / "mnt" / "other-disk" / corpus.name
    shutil.copytree(corpus, elsewhere)
    _shards(elsewhere, tok_dir, tmp_path / "copy")
    assert _tree(tmp_path / "copy") == _tree(reference)

    moving = tmp_path / "before" / corpus.name
    shutil.copytree(corpus, moving)
    manifest = json.loads((reference / "manifest.json").read_text())
    add, calls = shards_module._SplitWriter._add, iter(range(manifest["splits"]["valid"]["sequences"] + 7))

    def interrupted_add(self, sample):
        if next(calls, None) is None:
            raise KeyboardInterrupt
        add(self, sample)

    monkeypatch.setattr(shards_module._SplitWriter, "_add", interrupted_add)
    with pytest.raises(KeyboardInterrupt):
        _shards(moving, tok_dir, tmp_path / "moved")
    monkeypatch.setattr(shards_module._SplitWriter, "_add", add)
    assert json.loads((tmp_path / "moved/.build/progress.json").read_text())["splits"]["valid"]["done"]
    (tmp_path / "after").mkdir()
    moved = shutil.move(moving, tmp_path / "after")  # into after/, under its own name
    assert _shards(Path(moved), tok_dir, tmp_path / "moved") == manifest
    assert _tree(tmp_path / "moved") == _tree(reference)


def test_resume_rebuilds_from_a_corrupted_shard(
    reference: Path, corpus: Path, tok_dir: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    manifest = json.loads((reference / "manifest.json").read_text())
    stop = (
        manifest["splits"]["valid"]["sequences"]
        + 4 * manifest["splits"]["train"]["shards"][0]["sequences"]
        + 3
    )
    add, calls = shards_module._SplitWriter._add, iter(range(stop))

    def interrupted_add(self, sample):
        if next(calls, None) is None:
            raise KeyboardInterrupt
        add(self, sample)

    monkeypatch.setattr(shards_module._SplitWriter, "_add", interrupted_add)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _shards(corpus, tok_dir, out)
    monkeypatch.setattr(shards_module._SplitWriter, "_add", add)
    shard = out / "train" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    with caplog.at_level(logging.WARNING, logger="data_pipelines.shards"):
        _shards(corpus, tok_dir, out)
    assert "train/shard-000001.tar does not match" in caplog.text
    assert _tree(out) == _tree(reference)
    assert _shards(corpus, tok_dir, out) == manifest  # a finished build is found, not rebuilt


def test_resume_after_kill(reference: Path, corpus: Path, tok_dir: Path, tmp_path: Path) -> None:
    """SIGKILL to a real `cpmtp data shards` process (and its workers) while it writes train shards."""
    out = tmp_path / "out"
    # Slow the writer down (1 ms a sample) so the kill lands in the middle of the build.
    script = (
        "import sys, time\n"
        "from data_pipelines import shards\n"
        "add = shards._SplitWriter._add\n"
        "shards._SplitWriter._add = lambda self, s: (time.sleep(0.001), add(self, s))\n"
        "from launchers.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["data", "shards", "--input", str(corpus), "--tokenizer", str(tok_dir), "--seq-len", str(SEQ_LEN)]
    args += ["--out", str(out), "--shard-size-mb", str(SHARD_MB), "--heldout-fraction", str(HELDOUT)]
    args += ["--jsonl-field", "body", "--workers", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / "train" / "shard-000002.tar").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, "the build ended before it could be killed"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists()
    _shards(corpus, tok_dir, out)
    assert _tree(out) == _tree(reference)


def test_shards_refuse_bad_settings_and_folders(
    reference: Path, corpus: Path, tok_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    with pytest.raises(ValueError, match=r"--seq-len must be >= 2, got 1; --shard-size-mb must be > 0"):
        build_shards([str(corpus)], tok_dir, 1, tmp_path / "a", shard_size_mb=0)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        _shards(tmp_path / "missing", tok_dir, tmp_path / "a")
    assert not (tmp_path / "a").exists()  # nothing is written before the inputs and settings are checked
    no_card = tmp_path / "no_card"
    no_card.mkdir()
    with pytest.raises(
        ValueError, match=rf"--tokenizer {re.escape(str(no_card))}: not a valid tokenizer folder"
    ):
        _shards(corpus, no_card, tmp_path / "b")
    bad_card = tmp_path / "bad_card"
    bad_card.mkdir()
    (bad_card / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    (bad_card / "tokenizer.json").write_text(json.dumps({"kind": "sentencepiece", "sha256": "0" * 64}))
    with pytest.raises(ValueError, match=r"bad_card: not a valid tokenizer folder .*sha256"):
        _shards(corpus, bad_card, tmp_path / "c")
    # The finished reference build holds other settings than these.
    with pytest.raises(ValueError, match=r"finished build with other settings \(seq_len: 32 there, 16 now\)"):
        build_shards([str(corpus)], tok_dir, 16, reference, heldout_fraction=HELDOUT, progress_bar=False)
    _write(tmp_path / "busy" / "notes.txt", "mine")
    with pytest.raises(ValueError, match=r"is not empty \(notes\.txt\) and holds no interrupted build"):
        _shards(corpus, tok_dir, tmp_path / "busy")

    # An interrupted build resumed with other settings.
    def interrupted_run(*args) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(shards_module._SplitWriter, "run", interrupted_run)
    with pytest.raises(KeyboardInterrupt):
        _shards(corpus, tok_dir, tmp_path / "d")
    with pytest.raises(
        ValueError, match=r"interrupted build with other settings \(heldout_fraction: 0\.2 then, 0\.5"
    ):
        _shards(corpus, tok_dir, tmp_path / "d", heldout_fraction=0.5)
    monkeypatch.undo()
    _write(tmp_path / "tiny" / "a.txt", "a few words")
    with pytest.raises(ValueError, match=r"fewer than seq_len \+ 1 = 33 tokens"):
        build_shards([str(tmp_path / "tiny")], tok_dir, SEQ_LEN, tmp_path / "e", progress_bar=False)
    _write(tmp_path / "blank" / "e.txt", "")
    with pytest.raises(ValueError, match=r"hold no non-empty document"):
        build_shards([str(tmp_path / "blank")], tok_dir, SEQ_LEN, tmp_path / "f", progress_bar=False)


# ----------------------------------------------------------------------------------------------------------
# stdlib-prose


def test_stdlib_prose_corpus_is_english_and_split_by_name() -> None:
    root = stdlib_root() / "json"  # a real stdlib package keeps the test fast; the help topics come in full
    docs = stdlib_prose_documents("train", heldout_fraction=0.0, root=root)
    names = _names(docs)
    assert names == sorted(names)
    assert sum(n.startswith("topics/") for n in names) == len(help_topics()) >= 70
    assert "docstrings/decoder.py" in names and "docstrings/__init__.py" in names
    text = "\n".join(d.text for d in docs)
    assert len(text) > 400_000
    words = re.findall(r"[a-z]+", text.lower())
    share = {w: words.count(w) / len(words) for w in ("the", "of", "is", "a")}
    assert share["the"] > 0.03 and min(share.values()) > 0.01, share
    assert sum(c.isascii() for c in text) / len(text) > 0.99

    valid = stdlib_prose_documents("valid", heldout_fraction=0.3, root=root)
    train = stdlib_prose_documents("train", heldout_fraction=0.3, root=root)
    assert sorted(_names(valid) + _names(train)) == names
    assert valid and all(is_heldout(n, 0.3) for n in _names(valid))
    capped = stdlib_prose_documents("train", heldout_fraction=0.0, max_chars=100_000, root=root)
    assert capped == docs[: len(capped)] and 0 < sum(len(d.text) for d in capped) <= 100_000


def test_module_docstrings_in_source_order() -> None:
    source = (
        '"""Module."""\n'
        "class A:\n"
        '    """Class A.\n\n    More.\n    """\n'
        "    def f(self):\n"
        '        """Method f."""\n'
        "if True:\n"
        "    def g():\n"
        '        x = "not a docstring"\n'
        "try:\n    pass\nexcept Exception:\n"
        "    async def h():\n"
        '        """Function h."""\n'
    )
    assert module_docstrings(source) == "Module.\n\nClass A.\n\nMore.\n\nMethod f.\n\nFunction h."
    assert module_docstrings("def broken(:\n") is None


def test_a_shard_closed_full_by_the_last_sample_ends_the_split(
    corpus: Path, tok_dir: Path, tmp_path: Path
) -> None:
    # A size limit below one sample closes every shard right after its sample, the last one included.
    one_file = sorted((corpus / "part0").iterdir())[0]
    manifest = build_shards(
        [str(one_file)], tok_dir, SEQ_LEN, tmp_path / "tiny", shard_size_mb=1e-6, heldout_fraction=0.0,
        progress_bar=False,
    )  # fmt: skip
    train = manifest["splits"]["train"]
    assert len(train["shards"]) == train["sequences"] > 10
    assert all(shard["sequences"] == 1 for shard in train["shards"])
