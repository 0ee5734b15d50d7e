"""How long saving a full ResNet-50 training state pauses the training loop, synchronous vs background.

The state is what a real ImageNet run saves: ResNet-50 weights (1000 classes), its EMA copy, SGD momentum,
scheduler, scaler, RNG states and the recipe (about 300 MB). "Stall" is the time the training thread is
blocked; "total" is until the file is fsynced, renamed, hashed and named in latest.json.

    python benchmarks/checkpoint_stall.py [--trials 5] [--dir /path/on/the/disk/to/measure]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from resnet50_recipe import load_recipe
from resnet50_recipe.store.checkpoints import Writer, checkpoint_name, commit, save_atomic
from resnet50_recipe.trainer.run import Progress
from resnet50_recipe.trainer.runtime import setup
from resnet50_recipe.trainer.state import snapshot
from resnet50_recipe.trainer.step import build_trainer, train_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--dir", help="where to write (default: a temporary folder)")
    args = parser.parse_args()

    recipe = load_recipe("imagenet-100ep", ["train.device=cpu", "ema.enabled=true", "optim.opt=sgd",
                                           "train.batch_size=2", "augment.train_size=64"])
    rt = setup(recipe.train, recipe.seed)
    t = build_trainer(recipe, rt, num_classes=1000, updates_per_epoch=10)
    batch = (torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), torch.randint(0, 1000, (2,)), [])
    train_steps(t, [batch], epoch=0, num_batches=1, log=lambda r: None)  # fills the momentum buffers

    def take() -> dict:
        return snapshot(t, 0, 0, Progress(), [str(i) for i in range(1000)])

    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    sync_stall, bg_stall, bg_total = [], [], []
    size = 0
    for trial in range(args.trials):
        folder = root / f"sync-{trial}"
        start = time.perf_counter()
        entry = save_atomic(take(), folder / checkpoint_name(trial))
        commit(folder, entry, None, keep_last=1)
        sync_stall.append(time.perf_counter() - start)
        size = entry["size"]

        writer = Writer(root / f"bg-{trial}", keep_last=1)
        start = time.perf_counter()
        writer.submit(take())
        bg_stall.append(time.perf_counter() - start)
        writer.drain()
        bg_total.append(time.perf_counter() - start)
    print(json.dumps({
        "state_mb": round(size / 2**20, 1), "trials": args.trials,
        "sync_stall_s": round(statistics.median(sync_stall), 3),
        "background_stall_s": round(statistics.median(bg_stall), 3),
        "background_total_s": round(statistics.median(bg_total), 3),
        "torch": str(torch.__version__)}))
    if not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
