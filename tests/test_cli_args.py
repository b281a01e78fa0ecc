"""The command line's argument handling: `key=value` overrides anywhere among the options, and one way of
reporting a user's mistake (`error: ...`, status 2) for every command. No training here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from launchers.cli import build_parser, main
from launchers.train_cmd import parse_anywhere, train_parser

ROOT = Path(__file__).resolve().parents[1]


def parse(*argv: str):
    return parse_anywhere(build_parser(), list(argv))


def test_overrides_may_follow_options_and_keep_their_order():
    args = parse("train", "--resume", "auto", "model.cp.rank=8", "--tracking-uri", "none", "data.path=x y",
                 "--config", "c.yaml", "train.steps=3")  # fmt: skip
    assert args.overrides == ["model.cp.rank=8", "data.path=x y", "train.steps=3"]
    assert (args.resume, args.tracking_uri, args.config) == ("auto", "none", "c.yaml")
    assert args.argv[0] == "train"
    plan = parse(
        "plan", "--config", "c.yaml", "parallel.tp=2", "--nodes", "2", "--gpus-per-node", "8", "a.b=1"
    )
    assert plan.overrides == ["parallel.tp=2", "a.b=1"] and plan.nodes == 2
    # A Slurm task parses `cpmtp train`'s arguments alone, the same way.
    task = parse_anywhere(train_parser(), ["--run-dir", "r", "a=1", "--resume", "auto", "b.c=2"])
    assert task.overrides == ["a=1", "b.c=2"] and task.run_dir == "r"


def test_what_is_not_an_override_is_still_refused(capsys):
    for argv in (
        ["train", "--config", "c.yaml", "--bogus", "a=1"],  # an unknown option
        ["train", "a=1", "--run-dir", "r", "stray"],  # a word that is no setting, after an option
        ["generate", "--checkpoint", "c", "--prompt", "p", "a=1"],  # a command without overrides
    ):
        with pytest.raises(SystemExit) as exit_:
            parse(*argv)
        assert exit_.value.code == 2, argv
        assert "unrecognized arguments" in capsys.readouterr().err
    # An option's own value that looks like a setting stays the option's.
    assert parse("generate", "--checkpoint", "c", "--prompt", "x=1").prompt == "x=1"


def test_a_user_error_is_reported_the_same_way_by_every_command(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    assert main(["generate", "--checkpoint", missing, "--prompt", "p", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --checkpoint {missing}") and "Traceback" not in err
    assert main(["train", "--config", "configs/tiny.yaml", "--run-dir", missing, "model.cp.rank=0"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_and_submit_do_not_import_each_other():
    """`cpmtp train`'s arguments and run live in launchers/train_cmd.py, which both use."""

    def imports(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert "launchers.cli" not in imports(ROOT / "launchers" / "submit.py")
    assert "launchers.cli" not in imports(ROOT / "launchers" / "train_cmd.py")
    assert "launchers.submit" not in imports(ROOT / "launchers" / "train_cmd.py")
