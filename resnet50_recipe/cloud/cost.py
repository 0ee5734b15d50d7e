"""What a run will cost, asked on the laptop: throughput per GPU, a recipe's hours and dollars on each instance type,
batch-size advice, the cost of a finished run from the price history, and `aws price`. The instance's own cost
and budget, which the trainer needs, are in trainer/budget.py; the instance table is in ec2.py.
"""

from __future__ import annotations

import logging
from datetime import datetime

from resnet50_recipe.cloud.api import Api
from resnet50_recipe.ec2 import INSTANCE_TYPES, spot_prices
from resnet50_recipe.errors import UserError

__all__ = ["DEFAULT_PRICE_TYPES", "THROUGHPUT_224", "GPU_MEMORY_GIB", "GIB_PER_IMAGE_224_AMP", "GIB_FIXED",
           "DATASET_IMAGES", "integrate_cost", "estimate", "batch_advice", "recipe_images", "price"]

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

DEFAULT_PRICE_TYPES = ("g4dn.xlarge", "g4dn.2xlarge", "g5.xlarge", "g5.2xlarge", "p3.2xlarge")


# ResNet-50 training images/s per GPU at 224 px with AMP. Estimates, not measurements of this trainer: they set
# the order of magnitude of a run's hours, and BENCHMARKS.md replaces them once a GPU has been measured.
THROUGHPUT_224 = {
    "T4": (210, "estimate used by the recipes and README (not measured yet)"),
    "A10G": (420, "estimate: about twice T4 by fp16 tensor-core peak (no published figure found)"),
    "V100": (1200, "NVIDIA DeepLearningExamples RN50 v1.5, V100 16GB, AMP (https://github.com/NVIDIA/DeepLearningExamples/tree/master/PyTorch/Classification/ConvNets/resnet50v1.5)"),
    "A100": (2470, "NVIDIA DeepLearningExamples RN50 v1.5, A100 80GB, AMP (same page)"),
    "H100": (7000, "MLPerf Training v3.0 (https://mlcommons.org/benchmarks/training/), 8xH100 at ~56k img/s, "
             "MXNet + DALI: an upper bound"),
}


# GPU memory (GiB) per GPU kind, and what one ResNet-50 training image at 224 px takes with AMP: NVIDIA's
# DeepLearningExamples train RN50 with AMP at batch 256 on a 16 GB V100, so ~0.05 GiB per image (activations scale
# with pixels), plus ~1.5 GiB for weights, optimizer state and the CUDA context. fp32 doubles the activations.
GPU_MEMORY_GIB = {"T4": 15, "A10G": 22, "V100": 16, "A100": 40, "H100": 80}

GIB_PER_IMAGE_224_AMP, GIB_FIXED = 0.05, 1.5


# Train images per epoch for the datasets the shipped recipes name (export.dataset), when not given.
DATASET_IMAGES = {"imagenet-1k": 1_281_167}


def integrate_cost(history: list[dict], start: datetime, end: datetime) -> float:
    """USD for running from `start` to `end` under a spot price history: each price holds from its timestamp
    until the next one (how EC2 bills spot: the price in effect, per second)."""
    points = sorted((h["Timestamp"], float(h["SpotPrice"])) for h in history)
    total = 0.0
    for i, (when, price) in enumerate(points):
        until = points[i + 1][0] if i + 1 < len(points) else end
        lo, hi = max(when, start), min(until, end)
        if hi > lo:
            total += price * (hi - lo).total_seconds() / 3600
    return total


def estimate(recipe, gpu: str | None, images: int | None) -> dict | None:
    """Hours for a recipe on one GPU kind: images x epochs / throughput, the throughput scaled from 224 px by
    pixel count to the recipe's train size. None when the GPU or the dataset size is unknown."""
    if gpu not in THROUGHPUT_224 or not images:
        return None
    per_s, source = THROUGHPUT_224[gpu]
    per_s *= (224 / recipe.augment.train_size) ** 2
    return {"hours": images * recipe.train.epochs / per_s / 3600, "img_per_s": per_s, "source": source}


