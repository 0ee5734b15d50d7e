"""`resnet50-recipe`: argument parsing and dispatch, nothing else."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .checkpoint import CheckpointError
from .recipe import RecipeError, shipped_recipes
from .spot import EXIT_PREEMPTED
from .storage import RemoteError, RemoteUnavailable, is_transient

# Shortcut flags named as in the guide; each is a `--set` in disguise and shows in the resolved recipe.
SHORTCUTS = {"data": "data.path", "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "optim.lr",
             "workers": "data.workers", "remote": "checkpoint.remote"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet50-recipe", description="Train timm ImageNet classifiers from "
                                     "validated YAML recipes. See README.md for the recipes and their sources.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_train, add_eval, add_export, add_push, add_runs, add_data, add_bench, add_aws, add_watch,
                add_predict, add_explain, add_report):
        add(sub)
    return parser


# Flags several commands share, each defined once.
def add_set(p) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe key; the value is parsed as YAML (repeatable)")


def add_endpoint_url(p) -> None:
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 or AWS)")


def add_weights(p, help: str = "which weights: auto (EMA or raw, whichever scored the better val top-1), ema, "
                "raw, or best (the run's best checkpoint)") -> None:
    p.add_argument("--weights", choices=("auto", "ema", "raw", "best"), default="auto", help=help)


def add_quiet(p, help: str) -> None:
    p.add_argument("--quiet", action="store_true", help=help)


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
    add_quiet(p, "print only errors and the final result")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")


def cmd_train(args) -> int:
    from .recipe import load_recipe, to_yaml
    from .spot import StopControl, install_signal_handlers

    # For the whole command, not only inside train(): a stop while the recipe loads, or after the run has ended
    # while the process exits (under torchrun, whose SIGTERM would otherwise kill a rank that is done), is a stop.
    control = StopControl()
    install_signal_handlers(control)
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node {args.nproc_per_node}: expected 1 or more processes")
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
        return relaunch_with_torchrun(args, recipe, control)
    from .engine import train

    summary = train(recipe, args.output, quiet=args.quiet, resume=args.resume, force=args.force,
                    allow_recipe_change=args.allow_recipe_change, control=control)
    if args.quiet and summary["top1"] is not None:
        print(f"val top-1 {summary['top1']:.4f}")
    return summary["exit_status"]  # 0, 3, 74 or 75: README's exit-code table


def relaunch_with_torchrun(args, recipe, control) -> int:
    """`train --nproc-per-node N` is `torchrun --standalone --nproc-per-node N -m resnet50_recipe train ...`.

    torchrun reports any non-zero worker exit as its own failure (exit 1), so the run's own status is read from
    the summary.json rank 0 wrote, which is how a preempted job exits 75 as a whole. A signal to this process is
    passed on to torchrun, which passes it to the workers; torchrun's grace period before SIGKILL is raised to
    the stop's own deadline (`checkpoint.stop_timeout_s`), so that no rank is killed while it saves.
    """
    argv, skip = [], False
    for item in args.argv:
        if skip:
            skip = False
        elif item == "--nproc-per-node":
            skip = True
        elif not item.startswith("--nproc-per-node="):
            argv.append(item)
    started = time.time()
    env = dict(os.environ)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(recipe.checkpoint.stop_timeout_s) + 10))
    # A session of its own, so that a Ctrl-C in the terminal reaches torchrun once, through us, and not twice
    # (a worker counts a second SIGINT as "exit now"). The systemd unit uses KillMode=mixed for the same reason.
    child = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={args.nproc_per_node}", "-m", "resnet50_recipe", *argv], env=env,
                             start_new_session=True)
    previous = {sig: signal.signal(sig, lambda signum, frame: child.send_signal(signum))
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary = Path(args.output or Path("runs") / recipe.name) / "summary.json"
    if code != 0 and summary.is_file() and summary.stat().st_mtime >= started:
        return json.loads(summary.read_text()).get("exit_status", code)
    return code


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


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a run's weights in timm's Hugging Face Hub format")
    p.add_argument("source", help="run directory or checkpoint file")
    p.add_argument("out", help="folder to write model.safetensors, config.json, README.md, curves.png")
    add_weights(p, "auto (default): EMA or raw, whichever scored the better val top-1; best: the run's best "
                   "checkpoint")
    p.add_argument("--label-names", help="file with one class name per line, in class-index order")
    p.add_argument("--repo-id", help="the Hub repo the model card's loading snippet names")
    p.add_argument("--license", default="apache-2.0")
    p.add_argument("--dataset", help="Hub dataset id for the model card, e.g. imagenet-1k")


def cmd_export(args) -> int:
    from .hub import export

    out = export(args.source, args.out, args.weights, args.label_names, args.repo_id, args.license, args.dataset)
    print(f"wrote {out}; it loads with timm.create_model('local-dir:{out}', pretrained=True)")
    return 0


def add_push(sub) -> None:
    p = sub.add_parser("push", help="push an export folder to the Hugging Face Hub")
    p.add_argument("folder")
    p.add_argument("--repo-id", required=True, help="user/name")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="branch to push to (created when missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message")


def cmd_push(args) -> int:
    from .hub import push

    push(args.folder, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr,
         commit_message=args.commit_message)
    print(f"pushed {args.folder} to https://huggingface.co/{args.repo_id}")
    return 0


def add_runs(sub) -> None:
    p = sub.add_parser("runs", help="list or fetch runs synced to S3")
    runs_sub = p.add_subparsers(dest="runs_command", required=True)
    q = runs_sub.add_parser("ls", help="list the runs under s3://bucket/prefix")
    q.add_argument("remote")
    add_endpoint_url(q)
    q = runs_sub.add_parser("pull", help="download a run's checkpoints and files")
    q.add_argument("remote")
    q.add_argument("out")
    add_endpoint_url(q)


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
    fetched, refused = pull_run(store, Path(args.out))
    print(f"fetched {len(fetched)} files from {args.remote} into {args.out}")
    if refused:  # named in the warnings above; nothing was written for them
        print(f"refused {len(refused)} object(s) whose keys would land outside {args.out}", file=sys.stderr)
        return 2
    return 0


def add_data(sub) -> None:
    p = sub.add_parser("data", help="prepare datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("synthetic", help="write a learnable, generated JPEG ImageFolder")
    q.add_argument("out")
    q.add_argument("--classes", type=int, default=10)
    q.add_argument("--per-class", type=int, default=300, help="train images per class")
    q.add_argument("--val-per-class", type=int, default=50)
    q.add_argument("--size", type=int, default=64, help="image side in pixels")
    q.add_argument("--seed", type=int, default=0)
    q = data_sub.add_parser("imagenette", help="download and extract fast.ai's Imagenette into OUT/train and OUT/val",
                            description="Download (resuming a partial download) and checksum-verify an Imagenette "
                            "archive, then extract it into OUT/train and OUT/val.")
    q.add_argument("out")
    q.add_argument("--size", choices=("160", "320", "full"), default="160",
                   help="short side of the images in pixels, or full resolution (default 160)")
    q.add_argument("--url", help="archive URL, for a mirror (default: fast.ai's S3 bucket)")
    q.add_argument("--md5", help="expected MD5 (default: the official archive's, as pinned by torchvision)")
    q.add_argument("--sha256", help="expected SHA-256, instead of the MD5")
    q.add_argument("--no-checksum", action="store_true", help="skip the checksum (a mirror of another file)")
    q.add_argument("--archive-dir", help="where the archive is downloaded and kept (default: OUT's parent)")
    add_quiet(q, "no progress bars")
    q = data_sub.add_parser("imagenet", help="build ImageNet-1k's OUT/train and OUT/val from the official archives, "
                            "Kaggle or the Hugging Face Hub",
                            description="Unpack ImageNet-1k into OUT/train/<wnid> and OUT/val/<wnid> from the official "
                            "ILSVRC2012 archives (val sorted by the devkit's ground truth), Kaggle's ImageNet Object "
                            "Localization Challenge, the Hub's ILSVRC/imagenet-1k archives or timm/imagenet-1k-wds "
                            "shards, optionally resized as it goes; check the counts and verify every image "
                            "(OUT/verify.json). Restartable: a rerun continues where an interrupted run stopped.")
    q.add_argument("out")
    q.add_argument("--train-tar", help="ILSVRC2012_img_train.tar: a path or s3://bucket/key")
    q.add_argument("--val-tar", help="ILSVRC2012_img_val.tar: a path or s3://bucket/key")
    q.add_argument("--devkit", help="ILSVRC2012_devkit_t12.tar.gz: a path or s3://bucket/key")
    q.add_argument("--from", dest="source", metavar="DIR|S3_PREFIX|hf:REPO",
                   help="a folder holding the three official archives, Kaggle's download (ILSVRC/ and "
                        "LOC_val_solution.csv), the Hub's train_images_*.tar.gz + val_images.tar.gz or webdataset "
                        "shards; s3://bucket/prefix holding the official archives (streamed, never copied to disk); "
                        "or hf:ILSVRC/imagenet-1k or hf:timm/imagenet-1k-wds, downloaded first")
    q.add_argument("--archive-dir", help="where an hf: source is downloaded and kept (default: OUT's parent/"
                   "owner--name)")
    q.add_argument("--short-side", type=int, help="write each image resized to this short side in pixels (e.g. "
                   "256) instead of its original bytes; smaller images keep theirs")
    q.add_argument("--quality", type=int, default=90, help="JPEG quality of resized images (default 90)")
    q.add_argument("--workers", type=int, help="writing processes (default: one per core with --short-side, "
                   "else one)")
    add_endpoint_url(q)
    q.add_argument("--verify-md5", action="store_true",
                   help="check the archives against the official MD5s first (reads all ~155 GB once more)")
    q.add_argument("--partial", action="store_true",
                   help="accept counts other than 1000 classes, 1,281,167 train and 50,000 val images")
    add_quiet(q, "no progress bars")
    q = data_sub.add_parser("verify", help="decode every image; report corrupt, truncated, CMYK and mislabelled "
                            "files as JSON")
    q.add_argument("dir", help="dataset folder with train/ and/or val/")
    q.add_argument("--fix", action="store_true", help="re-encode CMYK, truncated and non-JPEG .JPEG files in place "
                   "as RGB JPEG (undecodable files are only listed)")
    q.add_argument("--workers", type=int, help="decoding processes (default: one per core but one)")
    q.add_argument("--report", help="where to write the JSON report (default: DIR/verify.json)")
    add_quiet(q, "no progress bars")
    q = data_sub.add_parser("resize", help="write a copy with a smaller short side, which decodes faster")
    q.add_argument("dir")
    q.add_argument("out")
    q.add_argument("--short-side", type=int, default=256, help="pixels (default 256); smaller images are copied")
    q.add_argument("--quality", type=int, default=90, help="JPEG quality of the re-encoded images (default 90)")
    q.add_argument("--workers", type=int, help="processes (default: one per core but one)")
    add_quiet(q, "no progress bars")


def cmd_data(args) -> int:
    if args.data_command == "synthetic":
        from .synthetic import generate

        out = generate(args.out, classes=args.classes, per_class=args.per_class, val_per_class=args.val_per_class,
                       size=args.size, seed=args.seed)
        print(f"wrote {out}: {args.classes} classes, {args.per_class} train + {args.val_per_class} val images each")
        return 0
    if args.data_command == "verify":
        from .images import verify

        result = verify(Path(args.dir), fix=args.fix, workers=args.workers, report=args.report, quiet=args.quiet)
        for split, s in result["splits"].items():
            print(f"{split}: {s['classes']} classes, {s['images']} images")
        for p in result["problems"]:
            fixed = "" if "fixed" not in p else (" (fixed)" if p["fixed"] else " (not fixed)")
            print(f"{p['kind']}: {p['path']}: {p['detail']}{fixed}")
        print(f"wrote {args.report or Path(args.dir) / 'verify.json'}")
        left = [p for p in result["problems"] if not p.get("fixed")]
        return 1 if left or "class_mismatch" in result or "empty_classes" in result else 0
    if args.data_command == "resize":
        from .images import resize

        counts = resize(Path(args.dir), Path(args.out), args.short_side, args.quality, args.workers, args.quiet)
        print(f"wrote {args.out}: " + "; ".join(f"{split}: " + ", ".join(f"{v} {k}" for k, v in c.items())
                                                 for split, c in counts.items()))
        return 0
    from . import prepare

    if args.data_command == "imagenette":
        given = [(name, value) for name, value in (("md5", args.md5), ("sha256", args.sha256)) if value]
        if len(given) > 1:
            raise ValueError("--md5 and --sha256: give one checksum, not both")
        counts = prepare.prepare_imagenette(Path(args.out), args.size, args.url, given[0] if given else None,
                                            verify=not args.no_checksum, archive_dir=args.archive_dir,
                                            quiet=args.quiet)
    else:
        # A SIGTERM (a spot reclaim, `kill`) stops the writers like Ctrl-C: every file is whole or absent, and
        # a rerun of the same command continues.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        written = dict(short_side=args.short_side, quality=args.quality, workers=args.workers, quiet=args.quiet)
        if args.source and not args.source.startswith("s3://") and not (args.train_tar or args.val_tar or args.devkit):
            counts = prepare.prepare_imagenet_from(Path(args.out), args.source, partial=args.partial,
                                                   archive_dir=args.archive_dir, verify_md5=args.verify_md5,
                                                   **written)
        else:
            archives = {}
            for kind, flag in (("train", "train_tar"), ("val", "val_tar"), ("devkit", "devkit")):
                given = getattr(args, flag)
                if not given and not args.source:
                    raise ValueError(f"data imagenet: say where {prepare.IMAGENET_ARCHIVES[kind][0]} is "
                                     f"(--{flag.replace('_', '-')} or --from)")
                archives[kind] = given or f"{args.source.rstrip('/')}/{prepare.IMAGENET_ARCHIVES[kind][0]}"
            counts = prepare.prepare_imagenet(Path(args.out), archives["train"], archives["val"], archives["devkit"],
                                              verify_md5=args.verify_md5, partial=args.partial,
                                              endpoint_url=args.endpoint_url, **written)
    print(f"wrote {args.out}: " + "; ".join(f"{split}: {c['classes']} classes, {c['images']} images"
                                           for split, c in counts.items()))
    return 0


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure throughput: the input pipeline and the training step")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    q = bench_sub.add_parser("data", help="images/s of a recipe's training input pipeline per worker count",
                             description="Run the recipe's training input pipeline (decode, augment, collate) on "
                             "DIR/train and report images/s per worker count, and whether that feeds a T4.")
    q.add_argument("dir", help="dataset folder with train/")
    q.add_argument("--workers", default="1,2,4,8", help="comma-separated worker counts (default 1,2,4,8)")
    q.add_argument("--recipe", default="imagenet-100ep", help="recipe whose pipeline runs (default imagenet-100ep)")
    add_set(q)
    q.add_argument("--decode", choices=("recipe", "draft", "full", "both"), default="recipe",
                   help="JPEG decoding: the recipe's augment.draft_decode (default), draft (reduced-size), full, "
                        "or both, one after the other")
    q.add_argument("--batches", type=int, default=20, help="batches timed per measurement (default 20)")
    q.add_argument("--batch-size", type=int, help="default: the recipe's train.batch_size")
    q.add_argument("--target", type=float, default=400.0,
                   help="img/s the GPU consumes (default 400: a T4's AMP ResNet-50 rate)")
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


def cmd_bench_step(args) -> int:
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


def cmd_bench(args) -> int:
    if args.bench_command == "step":
        return cmd_bench_step(args)
    from .bench_data import measure, verdict
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        raise ValueError(f"--workers {args.workers!r}: expected comma-separated integers, e.g. 1,2,4,8") from None
    modes = {"recipe": [None], "draft": [True], "full": [False], "both": [False, True]}[args.decode]
    for draft in modes:
        results = []
        for w in workers:
            r = measure(Path(args.dir), recipe, w, args.batches, draft, args.batch_size)
            results.append(r)
            print(f"{'draft' if r['draft_decode'] else 'full'} decode, {r['train_size']} px, {w} workers: "
                  f"{r['img_s']:.0f} img/s ({r['img_s'] / max(1, w):.0f} per worker)", flush=True)
        print(verdict(results, args.target))
    return 0


def add_aws(sub) -> None:
    p = sub.add_parser("aws", help="price, launch, watch and stop spot training runs on AWS (needs boto3: the "
                       "[aws] extra)", description="Spot training runs on AWS. Every client honours "
                       "AWS_ENDPOINT_URL; credentials and region come from boto3's chain. See aws/README.md.")
    aws_sub = p.add_subparsers(dest="aws_command", required=True)
    q = aws_sub.add_parser("price", help="spot price per AZ, on-demand price and, with --recipe, hours and cost")
    q.add_argument("--instance-types", default="g4dn.xlarge,g4dn.2xlarge,g5.xlarge,g5.2xlarge,p3.2xlarge",
                   help="comma-separated instance types")
    q.add_argument("--recipe", help="recipe file or shipped name to estimate hours and cost for")
    q.add_argument("--images", type=int, help="train images per epoch (default: known for ImageNet-1k and the "
                   "generated data)")
    add_set(q)
    q = aws_sub.add_parser("launch", help="launch a persistent spot instance that trains a recipe")
    q.add_argument("recipe", help="recipe file or shipped name; resolved and checked here, uploaded to the run")
    q.add_argument("--bucket", required=True, metavar="s3://BUCKET/PREFIX",
                   help="where runs live; this one goes to PREFIX/NAME")
    q.add_argument("--name", help="run name (default: the recipe's name)")
    add_set(q)
    q.add_argument("--instance-type", default="g4dn.2xlarge", metavar="TYPE[,TYPE...]|auto",
                   help="one type, several tried in order, or auto: every type that fits the spot quota, ranked by "
                   "estimated cost to finish (default g4dn.2xlarge)")
    q.add_argument("--budget-usd", type=float, help="refuse when the estimate (aws price's, with the disk) passes "
                   "it; on the instance the run checkpoints and stops (exit 4) before it would (train.budget_usd)")
    q.add_argument("--push", metavar="USER/NAME", help="push the weights to this Hugging Face repository from the "
                   "instance; the token (HF_TOKEN or your login) goes to SSM Parameter Store, never to S3 or the logs")
    q.add_argument("--private", action="store_true", help="with --push: a private repository")
    q.add_argument("--keep-instance", action="store_true", help="at the end power the instance off instead of "
                   "cancelling its spot request and terminating it (it then bills its disk until aws stop)")
    q.add_argument("--abort-incomplete-uploads", action="store_true", help="add a lifecycle rule to the bucket "
                   "that aborts multipart uploads unfinished after a day under the runs' prefix (offered when missing)")
    place = q.add_mutually_exclusive_group()
    place.add_argument("--az", default="auto", help="availability zone; auto (default): the cheapest with capacity")
    place.add_argument("--subnet", help="launch into this subnet (its AZ) instead")
    q.add_argument("--key-name", help="EC2 key pair for SSH (not needed: status and logs work without)")
    q.add_argument("--security-group", dest="security_groups", action="append", default=[], metavar="SG_ID")
    source = q.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="s3://...", help="dataset: a folder with train/ and val/, or a .tar or "
                        ".tar.gz of one; copied to the instance's disk once")
    source.add_argument("--volume", metavar="snap-...", help="dataset: an EBS snapshot whose filesystem holds "
                        "train/ and val/, attached as a volume")
    q.add_argument("--ami", help="AMI id, or the name of an SSM parameter holding one (default: the public "
                   "parameter of the current AWS Deep Learning Base AMI, Ubuntu 22.04)")
    q.add_argument("--package", help="what the instance pip-installs: a pip spec, a local .whl (uploaded to the "
                   "run) or an s3://...whl (default: this version from PyPI when it is an exact release installed from "
                   "an index, else a wheel of it, built and shipped through the run's prefix)")
    q.add_argument("--disk-gb", type=int, help="root volume size in GB; data copied from S3 and checkpoints live "
                   "there (default: 300 for ImageNet from S3, else 150)")
    q.add_argument("--dry-run", action="store_true", help="print every AWS call with its arguments; make none")
    for command, text in (("status", "instance, spot request, last checkpoint, metrics, cost so far, ETA"),
                          ("logs", "the instance's console output: setup and training log"),
                          ("stop", "cancel the persistent spot request and terminate the instance; S3 stays")):
        q = aws_sub.add_parser(command, help=text)
        q.add_argument("run", help="run name")
    for q in (aws_sub.choices["launch"], aws_sub.choices["status"]):
        q.add_argument("--follow", action="store_true", help="redraw the status, as watch does, until the run ends; "
                       "then print where the weights are (S3, Hub)")
        q.add_argument("--interval", type=float, default=60.0, help="with --follow: seconds between redraws")
    q = aws_sub.add_parser("ls", help="the runs launched by this tool, by tag")
    for q in aws_sub.choices.values():
        q.add_argument("--region", help="AWS region (default: boto3's configured region, else us-east-1)")


def cmd_aws(args) -> int:
    from . import aws

    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        BotoCoreError = ClientError = aws.AwsError  # noqa: N806  boto3 missing: aws._boto3() says how to fix it
    try:
        if args.aws_command == "price":
            recipe = None
            if args.recipe:
                from .recipe import load_recipe
                recipe = load_recipe(args.recipe, args.overrides)
            aws.price([t.strip() for t in args.instance_types.split(",") if t.strip()], args.region, recipe,
                      args.images)
        elif args.aws_command == "launch":
            launched = aws.launch(args.recipe, args.bucket, name=args.name, overrides=args.overrides,
                                  instance_type=args.instance_type, region=args.region, az=args.az, subnet=args.subnet,
                                  key_name=args.key_name, security_groups=args.security_groups, data=args.data,
                                  volume=args.volume, ami=args.ami, package=args.package, disk_gb=args.disk_gb,
                                  budget_usd=args.budget_usd, push=args.push, private=args.private,
                                  keep_instance=args.keep_instance,
                                  abort_incomplete_uploads=args.abort_incomplete_uploads, dry_run=args.dry_run)
            if args.follow and not args.dry_run:
                aws.follow(args.name or launched["run"], args.region, args.interval)
        elif args.aws_command == "status" and args.follow:
            aws.follow(args.run, args.region, args.interval)
        elif args.aws_command == "status":
            aws.print_status(aws.run_status(args.run, args.region))
        elif args.aws_command == "logs":
            print(aws.logs(args.run, args.region))
        elif args.aws_command == "stop":
            aws.stop(args.run, args.region)
        else:
            aws.ls(args.region)
    except (aws.AwsError, ClientError, BotoCoreError) as e:
        # AWS refused, or would: one line, exit 1 (2 stays for bad input, raised as ValueError above).
        print(f"resnet50-recipe: aws {args.aws_command}: {e}", file=sys.stderr)
        return 1
    return 0


def add_watch(sub) -> None:
    p = sub.add_parser("watch", help="live view of a run: progress, loss, top-1, speed, ETA, checkpoint, cost",
                       description="Redraw a run's status every --interval seconds until it finishes (Ctrl-C "
                       "stops watching, not the run). RUN is a run directory or the s3://bucket/prefix it syncs to.")
    p.add_argument("run", metavar="RUN_DIR|s3://...")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between refreshes (default 10)")
    add_endpoint_url(p)


def cmd_watch(args) -> int:
    from .watch import watch

    watch(args.run, interval=args.interval, once=args.once, endpoint_url=args.endpoint_url)
    return 0


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="top-5 labels with probabilities for images")
    p.add_argument("model", metavar="CHECKPOINT|RUN_DIR|EXPORT_DIR")
    p.add_argument("images", nargs="+")
    p.add_argument("--top", type=int, default=5, help="labels per image (default 5)")
    add_weights(p, "for a checkpoint or run: which weights (as for export)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


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


def add_explain(sub) -> None:
    p = sub.add_parser("explain", help="Grad-CAM heatmap of what the model looked at, as a PNG overlay")
    p.add_argument("model", metavar="CHECKPOINT|RUN_DIR|EXPORT_DIR")
    p.add_argument("image")
    p.add_argument("--out", required=True, help="PNG to write, at the input image's size")
    p.add_argument("--class", dest="target", metavar="NAME|INDEX",
                   help="the class to explain (default: the top prediction)")
    add_weights(p)


def cmd_explain(args) -> int:
    from .predict import explain

    r = explain(args.model, args.image, args.out, args.target, weights=args.weights)
    print(f"wrote {r['out']}: Grad-CAM for {r['label']} ({r['index']}, p={r['prob']:.2%})")
    return 0


def add_report(sub) -> None:
    p = sub.add_parser("report", help="an offline HTML report of a run: curves, per-class accuracy, confusion "
                       "matrix, confident mistakes, time and cost")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--out", help="folder for index.html and its PNGs (default: RUN_DIR/report)")
    add_weights(p, "the checkpoint evaluated on val (as for export)")
    p.add_argument("--data", help="dataset folder (default: the one the run's recipe names)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--device", default="auto")


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
               "data": cmd_data, "bench": cmd_bench, "aws": cmd_aws, "watch": cmd_watch, "predict": cmd_predict,
               "explain": cmd_explain, "report": cmd_report}[args.command]
    try:
        return handler(args)
    except RemoteUnavailable as e:  # the store kept failing at start-up with errors that pass: a restart retries
        print(f"resnet50-recipe: error: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except (RecipeError, RemoteError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            PermissionError, UnicodeDecodeError, ValueError) as e:
        # Bad input: one clear line, no traceback. Anything else is a bug and keeps its traceback.
        print(f"resnet50-recipe: error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # a full or failing disk: nothing saved is lost, and a restart would not help
        print(f"resnet50-recipe: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not is_transient(e):  # a bug: keep the traceback
            raise
        print(f"resnet50-recipe: error: the store failed at start-up ({e}); a restart tries again", file=sys.stderr)
        return EXIT_PREEMPTED


if __name__ == "__main__":
    sys.exit(main())
