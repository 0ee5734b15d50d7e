"""The commands that look at runs: `runs ls/pull`, `watch`, `predict`, `explain`, `report`; parsing and dispatch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from resnet50_recipe.cli.common import add_endpoint_url, add_weights
from resnet50_recipe.errors import EXIT_BAD_INPUT, EXIT_FINISHED

__all__ = ["add_runs", "cmd_runs", "add_watch", "cmd_watch", "add_predict", "cmd_predict", "add_explain",
           "cmd_explain", "add_report", "cmd_report"]


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
    # lazy: only the command that runs pays for importing torch, timm or boto3
    from resnet50_recipe.store.runs import list_runs, pull_run
    from resnet50_recipe.store.s3 import S3Store

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
        return EXIT_FINISHED
    fetched, refused = pull_run(store, Path(args.out))
    print(f"fetched {len(fetched)} files from {args.remote} into {args.out}")
    if refused:  # named in the warnings above; nothing was written for them
        print(f"refused {len(refused)} object(s) whose keys would land outside {args.out}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_FINISHED


def add_watch(sub) -> None:
    p = sub.add_parser("watch", help="live view of a run: progress, loss, top-1, speed, ETA, checkpoint, cost",
                       description="Redraw a run's status every --interval seconds until it finishes (Ctrl-C "
                       "stops watching, not the run). RUN is a run directory or the s3://bucket/prefix it syncs to.")
    p.add_argument("run", metavar="RUN_DIR|s3://...")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between refreshes (default 10)")
    add_endpoint_url(p)


def cmd_watch(args) -> int:
    # lazy: only the command that runs pays for importing torch, timm or boto3
    from resnet50_recipe.inspect.watch import watch

    watch(args.run, interval=args.interval, once=args.once, endpoint_url=args.endpoint_url)
    return EXIT_FINISHED


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="top-5 labels with probabilities for images")
    p.add_argument("model", metavar="CHECKPOINT|RUN_DIR|EXPORT_DIR")
    p.add_argument("images", nargs="+")
    p.add_argument("--top", type=int, default=5, help="labels per image (default 5)")
    add_weights(p, "for a checkpoint or run: which weights (as for export)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def cmd_predict(args) -> int:
    # lazy: only the command that runs pays for importing torch, timm or boto3
    from resnet50_recipe.inspect.predict import predict

    results = predict(args.model, args.images, top=args.top, weights=args.weights)
    if args.json:
        print(json.dumps(results, indent=2))
        return EXIT_FINISHED
    for r in results:
        print(r["image"])
        for t in r["top"]:
            print(f"  {t['prob']:7.2%}  {t['label']} ({t['index']})")
    return EXIT_FINISHED


def add_explain(sub) -> None:
    p = sub.add_parser("explain", help="Grad-CAM heatmap of what the model looked at, as a PNG overlay")
    p.add_argument("model", metavar="CHECKPOINT|RUN_DIR|EXPORT_DIR")
    p.add_argument("image")
    p.add_argument("--out", required=True, help="PNG to write, at the input image's size")
    p.add_argument("--class", dest="target", metavar="NAME|INDEX",
                   help="the class to explain (default: the top prediction)")
    add_weights(p)


def cmd_explain(args) -> int:
    # lazy: only the command that runs pays for importing torch, timm or boto3
    from resnet50_recipe.inspect.predict import explain

    r = explain(args.model, args.image, args.out, args.target, weights=args.weights)
    print(f"wrote {r['out']}: Grad-CAM for {r['label']} ({r['index']}, p={r['prob']:.2%})")
    return EXIT_FINISHED


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
    # lazy: only the command that runs pays for importing torch, timm or boto3
    from resnet50_recipe.inspect.report import report

    page = report(args.run, weights=args.weights, data=args.data, out=args.out, batch_size=args.batch_size,
                  workers=args.workers, device=args.device)
    print(f"wrote {page}")
    return EXIT_FINISHED
