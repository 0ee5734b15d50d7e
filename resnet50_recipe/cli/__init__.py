"""`resnet50-recipe`: argument parsing and dispatch, nothing else."""

from __future__ import annotations

import argparse
import logging
import sys

from resnet50_recipe.cli.aws import add_aws, cmd_aws
from resnet50_recipe.cli.bench import add_bench, cmd_bench
from resnet50_recipe.cli.data import add_data, cmd_data
from resnet50_recipe.cli.publish import add_export, add_push, cmd_export, cmd_push
from resnet50_recipe.cli.runs import (
    add_explain,
    add_predict,
    add_report,
    add_runs,
    add_watch,
    cmd_explain,
    cmd_predict,
    cmd_report,
    cmd_runs,
    cmd_watch,
)
from resnet50_recipe.cli.sky import add_sky, cmd_sky
from resnet50_recipe.cli.train import add_eval, add_train, cmd_eval, cmd_train, record_exit_status
from resnet50_recipe.errors import EXIT_BAD_INPUT, EXIT_BUG, EXIT_INTERRUPTED, EXIT_PREEMPTED, UserError
from resnet50_recipe.store.checkpoints import CheckpointError
from resnet50_recipe.store.s3 import RemoteUnavailable, is_transient

__all__ = ["build_parser", "main", "run_command"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet50-recipe", description="Train timm ImageNet classifiers from "
                                     "validated YAML recipes. See docs/recipes.md for the recipes and their sources.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_train, add_eval, add_export, add_push, add_runs, add_data, add_bench, add_aws, add_sky, add_watch,
                add_predict, add_explain, add_report):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    # Our own log lines (stop requests, skipped checkpoints, the spot watcher) go to stderr as plain text.
    package_log = logging.getLogger("resnet50_recipe")
    if not package_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package_log.addHandler(handler)
    package_log.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    handler = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "push": cmd_push, "runs": cmd_runs,
               "data": cmd_data, "bench": cmd_bench, "aws": cmd_aws, "sky": cmd_sky, "watch": cmd_watch,
               "predict": cmd_predict, "explain": cmd_explain, "report": cmd_report}[args.command]
    code = run_command(handler, args)
    record_exit_status(code)  # under `train --nproc-per-node`: the status the launcher exits with
    return code


def run_command(handler, args) -> int:
    """The command's exit status: its own, or the one its error calls for."""
    try:
        return handler(args)
    except RemoteUnavailable as e:  # the store kept failing at start-up with errors that pass: a restart retries
        print(f"resnet50-recipe: error: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except UserError as e:  # bad input: one clear line, no traceback; anything else is a bug and keeps its own
        print(f"resnet50-recipe: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CheckpointError as e:  # a full or failing disk: nothing saved is lost, and a restart would not help
        print(f"resnet50-recipe: error: {e}", file=sys.stderr)
        return EXIT_BUG
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:
        if not is_transient(e):  # a bug: keep the traceback (Python exits 1, EXIT_BUG)
            raise
        print(f"resnet50-recipe: error: the store failed at start-up ({e}); a restart tries again", file=sys.stderr)
        return EXIT_PREEMPTED
