"""`bench data` and `bench step`: parsing and dispatch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from resnet50_recipe.cli.common import add_set
from resnet50_recipe.errors import EXIT_FINISHED, UserError

__all__ = ["add_bench", "cmd_bench_step", "cmd_bench"]


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
    # lazy: only the command that runs pays for importing torch, timm or boto3
    from resnet50_recipe.trainer.bench import bench_step

    r = bench_step(args.model, args.img_size, args.batch_size, args.amp, args.channels_last, args.compile,
                   args.device, args.steps, args.warmup, args.trials)
    if args.json:
        print(json.dumps(r))
        return EXIT_FINISHED
    mem = (f"; peak memory {r['trainer_peak_mem_gb']} GB (trainer) vs {r['bare_peak_mem_gb']} GB (bare)"
           if r["trainer_peak_mem_gb"] is not None else "")
    print(f"{r['model']} at {r['img_size']} px, batch {r['batch_size']}, amp {r['amp']}, channels_last "
          f"{r['channels_last']}, compile {r['compile']}, on {r['card']} ({r['device']}, {r['threads']} threads)\n"
          f"trainer {r['trainer_img_per_s']:.1f} img/s, bare loop {r['bare_img_per_s']:.1f} img/s: ratio "
          f"{r['ratio']:.3f} (median of paired trials {r['median_paired_ratio']:.3f}){mem}")
    return EXIT_FINISHED


def cmd_bench(args) -> int:
    if args.bench_command == "step":
        return cmd_bench_step(args)
    # lazy: only the command that runs pays for importing torch, timm or boto3
    from resnet50_recipe.data.bench import measure, verdict
    from resnet50_recipe.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        raise UserError(f"--workers {args.workers!r}: expected comma-separated integers, e.g. 1,2,4,8") from None
    modes = {"recipe": [None], "draft": [True], "full": [False], "both": [False, True]}[args.decode]
    for draft in modes:
        results = []
        for w in workers:
            r = measure(Path(args.dir), recipe, w, args.batches, draft, args.batch_size)
            results.append(r)
            print(f"{'draft' if r['draft_decode'] else 'full'} decode, {r['train_size']} px, {w} workers: "
                  f"{r['img_s']:.0f} img/s ({r['img_s'] / max(1, w):.0f} per worker)", flush=True)
        print(verdict(results, args.target))
    return EXIT_FINISHED
