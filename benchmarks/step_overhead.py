"""Trainer step throughput against a bare PyTorch loop doing the same work on the same model and batch.

Both sides get identical pre-made uint8 batches (no data loading), normalise them on the device, run
forward, loss, backward and an SGD step. The trainer adds what it does every step: the scheduler update,
the GradScaler pass-through, on-device loss accumulation and its timing. Trials alternate between the two
so that machine noise hits both alike. The result: the median of each side, the ratio of medians, and
the median of the per-trial ratios (each trial runs both sides back to back).

    python benchmarks/step_overhead.py [--model resnet50 --size 64 --batch 16 --steps 10 --trials 11]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch

from resnet50_recipe import load_recipe
from resnet50_recipe.engine import build_trainer, train_one_epoch
from resnet50_recipe.runtime import setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per trial")
    parser.add_argument("--trials", type=int, default=11)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    recipe = load_recipe("smoke", [
        f"model.name={args.model}", f"train.batch_size={args.batch}", f"augment.train_size={args.size}",
        "train.device=cpu", "ema.enabled=false", "sched.warmup_epochs=0", f"log.every_steps={args.steps}",
        "loss.label_smoothing=0.0", "optim.weight_decay=0.0", "optim.lr=0.01", "augment.color_jitter=null"])
    rt = setup(recipe.train, recipe.seed)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=generator),
                torch.randint(0, args.classes, (args.batch,), generator=generator), []) for _ in range(4)]

    def feed():
        while True:
            yield from batches

    trainer = build_trainer(recipe, rt, args.classes, updates_per_epoch=args.steps)

    # The bare loop: what one would write by hand around the same timm model.
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=args.classes).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    criterion = torch.nn.CrossEntropyLoss()
    mean = torch.tensor(recipe.augment.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(recipe.augment.std).view(1, 3, 1, 1) * 255

    def bare(steps: int) -> None:
        model.train()
        source = feed()
        for _ in range(steps):
            images, targets, _ = next(source)
            images = images.float().sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)
            loss = criterion(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loss.item()

    def ours(steps: int) -> None:
        train_one_epoch(trainer, feed(), epoch=0, num_batches=steps, log=lambda record: None)

    for run in (bare, ours):  # warm-up: allocator, oneDNN primitive caches
        run(3)
    rates = {"bare": [], "trainer": []}
    order = [("bare", bare), ("trainer", ours)]
    for _ in range(args.trials):
        for name, run in order:
            start = time.perf_counter()
            run(args.steps)
            rates[name].append(args.steps * args.batch / (time.perf_counter() - start))
        order.reverse()  # alternate who goes first, so drift in clock speed favours neither
    bare_median, ours_median = statistics.median(rates["bare"]), statistics.median(rates["trainer"])
    paired = statistics.median(o / b for o, b in zip(rates["trainer"], rates["bare"]))
    result = {"model": args.model, "size": args.size, "batch": args.batch, "threads": args.threads,
              "steps_per_trial": args.steps, "trials": args.trials, "bare_img_per_s": round(bare_median, 1),
              "trainer_img_per_s": round(ours_median, 1), "ratio": round(ours_median / bare_median, 3),
              "median_paired_ratio": round(paired, 3),
              "torch": str(torch.__version__), "timm": timm.__version__}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