def batch_advice(recipe, gpu: str | None) -> str | None:
    """None when the recipe's per-process batch fits the GPU's memory by the estimate above; else what to change
    (a smaller batch with more accumulation steps, the same global batch)."""
    if gpu not in GPU_MEMORY_GIB:
        return None
    per_image = GIB_PER_IMAGE_224_AMP * (recipe.augment.train_size / 224) ** 2 * (1 if recipe.train.amp else 2)
    batch, accum = recipe.train.batch_size, recipe.train.accum_steps
    if GIB_FIXED + batch * per_image <= GPU_MEMORY_GIB[gpu]:
        return None
    smaller, factor = batch, 1
    while smaller > 1 and GIB_FIXED + smaller * per_image > GPU_MEMORY_GIB[gpu]:
        smaller, factor = smaller // 2, factor * 2
    return (f"train.batch_size={batch} needs ~{GIB_FIXED + batch * per_image:.0f} GiB at "
            f"{recipe.augment.train_size} px on a {gpu} ({GPU_MEMORY_GIB[gpu]} GiB, an estimate): "
            f"--set train.batch_size={smaller} --set train.accum_steps={accum * factor} keeps the global batch")


def recipe_images(recipe) -> int | None:
    synthetic = recipe.data.synthetic
    if synthetic is not None:
        return synthetic.classes * synthetic.per_class
    return DATASET_IMAGES.get(recipe.export.dataset or "")


# ---------------------------------------------------------------------------------------------------------
# Prices


def price(instance_types: list[str], region: str | None = None, recipe=None, images: int | None = None,
          api: Api | None = None, out=print) -> list[dict]:
    """Print, per instance type, the spot price in each AZ, the on-demand price and, with a recipe, the
    estimated hours and cost; return the rows."""
    unknown = [t for t in instance_types if t not in INSTANCE_TYPES]
    if unknown or not instance_types:
        raise UserError(f"--instance-types: {', '.join(unknown) or 'none given'}: not an instance type this "
                        f"command knows (its GPU, vCPUs and throughput); known: {', '.join(INSTANCE_TYPES)}")
    api = api or Api(region)
    images = images or (recipe_images(recipe) if recipe is not None else None)
    rows = []
    for itype in instance_types:
        gpu, gpus, vcpus, on_demand = INSTANCE_TYPES.get(itype, (None, None, None, None))
        prices = spot_prices(api, itype)
        cheapest = next(iter(prices.items()), (None, None))
        row = {"instance_type": itype, "gpu": gpu, "gpus": gpus, "vcpus": vcpus, "on_demand": on_demand,
               "spot": prices, "cheapest_az": cheapest[0], "spot_price": cheapest[1]}
        line = f"{itype:<14} {gpu or '?':>5} x{gpus or '?'}  {vcpus or '?':>3} vCPUs  on-demand " + \
            (f"${on_demand:.3f}/h" if on_demand else "   n/a  ")
        if prices:
            line += f"  spot ${cheapest[1]:.4f}/h in {cheapest[0]} (" + ", ".join(
                f"{az} {p:.4f}" for az, p in list(prices.items())[1:]) + ")"
        else:
            line += "  spot: not offered in this region"
        if recipe is not None:
            est = estimate(recipe, gpu, images)
            per_gpu = est and {**est, "hours": est["hours"] / (gpus or 1)}  # assumes DDP over every GPU
            row["estimate"] = per_gpu
            if per_gpu:
                costs = []
                if cheapest[1] is not None:
                    row["estimate"]["spot_cost"] = per_gpu["hours"] * cheapest[1]
                    costs.append(f"~${row['estimate']['spot_cost']:.2f} at that spot price")
                if on_demand:
                    costs.append(f"~${per_gpu['hours'] * on_demand:.2f} on-demand")
                line += f"\n{'':<16}{recipe.name}: ~{per_gpu['hours']:.1f} h, {', '.join(costs)} " \
                    f"({per_gpu['img_per_s'] * (gpus or 1):.0f} img/s assumed)"
            elif not images:
                line += f"\n{'':<16}{recipe.name}: pass --images N (train images per epoch) for an estimate"
            else:
                line += f"\n{'':<16}{recipe.name}: no throughput figure for this instance type's GPU"
        rows.append(row)
        out(line)
    if recipe is not None:
        out(f"\nEstimates, not quotes: ResNet-50 GPU throughput at {recipe.augment.train_size} px scaled by pixels "
            "from 224 px figures (" + "; ".join(f"{k} {v[0]} img/s: {v[1]}" for k, v in THROUGHPUT_224.items())
            + "). A 4-vCPU instance decoding JPEGs may feed the GPU more slowly than that; spot prices change "
            "hourly; storage and data transfer are extra.")
    return rows
