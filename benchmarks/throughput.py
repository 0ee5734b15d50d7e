"""Training throughput of the trainer's own step, in images/s per batch size, on any device.

Synthetic uint8 batches already in (pinned) host memory go through `engine.train_one_epoch`: transfer,
on-device normalisation, forward, loss, backward, optimizer step, EMA and scheduler, exactly as in training,
without the JPEG decoding that a real run adds. Prints one JSON line per batch size.

    python benchmarks/throughput.py --model resnet50 --size 224 --batches 64,128,256 --amp --channels-last
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
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", default="64,128,256", help="comma-separated batch sizes")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per trial")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    for batch in (int(b) for b in args.batches.split(",")):
        try:
            result = measure(args, batch)
        except torch.OutOfMemoryError:
            print(json.dumps({"batch": batch, "error": "out of memory"}), flush=True)
            break
        print(json.dumps(result), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure(args, batch: int) -> dict:
    recipe = load_recipe("imagenet-100ep", [
        f"model.name={args.model}", f"train.batch_size={batch}", f"augment.train_size={args.size}",
        f"train.amp={str(args.amp).lower()}", f"train.channels_last={str(args.channels_last).lower()}",
        f"train.device={args.device}", "ema.enabled=true", "ema.every=16", f"log.every_steps={args.steps}"])
    rt = setup(recipe.train, recipe.seed)
    trainer = build_trainer(recipe, rt, num_classes=1000, updates_per_epoch=1000)
    cuda = rt.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 256, (batch, 3, args.size, args.size), dtype=torch.uint8, generator=generator),
             torch.randint(0, 1000, (batch,), generator=generator), []) for _ in range(2)]
    if cuda:
        data = [(x.pin_memory(), y.pin_memory(), bad) for x, y, bad in data]

    def run(steps: int) -> float:
        start = time.perf_counter()
        train_one_epoch(trainer, (data[i % 2] for i in range(steps)), 0, steps, log=lambda r: None)
        if cuda:
            torch.cuda.synchronize()
        return steps * batch / (time.perf_counter() - start)

    run(args.warmup)  # cuDNN autotuning, allocator growth
    rates = [run(args.steps) for _ in range(args.trials)]
    return {"model": args.model, "size": args.size, "batch": batch, "img_per_s": round(statistics.median(rates), 1),
            "amp": str(rt.amp_dtype).replace("torch.", "") if rt.amp_dtype else "off",
            "channels_last": args.channels_last, "device": str(rt.device),
            "card": torch.cuda.get_device_name(rt.device) if cuda else "cpu",
            "peak_mem_gb": round(torch.cuda.max_memory_allocated(rt.device) / 2**30, 2) if cuda else None,
            "torch": str(torch.__version__), "timm": timm.__version__}


if __name__ == "__main__":
    main()
