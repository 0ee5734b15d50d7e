"""`bench data`: images/s of a recipe's own training input pipeline (ImageFolderDataset + timm transform +
DataLoader + uint8 collate, built by the same functions the trainer calls), per worker count.

It answers "is data loading the bottleneck?" before a GPU is rented.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

from resnet50_recipe.data.pipeline import (
    EpochSampler,
    ImageFolderDataset,
    find_classes,
    make_loader,
    train_transform,
    usable_cores,
)
from resnet50_recipe.errors import UserError
from resnet50_recipe.recipe import Recipe

__all__ = ["T4_IMG_S", "measure", "verdict"]

# A T4's ResNet-50 training rate with AMP at the ImageNet recipe's 160 px, as recipes/imagenet-100ep.yaml
# estimates it (~400 img/s); the speed issue (#9) sets the same figure as what 4 vCPUs must feed.
T4_IMG_S = 400.0


def measure(root: Path, recipe: Recipe, workers: int, batches: int = 20, draft: bool | None = None,
            batch_size: int | None = None) -> dict:
    """Images/s over `batches` batches after a warm-up (worker start-up and the prefetch queue filling)."""
    aug = recipe.augment if draft is None else replace(recipe.augment, draft_decode=draft)
    split = Path(root) / "train"
    dataset = ImageFolderDataset(split, find_classes(split), train_transform(aug), recipe.seed,
                                 recipe.data.bad_images)
    batch_size = batch_size or recipe.train.batch_size
    if len(dataset) < batch_size:
        raise UserError(f"{split}: {len(dataset)} images, fewer than one batch of {batch_size}; "
                        "pass --batch-size")
    sampler = EpochSampler(len(dataset), recipe.seed)
    loader = make_loader(dataset, sampler, batch_size, workers, drop_last=True, pin_memory=False,
                         seed=recipe.seed)
    warmup = max(1, workers)  # each worker's first batch carries its start-up; then the queue is steady

    stream = _forever(loader, sampler)
    for _ in range(warmup):
        next(stream)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += next(stream)[0].shape[0]
    seconds = time.perf_counter() - start
    stream.close()  # with the loader going out of scope, stops the workers before the next measurement
    return {"workers": workers, "images": images, "seconds": seconds, "img_s": images / seconds,
            "draft_decode": aug.draft_decode, "train_size": aug.train_size}


def _forever(loader, sampler):
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def verdict(results: list[dict], target: float = T4_IMG_S) -> str:
    """Whether the best measured rate keeps a GPU consuming `target` img/s fed, and how many workers (and
    vCPUs: one more, for the training process) the per-worker rate says it takes."""
    best = max(results, key=lambda r: r["img_s"])
    per_worker = max(r["img_s"] / max(1, r["workers"]) for r in results)
    needed = math.ceil(target / per_worker)
    cores = usable_cores()
    fed = "keeps" if best["img_s"] >= target else "would starve"
    return (f"best: {best['img_s']:.0f} img/s with {best['workers']} workers, which {fed} a GPU taking {target:.0f} "
            f"img/s (a T4 with AMP on ResNet-50). At {per_worker:.0f} img/s per worker that takes about {needed} "
            f"workers, i.e. {needed + 1} vCPUs with the training process; this machine has {cores} usable"
            f" cores, so more than {max(1, cores - 1)} workers share them with the training process and stop scaling.")
