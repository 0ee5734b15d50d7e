"""`train` (on one process, or relaunched under torchrun with --nproc-per-node) and `eval`: parsing and dispatch."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from resnet50_recipe.cli.common import SHORTCUTS, add_quiet, add_set
from resnet50_recipe.errors import EXIT_FINISHED, UserError
from resnet50_recipe.recipe import shipped_recipes

__all__ = ["add_train", "cmd_train", "relaunch_with_torchrun", "SHUTDOWN_MARGIN_S", "torchrun_command",
           "STATUS_FILE_ENV", "record_exit_status", "add_eval", "cmd_eval"]

# Where rank 0 of a relaunched run writes its exit status, for `train --nproc-per-node` to exit with it.
STATUS_FILE_ENV = "RESNET50_RECIPE_STATUS_FILE"


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a recipe", description="Train a recipe: a YAML file or a shipped "
                       f"recipe name ({', '.join(sorted(shipped_recipes()))}).")
    p.add_argument("recipe", help="recipe file or shipped recipe name")
    add_set(p)
    p.add_argument("--output", help="run directory (default: runs/<recipe name>)")
    p.add_argument("--resume", default="auto", metavar="auto|PATH",
                   help="auto (default): continue from the newest valid checkpoint in --output, if any; "
                        "PATH: continue from that checkpoint")
    p.add_argument("--no-resume", dest="resume", action="store_const", const="never",
                   help="start fresh; refuses to replace checkpoints unless --force")
    p.add_argument("--force", action="store_true", help="with --no-resume: delete the earlier run's checkpoints")
    p.add_argument("--allow-recipe-change", action="store_true",
                   help="resume even though the recipe (or the train set) differs from the checkpoint's in "
                   "result-changing keys; the model architecture and the classes cannot change even then")
    p.add_argument("--data", help="dataset folder with train/ and val/ (data.path)")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--batch-size", type=int, help="per-process batch size (train.batch_size)")
    p.add_argument("--lr", type=float, help="absolute learning rate, instead of optim.lr_base scaling (optim.lr)")
    p.add_argument("--workers", type=int, help="data-loader worker processes (data.workers)")
    p.add_argument("--remote", help="s3://bucket/prefix to sync checkpoints and run files to, and resume from "
                   "(checkpoint.remote)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (train.amp); the dtype follows the device unless train.amp_dtype is set")
    p.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="run N processes on this machine (one per GPU) by relaunching through torchrun")
    # Several machines: torchrun's static rendezvous instead of --standalone, and still the run's own exit status
    # (75 after a stop) on every machine, which plain torchrun reports as 1 (docs/distributed.md).
    p.add_argument("--nnodes", type=int, default=1, metavar="M", help="with --nproc-per-node: the number of "
                   "machines, each running this same command with its own --node-rank")
    p.add_argument("--node-rank", type=int, default=0, metavar="R", help="with --nnodes: this machine's rank, "
                   "0 on the --master-addr machine, whose run directory is the run's")
    p.add_argument("--master-addr", metavar="HOST", help="with --nnodes: the address of the node-rank 0 machine")
    p.add_argument("--master-port", type=int, default=29400, metavar="PORT", help="with --nnodes: its port "
                   "(default 29400)")
    add_quiet(p, "print only errors and the final result")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")


def cmd_train(args) -> int:
    # lazy: only the command that runs pays for importing torch, timm or boto3
    from resnet50_recipe.recipe import load_recipe, to_yaml
    from resnet50_recipe.trainer.stop import StopControl, install_signal_handlers

    # For the whole command, not only inside train(): a stop while the recipe loads, or after the run has ended
    # while the process exits (under torchrun, whose SIGTERM would otherwise kill a rank that is done), is a stop.
    control = StopControl()
    install_signal_handlers(control)
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise UserError(f"--nproc-per-node {args.nproc_per_node}: expected 1 or more processes")
    if args.nnodes > 1 and not (args.nproc_per_node and args.master_addr) or args.nnodes < 1 or \
            not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"--nnodes {args.nnodes} --node-rank {args.node_rank}: several machines need "
                        "--nproc-per-node and --master-addr, and a node rank from 0 to nnodes - 1")
    overrides = []
    for name, key in SHORTCUTS.items():
        value = getattr(args, name)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.amp is not None:
        overrides.append(f"train.amp={'true' if args.amp else 'false'}")
    recipe = load_recipe(args.recipe, overrides + args.overrides)  # the explicit --set wins over shortcuts
    if args.print_recipe:
        print(to_yaml(recipe), end="")
        return EXIT_FINISHED
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:
        return relaunch_with_torchrun(args, recipe, control)
    # lazy: only the command that runs pays for importing torch, timm or boto3
    from resnet50_recipe.trainer.run import train

    summary = train(recipe, args.output, quiet=args.quiet, resume=args.resume, force=args.force,
                    allow_recipe_change=args.allow_recipe_change, control=control)
    if args.quiet and summary["top1"] is not None:
        print(f"val top-1 {summary['top1']:.4f}")
    return summary["exit_status"]  # one of errors.py's EXIT_*: docs/exit-codes.md


def relaunch_with_torchrun(args, recipe, control) -> int:
    """`train --nproc-per-node N` is `torchrun --standalone --nproc-per-node N -m resnet50_recipe train ...`.

    torchrun reports any non-zero worker exit as its own failure (exit 1), so the command exits with rank 0's own
    status instead: the one rank 0 wrote to the file named by $RESNET50_RECIPE_STATUS_FILE as it exited
    (`record_exit_status`; a set-up error too, 2 or 75), else the one in the summary.json it wrote (a rank 0
    killed after its summary). That is how a preempted job exits 75 as a whole. A signal to this process is
    passed on to torchrun, which passes it to the workers, with the grace period `torchrun_command` sets.
    """
    started = time.time()
    env = dict(os.environ)
    status_dir = tempfile.mkdtemp(prefix="resnet50-recipe-status-")
    status_file = Path(status_dir) / "rank0"
    env[STATUS_FILE_ENV] = str(status_file)
    # A session of its own, so that a Ctrl-C in the terminal reaches torchrun once, through us, and not twice
    # (a worker counts a second SIGINT as "exit now"). The systemd unit uses KillMode=mixed for the same reason.
    child = subprocess.Popen(torchrun_command(args.argv, args.nproc_per_node, recipe.checkpoint.stop_timeout_s),
                             env=env, start_new_session=True)
    previous = {sig: signal.signal(sig, lambda signum, frame: child.send_signal(signum))
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        status = status_file.read_text().strip() if status_file.is_file() else ""
        status_file.unlink(missing_ok=True)
        os.rmdir(status_dir)
    if code != 0 and status.isdigit() and int(status) != 0:
        return int(status)
    summary = Path(args.output or Path("runs") / recipe.name) / "summary.json"
    if code != 0 and summary.is_file() and summary.stat().st_mtime >= started:
        return json.loads(summary.read_text()).get("exit_status", code)
    return code


SHUTDOWN_MARGIN_S = 10  # torchrun's SIGKILL comes this long after the stop's deadline: time for the exit itself


# The flags of `train` that are torchrun's: they go to torchrun, not to the workers.
TORCHRUN_FLAGS = ("--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port")


def torchrun_command(argv: list[str], nproc: int, stop_timeout_s: float) -> list[str]:
    """The torchrun command line that runs `argv` (this command's, less the torchrun flags) on `nproc` processes:
    --standalone on one machine, a static rendezvous on node rank 0's --master-addr with --nnodes.

    torchrun passes a SIGTERM on to the workers and kills them 30 s later unless told otherwise, in the middle of
    a stop's checkpoint, which may take `checkpoint.stop_timeout_s`: `--shutdown-timeout` (torch 2.12 and later,
    setup.cfg's floor) raises that grace to the stop's deadline and a margin. A TORCH_ELASTIC_SHUTDOWN_TIMEOUT
    the user set is theirs, and kept."""
    rest, ours, flag = [], {}, None
    for item in argv:
        if flag:
            ours[flag], flag = item, None
        elif item in TORCHRUN_FLAGS:
            flag = item
        elif item.startswith(tuple(f"{f}=" for f in TORCHRUN_FLAGS)):
            ours[item.split("=", 1)[0]] = item.split("=", 1)[1]
        else:
            rest.append(item)
    grace = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or str(math.ceil(stop_timeout_s) + SHUTDOWN_MARGIN_S)
    where = ["--standalone"]
    if int(ours.get("--nnodes", 1)) > 1:
        where = [f"--nnodes={ours['--nnodes']}", f"--node-rank={ours.get('--node-rank', 0)}",
                 f"--master-addr={ours['--master-addr']}", f"--master-port={ours.get('--master-port', 29400)}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}",
            f"--shutdown-timeout={grace}", "-m", "resnet50_recipe", *rest]


def record_exit_status(code: int) -> None:
    """Under `train --nproc-per-node`, each machine's local rank 0 (rank 0 on the first) writes the status it exits
    with for that machine's launcher to exit with: every rank ends with the run's status (an agreed stop: 75)."""
    path = os.environ.get(STATUS_FILE_ENV)
    if path and os.environ.get("LOCAL_RANK") == "0":
        Path(path).write_text(f"{code}\n")


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on DIR/val")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="dataset folder (default: the one the checkpoint's recipe names)")
    p.add_argument("--img-size", type=int, help="eval resolution (default: the recipe's augment.eval_size)")
    p.add_argument("--crop-pct", type=float, help="center-crop fraction (default: the recipe's augment.crop_pct)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average the logits of each image and its mirror (default: the recipe's augment.eval_flip)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", dest="json_out", help="where to write the JSON result "
                   "(default: CHECKPOINT with .eval.json appended)")


def cmd_eval(args) -> int:
    # lazy: only the command that runs pays for importing torch, timm or boto3
    from resnet50_recipe.inspect.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.data, args.img_size, args.crop_pct, args.batch_size,
                                 args.workers, args.device, args.flip)
    out = Path(args.json_out or f"{args.checkpoint}.eval.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    for weights in ("raw", "ema"):
        if weights in result:
            r = result[weights]
            print(f"{weights}: top-1 {r['top1']:.4f}  top-5 {r['top5']:.4f}  ({r['count']} images at "
                  f"{result['img_size']} px, crop {result['crop_pct']}{', flip TTA' if result['flip'] else ''})")
    print(f"wrote {out}")
    return EXIT_FINISHED
