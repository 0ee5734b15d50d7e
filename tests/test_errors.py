"""One error type for bad input (issue 22): a `UserError` is one line on stderr and exit 2, anything else is a
bug that keeps its traceback and exits 1, and every exit status the CLI, the systemd unit and the docs use is
one of errors.py's named constants."""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import tiny_overlay

from resnet50_recipe import cli, errors
from resnet50_recipe.data.pipeline import UnreadableImage
from resnet50_recipe.errors import (
    EXIT_BAD_INPUT,
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    ExistingOutput,
    MissingInput,
    RecipeError,
    UserError,
)
from resnet50_recipe.store.checkpoints import CheckpointError
from resnet50_recipe.store.lineage import RemoteSuperseded
from resnet50_recipe.store.s3 import RemoteError, RemoteRefused, RemoteUnavailable
from resnet50_recipe.trainer.lock import RunLocked

PACKAGE = Path(errors.__file__).resolve().parent
ROOT = PACKAGE.parent
EXITS = {name: value for name, value in vars(errors).items() if name.startswith("EXIT_")}


def cli_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resnet50_recipe", *args], capture_output=True, text=True,
                          timeout=300)


def train_args(data, out) -> list[str]:
    args = ["train", "smoke", "--output", str(out), "--quiet"]
    for item in tiny_overlay(data, **{"export.enabled": "false", "checkpoint.spot_notice": "off"}):
        args += ["--set", item]
    return args


# ---------------------------------------------------------------------------------------------------------
# Through the CLI, in a real process


