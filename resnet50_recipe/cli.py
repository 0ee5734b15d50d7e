"""`resnet50-recipe`: argument parsing and dispatch, nothing else."""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from .recipe import RecipeError, shipped_recipes
from .storage import RemoteError

# Shortcut flags named as in the guide; each is a `--set` in disguise and shows in the resolved recipe.
SHORTCUTS = {"data": "data.path", "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "optim.lr",
             "workers": "data.workers", "remote": "checkpoint.remote"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet50-recipe", description="Train timm ImageNet classifiers from "
                                     "validated YAML recipes. See README.md for the recipes and their sources.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a recipe", description="Train a recipe: a YAML file or a shipped "
                       f"recipe name ({', '.join(sorted(shipped_recipes()))}).")
    p.add_argument("recipe", help="recipe file or shipped recipe name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe key; the value is parsed as YAML (repeatable)")
    p.add_argument("--output", help="run directory (default: runs/<recipe name>)")
    p.add_argument("--resume", default="auto", metavar="auto|PATH",
                   help="auto (default): continue from the newest valid checkpoint in --output, if any; "
                        "PATH: continue from that checkpoint")
    p.add_argument("--no-resume", dest="resume", action="store_const", const="never",
                   help="start fresh; refuses to replace checkpoints unless --force")
    p.add_argument("--force", action="store_true", help="with --no-resume: delete the earlier run's checkpoints")
    p.add_argument("--allow-recipe-change", action="store_true",
                   help="resume even though the recipe differs from the checkpoint's in result-changing keys")
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
    p.add_argument("--quiet", action="store_true", help="print only errors and the final result")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")

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

    p = sub.add_parser("export", help="write a run's weights in timm's Hugging Face Hub format")
    p.add_argument("source", help="run directory or checkpoint file")
    p.add_argument("out", help="folder to write model.safetensors, config.json, README.md, curves.png")
    p.add_argument("--weights", choices=("auto", "ema", "raw", "best"), default="auto",
                   help="auto (default): EMA or raw, whichever scored the better val top-1; best: the run's best "
                        "checkpoint")
    p.add_argument("--label-names", help="file with one class name per line, in class-index order")
    p.add_argument("--repo-id", help="the Hub repo the model card's loading snippet names")
    p.add_argument("--license", default="apache-2.0")
    p.add_argument("--dataset", help="Hub dataset id for the model card, e.g. imagenet-1k")

    p = sub.add_parser("push", help="push an export folder to the Hugging Face Hub")
    p.add_argument("folder")
    p.add_argument("--repo-id", required=True, help="user/name")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="branch to push to (created when missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message")

    p = sub.add_parser("runs", help="list or fetch runs synced to S3")
    runs_sub = p.add_subparsers(dest="runs_command", required=True)
    q = runs_sub.add_parser("ls", help="list the runs under s3://bucket/prefix")
    q.add_argument("remote")
    q.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 or AWS)")
    q = runs_sub.add_parser("pull", help="download a run's checkpoints and files")
    q.add_argument("remote")
    q.add_argument("out")
    q.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 or AWS)")

    p = sub.add_parser("data", help="prepare datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("synthetic", help="write a learnable, generated JPEG ImageFolder")
    q.add_argument("out")
    q.add_argument("--classes", type=int, default=10)
    q.add_argument("--per-class", type=int, default=300, help="train images per class")
    q.add_argument("--val-per-class", type=int, default=50)
    q.add_argument("--size", type=int, default=64, help="image side in pixels")
    q.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("bench", help="measure speed")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    q = bench_sub.add_parser("step", help="training-step images/s against a bare PyTorch loop doing the same work",
                             description="Time the trainer's step and a hand-written loop on the same synthetic "
                             "device batches (no data loading), interleaved; print both, their ratio and peak "
                             "GPU memory.")
    q.add_argument("--model", default="resnet50", help="timm model name")
    q.add_argument("--img-size", type=int, default=224)
    q.add_argument("--batch-size", type=int, default=128)
    q.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision on CUDA: fp16 before Ampere, bf16 from Ampere on (the CPU runs fp32)")
    q.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    q.add_argument("--compile", action="store_true", help="torch.compile both sides")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    q.add_argument("--steps", type=int, default=20, help="optimizer steps per trial")
    q.add_argument("--warmup", type=int, default=5, help="untimed steps per side first")
    q.add_argument("--trials", type=int, default=7)
    q.add_argument("--json", action="store_true", help="print one JSON line instead of text")

    p = sub.add_parser("watch", help="live view of a run: progress, loss, top-1, speed, ETA, checkpoint, cost",
                       description="Redraw a run's status every --interval seconds until it finishes (Ctrl-C "
                       "stops watching, not the run). RUN is a run directory or the s3://bucket/prefix it syncs to.")
    p.add_argument("run", metavar="RUN_DIR|s3://...")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between refreshes (default 10)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 or AWS)")

    p = sub.add_parser("predict", help="top-5 labels with probabilities for images")
    p.add_argument("model", metavar="CHECKPOINT|RUN_DIR|EXPORT_DIR")
    p.add_argument("images", nargs="+")
    p.add_argument("--top", type=int, default=5, help="labels per image (default 5)")
    p.add_argument("--weights", choices=("auto", "ema", "raw", "best"), default="auto",
                   help="for a checkpoint or run: which weights (as for export)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser("explain", help="Grad-CAM heatmap of what the model looked at, as a PNG overlay")
    p.add_argument("model", metavar="CHECKPOINT|RUN_DIR|EXPORT_DIR")
    p.add_argument("image")
    p.add_argument("--out", required=True, help="PNG to write, at the input image's size")
    p.add_argument("--class", dest="target", metavar="NAME|INDEX",
                   help="the class to explain (default: the top prediction)")
    p.add_argument("--weights", choices=("auto", "ema", "raw", "best"), default="auto")

    p = sub.add_parser("report", help="an offline HTML report of a run: curves, per-class accuracy, confusion "
                       "matrix, confident mistakes, time and cost")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--out", help="folder for index.html and its PNGs (default: RUN_DIR/report)")
    p.add_argument("--weights", choices=("auto", "ema", "raw", "best"), default="auto",
                   help="the checkpoint evaluated on val (as for export)")
    p.add_argument("--data", help="dataset folder (default: the one the run's recipe names)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--device", default="auto")
    return parser


def cmd_bench(args) -> int:
    from .stepbench import bench_step

    r = bench_step(args.model, args.img_size, args.batch_size, args.amp, args.channels_last, args.compile,
                   args.device, args.steps, args.warmup, args.trials)
    if args.json:
        print(json.dumps(r))
        return 0
    mem = (f"; peak memory {r['trainer_peak_mem_gb']} GB (trainer) vs {r['bare_peak_mem_gb']} GB (bare)"
           if r["trainer_peak_mem_gb"] is not None else "")
    print(f"{r['model']} at {r['img_size']} px, batch {r['batch_size']}, amp {r['amp']}, channels_last "
          f"{r['channels_last']}, compile {r['compile']}, on {r['card']} ({r['device']}, {r['threads']} threads)\n"
          f"trainer {r['trainer_img_per_s']:.1f} img/s, bare loop {r['bare_img_per_s']:.1f} img/s: ratio "
          f"{r['ratio']:.3f} (median of paired trials {r['median_paired_ratio']:.3f}){mem}")
    return 0


def cmd_train(args) -> int:
    from .recipe import load_recipe, to_yaml

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
        return 0
    if args.nproc_per_node and "LOCAL_RANK" not in os.environ:
        return relaunch_with_torchrun(args, recipe)
    from .engine import train
    from .spot import EXIT_PREEMPTED

    summary = train(recipe, args.output, quiet=args.quiet, resume=args.resume, force=args.force,
                    allow_recipe_change=args.allow_recipe_change)
    if summary["stopped"]:
        return EXIT_PREEMPTED  # "try again": a supervisor restarts on it and --resume auto continues
    if args.quiet and summary["top1"] is not None:
        print(f"val top-1 {summary['top1']:.4f}")
    return 0


def relaunch_with_torchrun(args, recipe) -> int:
    """`train --nproc-per-node N` is `torchrun --standalone --nproc-per-node N -m resnet50_recipe train ...`.

    torchrun reports any non-zero worker exit as its own failure, so a run that stopped for preemption is
    recognised from its summary and still exits 75.
    """
    from .spot import EXIT_PREEMPTED

    argv, skip = [], False
    for item in args.argv:
        if skip:
            skip = False
        elif item == "--nproc-per-node":
            skip = True
        elif not item.startswith("--nproc-per-node="):
            argv.append(item)
    started = time.time()
    code = subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={args.nproc_per_node}", "-m", "resnet50_recipe", *argv])
    summary = Path(args.output or Path("runs") / recipe.name) / "summary.json"
    if (code != 0 and summary.is_file() and summary.stat().st_mtime >= started
            and json.loads(summary.read_text()).get("stopped")):
        return EXIT_PREEMPTED
    return code


def cmd_eval(args) -> int:
    from .engine import evaluate_checkpoint

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
    return 0


def cmd_export(args) -> int:
    from .hub import export

    out = export(args.source, args.out, args.weights, args.label_names, args.repo_id, args.license, args.dataset)
    print(f"wrote {out}; it loads with timm.create_model('local-dir:{out}', pretrained=True)")
    return 0


def cmd_push(args) -> int:
    from .hub import push

    push(args.folder, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr,
         commit_message=args.commit_message)
    print(f"pushed {args.folder} to https://huggingface.co/{args.repo_id}")
    return 0


def cmd_runs(args) -> int:
    from .storage import S3Store, list_runs, pull_run

    store = S3Store(args.remote, args.endpoint_url)
    if args.runs_command == "ls":
        runs = list_runs(store)
        for r in runs:
            top1 = "-" if r["top1"] is None else f"{r['top1']:.4f}"
            best = "-" if r["best_top1"] is None else f"{r['best_top1']:.4f}"
            state = "stopped" if r["stopped"] else ("running or preempted" if r["stopped"] is None else "finished")
            print(f"{r['run']}  epoch {r['epoch']}  step {r['step']}  top-1 {top1}  best {best}  {state}")
        if not runs:
            print(f"no runs under {args.remote}")
        return 0
    fetched = pull_run(store, Path(args.out))
    print(f"fetched {len(fetched)} files from {args.remote} into {args.out}")
    return 0


def cmd_data(args) -> int:
    from .synthetic import generate

    out = generate(args.out, classes=args.classes, per_class=args.per_class, val_per_class=args.val_per_class,
                   size=args.size, seed=args.seed)
    print(f"wrote {out}: {args.classes} classes, {args.per_class} train + {args.val_per_class} val images each")
    return 0


def cmd_watch(args) -> int:
    from .watch import watch

    watch(args.run, interval=args.interval, once=args.once, endpoint_url=args.endpoint_url)
    return 0


def cmd_predict(args) -> int:
    from .predict import predict

    results = predict(args.model, args.images, top=args.top, weights=args.weights)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(r["image"])
        for t in r["top"]:
            print(f"  {t['prob']:7.2%}  {t['label']} ({t['index']})")
    return 0


def cmd_explain(args) -> int:
    from .predict import explain

    r = explain(args.model, args.image, args.out, args.target, weights=args.weights)
    print(f"wrote {r['out']}: Grad-CAM for {r['label']} ({r['index']}, p={r['prob']:.2%})")
    return 0


def cmd_report(args) -> int:
    from .report import report

    page = report(args.run, weights=args.weights, data=args.data, out=args.out, batch_size=args.batch_size,
                  workers=args.workers, device=args.device)
    print(f"wrote {page}")
    return 0


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
               "data": cmd_data, "bench": cmd_bench, "watch": cmd_watch, "predict": cmd_predict,
               "explain": cmd_explain, "report": cmd_report}[args.command]
    try:
        return handler(args)
    except (RecipeError, RemoteError, FileNotFoundError, FileExistsError, ValueError) as e:
        # Bad input: one clear line, no traceback. Anything else is a bug and keeps its traceback.
        print(f"resnet50-recipe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
