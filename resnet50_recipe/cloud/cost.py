"""What a run will cost, asked on the laptop: throughput per GPU (measured or estimated, each with its source),
a recipe's hours and dollars to finish on each instance type, batch-size advice, the cost of a finished run from
the price history, and `aws price` (one recipe's spot prices per AZ, or a table of recipes x instance types). The
instance's own cost and budget, which the trainer needs, are in trainer/budget.py; the instance table is in ec2.py.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import statistics
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from resnet50_recipe.cloud.api import Api
from resnet50_recipe.data.pipeline import train_size_at
from resnet50_recipe.ec2 import INSTANCE_TYPES, ebs_cost, spot_prices
from resnet50_recipe.errors import UserError
from resnet50_recipe.recipe import shipped_recipes
from resnet50_recipe.store.s3 import S3Store

__all__ = ["Throughput", "GPU_SPECS", "THROUGHPUT_224", "GPU_MEMORY_GIB",
           "GIB_PER_IMAGE_224_AMP", "GIB_FIXED", "LOADER_IMG_PER_S_PER_VCPU", "DATASET_IMAGES", "Published",
           "PUBLISHED", "integrate_cost", "estimate", "finish", "batch_advice", "recipe_images", "gpu_kind",
           "measured_rates", "match_recipes", "price", "price_table"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Throughput:
    """ResNet-50 training images/s of one GPU with AMP at 224 px, or at the sizes in `by_size` (px -> img/s)."""
    img_per_s: float
    kind: str  # "measured": by this trainer (a BENCHMARKS.md row, or a run: `aws price --from-run`); or "estimated"
    source: str  # where the figure comes from and, for an estimate, how it was derived
    by_size: tuple[tuple[int, float], ...] = ()

    def at(self, size: int) -> float:
        """img/s at `size` px: a figure measured at that size, else the nearest measured (or the 224 px figure)
        scaled by pixel count (a ResNet's work grows with the pixels)."""
        sizes = dict(self.by_size) or {224: self.img_per_s}
        near = min(sizes, key=lambda s: (abs(s - size), s))
        return sizes[near] * (near / size) ** 2


# What NVIDIA's datasheets give per GPU: dense fp16 tensor-core TFLOPS (without sparsity) and memory bandwidth
# (GB/s). NVIDIA publishes no A10G sheet: AWS's g5 GPU is an A10 variant, so the A10's figures stand in for it.
GPU_SPECS = {
    "V100": (125, 900, "https://www.nvidia.com/en-us/data-center/v100/ (SXM2)"),
    "T4": (65, 320, "https://www.nvidia.com/en-us/data-center/tesla-t4/"),
    "A10G": (125, 600, "https://www.nvidia.com/en-us/data-center/products/a10-gpu/ (the A10's; no A10G sheet)"),
    "L4": (121, 300, "https://www.nvidia.com/en-us/data-center/l4/ (242 TFLOPS with sparsity)"),
    "L40S": (362, 864, "https://www.nvidia.com/en-us/data-center/l40s/ (733 TFLOPS with sparsity)"),
    "H100": (989, 3350, "https://www.nvidia.com/en-us/data-center/h100/ (SXM5)"),
}

# NVIDIA DeepLearningExamples, PyTorch RN50 v1.5, 1 x V100 16GB, AMP (DGX-1): 1,200 img/s; 1 x A100 80GB: 2,470
# (https://github.com/NVIDIA/DeepLearningExamples/tree/master/PyTorch/Classification/ConvNets/resnet50v1.5, README,
# "Training performance results").
_V100_IMG_PER_S = 1200


def _from_v100(gpu: str) -> Throughput:
    """An estimate from NVIDIA's published V100 figure, scaled by the lesser of two ratios to the V100: dense fp16
    tensor TFLOPS and memory bandwidth (ResNet-50 training with AMP is partly bound by each: the convolutions by the
    tensor cores, BatchNorm, ReLU and the adds by memory). The same rule puts an A100 80GB (312 TFLOPS, 2,039 GB/s)
    at 2,719 img/s against NVIDIA's published 2,470: it errs about 10 % high there."""
    tflops, bandwidth, _ = GPU_SPECS[gpu]
    v_tflops, v_bandwidth, _ = GPU_SPECS["V100"]
    by_memory = bandwidth / v_bandwidth <= tflops / v_tflops
    ratio = min(tflops / v_tflops, bandwidth / v_bandwidth)
    what = f"memory bandwidth, {bandwidth}/{v_bandwidth} GB/s" if by_memory else \
        f"fp16 tensor TFLOPS, {tflops}/{v_tflops}"
    return Throughput(round(_V100_IMG_PER_S * ratio), "estimated",
                      f"NVIDIA's V100 figure ({_V100_IMG_PER_S:,}) x {ratio:.3f}, the {gpu}/V100 ratio of {what} "
                      "(NVIDIA datasheets; the lesser of that and the other ratio)")


# ResNet-50 training images/s per GPU at 224 px with AMP. No GPU has measured this trainer yet (BENCHMARKS.md#gpu),
# so every row is an estimate; `aws price --from-run` replaces a GPU's row by what a run measured.
THROUGHPUT_224 = {
    "T4": _from_v100("T4"),
    "A10G": _from_v100("A10G"),
    "L4": _from_v100("L4"),
    "L40S": _from_v100("L40S"),
    "V100": Throughput(_V100_IMG_PER_S, "estimated", "NVIDIA DeepLearningExamples' published figure for PyTorch "
                       "RN50 v1.5 with AMP on 1 x V100 16GB (NVIDIA/DeepLearningExamples ConvNets/resnet50v1.5)"),
    "A100": Throughput(2470, "estimated", "NVIDIA DeepLearningExamples' published figure on 1 x A100 80GB (same "
                       "page); p4d's A100s are 40 GB cards with 76 % of its bandwidth"),
    "H100": _from_v100("H100"),
}


# Images/s one vCPU decodes and augments for the training loader (BENCHMARKS.md, "Data pipeline", one loader
# worker on a core of the 2-core CI VM, 500x375 JPEGs, full decode): 245 with crops and flips only (imagenet-81
# crop only, 224 px; 285 at 160 px), 178 with RandAugment (imagenet-100ep, 160 px). One vCPU per GPU is left to
# its training process. Data pre-resized to 256 px decodes ~1.5x faster (same table).
LOADER_IMG_PER_S_PER_VCPU = {"crop": 245, "randaugment": 178}


# GPU memory (GiB) per GPU kind, and what one ResNet-50 training image at 224 px takes with AMP: NVIDIA's
# DeepLearningExamples train RN50 with AMP at batch 256 on a 16 GB V100, so ~0.05 GiB per image (activations scale
# with pixels), plus ~1.5 GiB for weights, optimizer state and the CUDA context. fp32 doubles the activations.
GPU_MEMORY_GIB = {"T4": 15, "A10G": 22, "L4": 22, "L40S": 45, "V100": 16, "A100": 40, "H100": 80}

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


def estimate(recipe, gpu: str | None, images: int | None, gpus: int = 1, vcpus: int | None = None,
             rates: dict | None = None) -> dict | None:
    """Hours to train `recipe` on `gpus` GPUs of kind `gpu` (DDP, one process per GPU): every epoch's images over
    the lesser of the GPUs' rate at that epoch's resolution (the progressive-resizing ramp included) and, with
    `vcpus`, what the loader decodes on them (LOADER_IMG_PER_S_PER_VCPU). Evaluation is not counted. `rates`
    (GPU kind -> Throughput, from measured_rates) replaces THROUGHPUT_224's rows. None when the GPU's throughput
    or the dataset size is unknown."""
    table = {**THROUGHPUT_224, **(rates or {})}
    if gpu not in table or not images:
        return None
    rate = table[gpu]
    loader = None
    if vcpus:
        per_vcpu = LOADER_IMG_PER_S_PER_VCPU["randaugment" if recipe.augment.auto_augment else "crop"]
        loader = max(vcpus - gpus, 1) * per_vcpu
    seconds, loader_bound = 0.0, 0
    for epoch in range(recipe.train.epochs):
        on_gpus = rate.at(train_size_at(recipe.augment, epoch)) * gpus
        per_s = on_gpus if loader is None else min(on_gpus, loader)
        loader_bound += per_s < on_gpus
        seconds += images / per_s
    return {"hours": seconds / 3600, "img_per_s": images * recipe.train.epochs / seconds, "throughput": rate,
            "source": rate.source, "loader_img_per_s": loader, "loader_bound_epochs": loader_bound}


def finish(recipe, instance_type: str, price_usd_per_h: float | None, images: int | None = None,
           rates: dict | None = None, disk_gb: float = 0.0) -> dict | None:
    """Hours and dollars to finish `recipe` on `instance_type`: estimate()'s hours on every GPU of the type with its
    vCPUs decoding, times `price_usd_per_h` (a spot or a list price), plus `disk_gb` of gp3 for as long. `usd` is
    None without a price; the whole answer None when the type, its GPU's throughput or the dataset size is unknown.
    What `aws price` prints and `aws launch --instance-type auto` ranks by."""
    if instance_type not in INSTANCE_TYPES:
        return None
    gpu, gpus, vcpus, _ = INSTANCE_TYPES[instance_type]
    est = estimate(recipe, gpu, images or recipe_images(recipe), gpus, vcpus, rates)
    if est is None:
        return None
    usd = None if price_usd_per_h is None else est["hours"] * price_usd_per_h + ebs_cost(disk_gb, est["hours"])
    return {**est, "instance_type": instance_type, "gpu": gpu, "gpus": gpus, "vcpus": vcpus,
            "price_usd_per_h": price_usd_per_h, "usd": usd}


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


# What each recipe is published to reach, and how that figure was measured: RSB's are single-crop at 224 px
# (288 px for A1's second figure), FFCV's at 256 px with left-right flip test-time augmentation (its rn50 configs'
# validation.resolution: 256, lr_tta: true). Keyed by recipe name: recipes without a published figure are absent.
@dataclass(frozen=True)
class Published:
    top1: float  # percent
    measured_as: str
    source: str


_FFCV = "FFCV's rn50 config of as many epochs on 8 x A100 (https://github.com/libffcv/ffcv-imagenet, README table)"
PUBLISHED = {
    "imagenet-100ep": Published(78.1, "224 px, single crop", "RSB A3 (https://arxiv.org/abs/2110.00476); timm "
                                "resnet50.a3_in1k: 78.05"),
    "imagenet-81": Published(80.4, "224 px, single crop", "RSB A1 (https://arxiv.org/abs/2110.00476), 81.2 % at "
                             "288 px; timm resnet50.a1_in1k: 80.38"),
    **{f"imagenet-fast-{epochs}": Published(top1, "256 px, flip TTA", _FFCV)
       for epochs, top1 in ((16, 73.8), (24, 75.6), (32, 76.6), (40, 77.2), (56, 78.0), (88, 78.4))},
}


# ---------------------------------------------------------------------------------------------------------
# What a run measured


def gpu_kind(name: str | None) -> str | None:
    """The GPU kind of the throughput table for a CUDA device name ("Tesla T4", "NVIDIA L40S", "NVIDIA A100-SXM4-40GB");
    None for a GPU the table does not know."""
    for kind in sorted(THROUGHPUT_224, key=len, reverse=True):  # L40S before L4
        if name and re.search(rf"(?<![A-Za-z0-9]){kind}(?![A-Za-z0-9])", name):
            return kind
    return None


def measured_rates(run: str) -> dict[str, Throughput]:
    """What a run measured, per GPU kind: the median images/s per GPU over its step records at each training
    resolution. `run` is a run directory or its copy in S3 (s3://bucket/prefix/RUN). The trainer's start line
    names the device and its GPUs and the number of processes; each step line its img/s (all processes) and
    resolution. Records of a process that trained on the CPU measure no GPU and are left out."""
    records = _run_metrics(run)
    found: dict[str, dict[int, list[float]]] = {}
    kind, world = None, 1
    for r in records:
        if r.get("kind") == "start":
            names = r.get("gpus") or []
            kind = gpu_kind(names[0]) if names and str(r.get("device", "")).startswith("cuda") else None
            world = r.get("world_size") or 1
        elif r.get("kind") == "step" and kind and r.get("img_per_s") and r.get("train_size"):
            found.setdefault(kind, {}).setdefault(r["train_size"], []).append(r["img_per_s"] / world)
    if not found:
        raise UserError(f"--from-run {run}: its metrics.jsonl has no step record from a GPU this command knows "
                        f"({', '.join(THROUGHPUT_224)}) with its resolution; it needs a run of this version on such "
                        "a GPU")
    rates = {}
    for gpu, sizes in found.items():
        by_size = tuple(sorted((size, statistics.median(v)) for size, v in sizes.items()))
        at_224 = Throughput(0, "measured", "", by_size).at(224)
        counts = ", ".join(f"{len(sizes[size])} step records at {size} px ({rate:.0f})" for size, rate in by_size)
        rates[gpu] = Throughput(round(at_224, 1), "measured", f"measured by {run}: median img/s per GPU of {counts}",
                                by_size)
    return rates


def _run_metrics(run: str) -> list[dict]:
    if run.startswith("s3://"):
        store = S3Store(run.rstrip("/"))
        if store.head("metrics.jsonl") is None:
            raise UserError(f"--from-run {run}: no metrics.jsonl there; give the run's folder (s3://BUCKET/PREFIX/RUN)")
        with tempfile.TemporaryDirectory() as tmp:
            store.download_file("metrics.jsonl", Path(tmp) / "metrics.jsonl")
            text = (Path(tmp) / "metrics.jsonl").read_text()
    else:
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            raise UserError(f"--from-run {run}: no metrics.jsonl there; give a run directory or s3://BUCKET/PREFIX/RUN")
        text = path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def match_recipes(patterns: list[str]) -> list[str]:
    """Recipe names or files for `--recipes`: each argument may hold several, comma-separated; a glob
    (`imagenet-fast-*`, quoted or expanded by the shell to files) matches the shipped recipes' names."""
    shipped = sorted(shipped_recipes(), key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
    names: list[str] = []
    for item in (i.strip() for arg in patterns for i in arg.split(",") if i.strip()):
        if any(c in item for c in "*?["):
            found = [n for n in shipped if fnmatch.fnmatchcase(n, item.removesuffix(".yaml"))]
            if not found:
                raise UserError(f"--recipes {item}: matches none of the shipped recipes ({', '.join(shipped)})")
            names += found
        else:
            names.append(item)
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------------------
# Prices


def price(instance_types: list[str], region: str | None = None, recipe=None, images: int | None = None,
          api: Api | None = None, out=print) -> list[dict]:
    """Print, per instance type, the spot price in each AZ, the on-demand price and, with a recipe, the
    estimated hours and cost; return the rows."""
    _check_types(instance_types)
    api = api or Api(region)
    images = images or (recipe_images(recipe) if recipe is not None else None)
    rows = []
    for itype in instance_types:
        gpu, gpus, vcpus, on_demand = INSTANCE_TYPES[itype]
        prices = spot_prices(api, itype)
        cheapest = next(iter(prices.items()), (None, None))
        row = {"instance_type": itype, "gpu": gpu, "gpus": gpus, "vcpus": vcpus, "on_demand": on_demand,
               "spot": prices, "cheapest_az": cheapest[0], "spot_price": cheapest[1]}
        line = f"{itype:<14} {gpu:>5} x{gpus}  {vcpus:>3} vCPUs  on-demand " + \
            (f"${on_demand:.3f}/h" if on_demand else "   n/a  ")
        if prices:
            line += f"  spot ${cheapest[1]:.4f}/h in {cheapest[0]} (" + ", ".join(
                f"{az} {p:.4f}" for az, p in list(prices.items())[1:]) + ")"
        else:
            line += "  spot: not offered in this region"
        if recipe is not None:
            est = finish(recipe, itype, cheapest[1], images)
            row["estimate"] = est and {**est, "spot_cost": est["usd"]}
            if est:
                costs = [f"~${est['usd']:.2f} at that spot price"] if est["usd"] is not None else []
                if on_demand:
                    costs.append(f"~${est['hours'] * on_demand:.2f} on-demand")
                line += f"\n{'':<16}{recipe.name}: ~{est['hours']:.1f} h, {', '.join(costs)} " \
                    f"({est['img_per_s']:.0f} img/s assumed)"
            elif not images:
                line += f"\n{'':<16}{recipe.name}: pass --images N (train images per epoch) for an estimate"
            else:
                line += f"\n{'':<16}{recipe.name}: no throughput figure for this instance type's GPU"
        rows.append(row)
        out(line)
    if recipe is not None:
        out("\nEstimates, not quotes: ResNet-50 images/s per GPU with AMP at 224 px, scaled by pixels to each epoch's "
            "resolution (" + "; ".join(f"{k} {v.img_per_s:g} img/s, {v.kind}: {v.source}" for k, v in
                                       THROUGHPUT_224.items()) + "), and no faster than the instance's vCPUs decode "
            f"({LOADER_IMG_PER_S_PER_VCPU['crop']} img/s per vCPU, {LOADER_IMG_PER_S_PER_VCPU['randaugment']} with "
            "RandAugment: BENCHMARKS.md, Data pipeline). Spot prices change hourly; storage and data transfer are "
            "extra.")
    return rows


def _check_types(instance_types: list[str]) -> None:
    unknown = [t for t in instance_types if t not in INSTANCE_TYPES]
    if unknown or not instance_types:
        raise UserError(f"--instance-types: {', '.join(unknown) or 'none given'}: not an instance type this "
                        f"command knows (its GPU, vCPUs and throughput); known: {', '.join(INSTANCE_TYPES)}")


def price_table(recipes: list, instance_types: list[str], region: str | None = None, budget_usd: float | None = None,
                from_runs: tuple[str, ...] = (), dry_run: bool = False, api: Api | None = None, out=print) -> dict:
    """`aws price --recipes`: a table of recipes (columns: epochs, published top-1 and how it was measured) x
    instance types (rows: hours and dollars to finish at the cheapest AZ's spot price, or in a dry run, which makes
    no AWS call, at the on-demand list price). Marks the cheapest type per recipe and the estimates within
    `budget_usd`; every figure is footnoted. A run in `from_runs` replaces its GPU's estimated throughput by the
    one it measured. Returns {recipe name: {instance type: finish() or None}}."""
    _check_types(instance_types)
    rates: dict[str, Throughput] = {}
    for run in from_runs:
        rates.update(measured_rates(run))
    prices = {}
    for itype in instance_types:
        if dry_run:
            prices[itype] = INSTANCE_TYPES[itype][3]
        else:
            api = api or Api(region)
            prices[itype] = next(iter(spot_prices(api, itype).values()), None)
    results = {r.name: {t: finish(r, t, prices[t], rates=rates) for t in instance_types} for r in recipes}
    cheapest = {name: min((f["usd"], t) for t, f in row.items() if f and f["usd"] is not None)[1]
                if any(f and f["usd"] is not None for f in row.values()) else None for name, row in results.items()}

    gpus_shown = list(dict.fromkeys(INSTANCE_TYPES[t][0] for t in instance_types))
    note = {gpu: f"[{i + 1}]" for i, gpu in enumerate(gpus_shown)}
    top1_note, price_note, hours_note = (f"[{len(gpus_shown) + i}]" for i in (1, 2, 3))
    width = max([14] + [len(r.name) for r in recipes]) + 1
    label = max(len(t) for t in instance_types) + 2
    lead = label + 7 + 5 + 10 + 1

    def row(title: str, cells: list[str]) -> str:
        return (f"{title:<{lead}}" + "".join(f"{c:>{width}}" for c in cells)).rstrip()

    out(row("", [r.name for r in recipes]))
    out(row("epochs", [str(r.train.epochs) for r in recipes]))
    out(row(f"published top-1 {top1_note}", [f"{PUBLISHED[r.name].top1:.1f} %" if r.name in PUBLISHED else "-"
                                             for r in recipes]))
    out(row("measured at", [PUBLISHED[r.name].measured_as.replace(" TTA", "").replace(", single crop", " 1 crop")
                            if r.name in PUBLISHED else "-" for r in recipes]))
    out(row(f"{'':<{label}}GPUs  [throughput]  price {price_note}", [f"h, $ {hours_note}"] * len(recipes)))
    for itype in instance_types:
        gpu, gpus, _, _ = INSTANCE_TYPES[itype]
        price_text = f"${prices[itype]:.4g}/h" if prices[itype] is not None else "no price"
        cells = []
        for r in recipes:
            f = results[r.name][itype]
            if f is None:
                cells.append("-")
                continue
            mark = ("*" if cheapest[r.name] == itype else "") + (
                "+" if budget_usd is not None and f["usd"] is not None and f["usd"] <= budget_usd else "")
            cost = f"${f['usd']:.2f}" if f["usd"] is not None else "$?"
            cells.append(f"{f['hours']:.1f}h {cost}{mark:<2}")
        out(row(f"{itype:<{label}}{gpus}x{gpu:<5}{note[gpu]:<5}{price_text:>10}", cells))

    out("")
    where = "on-demand list price, us-east-1 (resnet50_recipe/ec2.py; a dry run reads no spot prices, and spot is " \
        "usually lower)" if dry_run else f"spot price now in the cheapest availability zone of " \
        f"{api.region if api else region} (describe_spot_price_history); it changes hourly"
    _footnotes(recipes, instance_types, results, rates, budget_usd, gpus_shown, note,
               (top1_note, price_note, hours_note), where, out)
    return results


def _footnotes(recipes, instance_types, results, rates, budget_usd, gpus_shown, note, notes, price_text, out) -> None:
    """price_table's legend and footnotes: the marks, each GPU's throughput, the published top-1, price and hours."""
    top1_note, price_note, hours_note = notes
    if budget_usd is not None:
        fits = {name: sorted((f["usd"], t) for t, f in row.items() if f and f["usd"] is not None
                             and f["usd"] <= budget_usd) for name, row in results.items()}
        out(f"* the cheapest type for the recipe; + within --budget-usd {budget_usd:g}: " + "; ".join(
            f"{name} on {len(v)} of {len(instance_types)} types" if v else f"{name} on none"
            for name, v in fits.items()))
    else:
        out("* the cheapest type for the recipe")
    for gpu in gpus_shown:
        t = {**THROUGHPUT_224, **rates}.get(gpu)
        text = f"{t.img_per_s:g} img/s per GPU at 224 px, {t.kind}: {t.source}" if t else "no throughput figure"
        if gpu in rates:
            text += f" (replaces the estimate, {THROUGHPUT_224[gpu].img_per_s:g} img/s)" if gpu in THROUGHPUT_224 \
                else ""
        out(f"{note[gpu]} {gpu}: {text}")
    by_source: dict[str, list[str]] = {}
    for r in recipes:
        if r.name in PUBLISHED:
            by_source.setdefault(f"{PUBLISHED[r.name].measured_as}: {PUBLISHED[r.name].source}", []).append(r.name)
    out(f"{top1_note} published, not measured by this trainer: " + "; ".join(
        f"{', '.join(names)} at {source}" for source, names in by_source.items())
        + ("" if all(r.name in PUBLISHED for r in recipes) else "; '-': no published figure"))
    out(f"{price_note} {price_text}")
    out(f"{hours_note} estimates, not quotes: ImageNet-1k's 1,281,167 images x epochs over the GPUs' images/s, scaled "
        "by pixels to each epoch's resolution, and no faster than the vCPUs decode "
        f"({LOADER_IMG_PER_S_PER_VCPU['crop']} img/s per vCPU, {LOADER_IMG_PER_S_PER_VCPU['randaugment']} with "
        "RandAugment, one vCPU per GPU left to training: BENCHMARKS.md, Data pipeline); evaluation, the disk and "
        "data transfer are not counted")