def test_a_bug_inside_the_training_step_keeps_its_traceback_and_exits_1(tiny_data, tmp_path):
    """A plain ValueError is a bug, not bad input, even when it says "value": never exit 2 and one line."""
    code = textwrap.dedent(f"""
        import importlib
        import sys

        step = importlib.import_module("resnet50_recipe.trainer.step")  # the package's `train` is the function

        def optimizer_step(t):
            raise ValueError("deliberate bug")

        step.optimizer_step = optimizer_step
        from resnet50_recipe.cli import main
        sys.exit(main({train_args(tiny_data, tmp_path / "run")!r}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_BUG == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr, done.stderr
    assert "ValueError: deliberate bug" in done.stderr and "resnet50-recipe: error:" not in done.stderr
    assert "in optimizer_step" in done.stderr  # the traceback says where


def test_a_bad_recipe_key_is_one_line_and_exit_2(tiny_data, tmp_path):
    done = cli_run(*train_args(tiny_data, tmp_path / "run"), "--set", "train.epochz=3")
    assert done.returncode == EXIT_BAD_INPUT == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resnet50-recipe: error: "), done.stderr
    assert "train.epochz" in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# The CLI's mapping, exception by exception


@pytest.mark.parametrize("error, status", [
    (UserError("bad value"), EXIT_BAD_INPUT),
    (RecipeError("train.epochz: unknown key"), EXIT_BAD_INPUT),
    (MissingInput("data.path: folder not found"), EXIT_BAD_INPUT),
    (ExistingOutput("out holds an earlier run"), EXIT_BAD_INPUT),
    (RunLocked("run: another trainer is using this run directory"), EXIT_BAD_INPUT),
    (UnreadableImage("x.jpg: unreadable image"), EXIT_BAD_INPUT),
    (RemoteRefused("s3://b/x: bucket 'b' does not exist"), EXIT_BAD_INPUT),
    (RemoteSuperseded("s3://b/x: another run has started afresh on this prefix"), EXIT_BAD_INPUT),
    (RemoteUnavailable("s3://b/x: the store kept failing for 300 s"), EXIT_PREEMPTED),
    (CheckpointError("writing a checkpoint failed (No space left on device)"), EXIT_BUG),
], ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v))
def test_user_errors_and_environment_failures_are_one_line(monkeypatch, capsys, error, status):
    def fails(args):
        raise error
    monkeypatch.setattr(cli, "cmd_watch", fails)
    assert cli.main(["watch", "somewhere", "--once"]) == status
    err = capsys.readouterr().err
    assert err == f"resnet50-recipe: error: {error}\n"


@pytest.mark.parametrize("error", [ValueError("a bug"), FileNotFoundError(2, "No such file", "/internal/x"),
                                   KeyError("k"), RemoteError("the uploaded object does not match"),
                                   UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")],
                         ids=lambda e: type(e).__name__)
def test_anything_else_leaves_main_with_its_traceback(monkeypatch, capsys, error):
    def fails(args):
        raise error
    monkeypatch.setattr(cli, "cmd_watch", fails)
    with pytest.raises(type(error)):
        cli.main(["watch", "somewhere", "--once"])
    assert "resnet50-recipe: error" not in capsys.readouterr().err


def test_a_second_ctrl_c_is_130(monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_watch", interrupted)
    assert cli.main(["watch", "somewhere", "--once"]) == EXIT_INTERRUPTED == 130


def test_bad_input_types_keep_the_builtin_types_callers_catch():
    for error, builtin in ((MissingInput("x"), FileNotFoundError), (ExistingOutput("x"), FileExistsError),
                           (RunLocked("x"), FileExistsError), (RemoteRefused("x"), RemoteError),
                           (RemoteSuperseded("x"), RemoteError), (UnreadableImage("x"), ValueError)):
        assert isinstance(error, UserError) and isinstance(error, builtin) and str(error) == "x"
    assert not issubclass(RemoteUnavailable, UserError) and not issubclass(CheckpointError, UserError)
    assert not issubclass(RemoteError, UserError)  # a failed upload check is the store's, retried in the run


# ---------------------------------------------------------------------------------------------------------
# Every exit status is a named constant


def test_the_cli_returns_no_literal_exit_status():
    literal = re.compile(r"\b(?:return|sys\.exit\(|os\._exit\(|exit\()\s*\d+\b")
    sources = [*sorted((PACKAGE / "cli").glob("*.py")), PACKAGE / "trainer" / "run.py", PACKAGE / "trainer" / "stop.py",
               PACKAGE / "__main__.py"]
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for path in sources
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if literal.search(line.split("#", 1)[0])]
    assert not found, f"literal exit statuses; use errors.py's EXIT_* constants: {found}"


def test_the_systemd_unit_tests_only_named_exit_statuses():
    script = (PACKAGE / "cloud" / "user-data.sh").read_text()
    used = set()
    for key in ("SuccessExitStatus", "RestartForceExitStatus", "RestartPreventExitStatus"):
        lines = re.findall(rf"^{key}=([\d ]+)$", script, re.M)
        assert lines, key
        used |= {int(n) for line in lines for n in line.split()}
    end = script[script.index('if [ "${1:-}" = "--end" ]'):]
    cases = re.findall(r'case "\$status" in(.*?)esac', end, re.S)
    arms = [arm for case in cases for arm in re.findall(r'^\s*((?:""|\d+)(?:\s*\|\s*(?:""|\d+))*)\)', case, re.M)]
    assert arms, cases
    used |= {int(n) for arm in arms for n in re.findall(r"\d+", arm)}
    used |= {int(n) for n in re.findall(r'"\$status" [!=]= (\d+)', end)}
    assert used == {0, 2, 3, 4, 74, 75}, used
    for status in used:
        names = [name for name, value in EXITS.items() if value == status]
        assert names, f"user-data.sh tests exit status {status}, which errors.py does not name"
        assert any(f"{status} {name}" in script for name in names), f"{status}: no comment names {names}"


def test_the_unit_and_aws_status_agree_on_the_statuses_that_end_a_run():
    from resnet50_recipe.cloud.instances import ENDED

    script = (PACKAGE / "cloud" / "user-data.sh").read_text()
    prevented = {int(n) for n in re.search(r"^RestartPreventExitStatus=([\d ]+)$", script, re.M).group(1).split()}
    assert set(ENDED) == prevented | {errors.EXIT_FINISHED}
    assert set(ENDED) <= set(EXITS.values())


def test_the_documented_exit_statuses_are_the_constants():
    page = (ROOT / "docs" / "exit-codes.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| `(EXIT_[A-Z_]+)` \|", page, re.M))
    assert {int(n) for n in rows} == set(EXITS.values()), (rows, EXITS)
    assert all(EXITS[name] == int(n) for n, name in rows.items()), rows
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    sentence = design[design.index("Exit statuses"):]
    sentence = sentence[:sentence.index("\n\n")]
    assert {int(n) for n in re.findall(r"\b(\d+) [a-z]", sentence)} <= set(EXITS.values()), sentence
