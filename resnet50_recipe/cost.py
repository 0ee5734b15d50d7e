"""What EC2 time costs: the instance tables, spot prices, a recipe's estimate, and, on the instance, the cost so
far of the machine a run trains on and the budget that stops it.

The trainer imports this module on the instance; it needs boto3 only for the spot price, and never the
launcher (aws.py), which runs on the laptop.
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

PRODUCT = "Linux/UNIX"
# gp3 storage, USD per GB-month (us-east-1 list price, as the guide quotes it; AWS bills it per second of a month
# of 730 hours). The run's root volume costs this from launch until the instance is terminated.
GP3_USD_PER_GB_MONTH = 0.08
HOURS_PER_MONTH = 730
# The StopControl reason of a budget stop; the summary and the exit status (lifecycle.EXIT_BUDGET) key on it.
BUDGET_REASON = "train.budget_usd"

# GPU kind, GPUs, vCPUs and on-demand price (USD/h, Linux, us-east-1) per instance type. Prices are AWS's list
# prices from https://aws.amazon.com/ec2/pricing/on-demand/ as the guide also quotes them (g4dn.xlarge $0.526,
# g4dn.2xlarge $0.752); they were not re-read on 2026-11-26 and differ by region: check the page. P4d/P5 prices
# were cut in 2025 and are left out rather than guessed. Spot prices always come from the API.
INSTANCE_TYPES = {
    "g4dn.xlarge": ("T4", 1, 4, 0.526), "g4dn.2xlarge": ("T4", 1, 8, 0.752), "g4dn.4xlarge": ("T4", 1, 16, 1.204),
    "g4dn.8xlarge": ("T4", 1, 32, 2.176), "g4dn.12xlarge": ("T4", 4, 48, 3.912),
    "g5.xlarge": ("A10G", 1, 4, 1.006), "g5.2xlarge": ("A10G", 1, 8, 1.212), "g5.4xlarge": ("A10G", 1, 16, 1.624),
    "p3.2xlarge": ("V100", 1, 8, 3.06), "p3.8xlarge": ("V100", 4, 32, 12.24),
    "p4d.24xlarge": ("A100", 8, 96, None), "p5.48xlarge": ("H100", 8, 192, None),
}
DEFAULT_PRICE_TYPES = ("g4dn.xlarge", "g4dn.2xlarge", "g5.xlarge", "g5.2xlarge", "p3.2xlarge")

# ResNet-50 training images/s per GPU at 224 px with AMP. Estimates, not measurements of this trainer: they set
# the order of magnitude of a run's hours, and BENCHMARKS.md replaces them once a GPU has been measured.
THROUGHPUT_224 = {
    "T4": (210, "estimate used by the recipes and README (not measured yet)"),
    "A10G": (420, "estimate: about twice T4 by fp16 tensor-core peak (no published figure found)"),
    "V100": (1200, "NVIDIA DeepLearningExamples RN50 v1.5, V100 16GB, AMP (shared/reference/anchors.md)"),
    "A100": (2470, "NVIDIA DeepLearningExamples RN50 v1.5, A100 80GB, AMP (anchors.md)"),
    "H100": (7000, "MLPerf Training v3.0, 8xH100 at ~56k img/s, MXNet + DALI (anchors.md): an upper bound"),
}
# GPU memory (GiB) per GPU kind, and what one ResNet-50 training image at 224 px takes with AMP: NVIDIA's
# DeepLearningExamples train RN50 with AMP at batch 256 on a 16 GB V100, so ~0.05 GiB per image (activations scale
# with pixels), plus ~1.5 GiB for weights, optimizer state and the CUDA context. fp32 doubles the activations.
GPU_MEMORY_GIB = {"T4": 15, "A10G": 22, "V100": 16, "A100": 40, "H100": 80}
GIB_PER_IMAGE_224_AMP, GIB_FIXED = 0.05, 1.5

# Train images per epoch for the datasets the shipped recipes name (export.dataset), when not given.
DATASET_IMAGES = {"imagenet-1k": 1_281_167}


def boto3_call(region: str):
    """`api` for spot_prices without the launcher: each call made by a plain boto3 client."""
    import boto3

    client = {}

    def call(service: str, operation: str, **params):
        if service not in client:
            client[service] = boto3.client(service, region_name=region)
        return getattr(client[service], operation)(**params)
    return call


def spot_prices(api, instance_type: str, azs: list[str] | None = None) -> dict[str, float]:
    """The current spot price per availability zone (USD/h), cheapest first. `api(service, operation, **params)`
    makes the call: `aws.Api` on the laptop (so that a dry run prints it), `boto3_call` on the instance."""
    params = {"InstanceTypes": [instance_type], "ProductDescriptions": [PRODUCT],
              "StartTime": datetime.now(timezone.utc)}
    if azs:
        params["Filters"] = [{"Name": "availability-zone", "Values": azs}]
    response = api("ec2", "describe_spot_price_history", **params)
    latest: dict[str, tuple] = {}
    for item in (response or {}).get("SpotPriceHistory", []):
        az, when = item["AvailabilityZone"], item["Timestamp"]
        if az not in latest or when > latest[az][0]:
            latest[az] = (when, float(item["SpotPrice"]))
    return dict(sorted(((az, p) for az, (_, p) in latest.items()), key=lambda kv: (kv[1], kv[0])))


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


class InstanceCost:
    """Fields merged into every metrics.jsonl record on EC2: the instance type, AZ, market, the price now and the
    cost so far (price x time of the training processes, carried over from the last record of an earlier one).

    It asks the instance metadata (through the spot watcher's IMDSv2 session) once, and the spot price at most
    every `refresh_s` seconds, never per step. Only the first price is read in the caller's thread; later
    refreshes run in a background thread, so a slow or hanging EC2 API never stalls training. Boot, install and
    time spent stopped are not in `cost_usd`; `aws status` gives the bill's upper bound from the price history.
    """

    def __init__(self, watcher, metrics_path: Path, refresh_s: float = 600.0):
        self.watcher, self.refresh_s = watcher, refresh_s
        self.identity: dict | None = None
        self.price: float | None = None
        self.priced_at = -float("inf")
        self.pricing: threading.Thread | None = None
        self.cost = 0.0
        try:
            from .runlog import read_metrics

            costs = [r["cost_usd"] for r in read_metrics(metrics_path) if r.get("cost_usd") is not None]
            self.cost = costs[-1] if costs else 0.0
        except (OSError, ValueError):
            pass
        self.cost_at_start = self.cost  # what earlier processes spent: a budget's first epoch is measured from it
        self.last = time.time()

    def __call__(self) -> dict:
        now = time.time()
        try:
            if self.identity is None:
                get = self.watcher.get
                self.identity = {"instance_type": get("instance-type"), "az": get("placement/availability-zone"),
                                 "region": get("placement/region"), "market": get("instance-life-cycle")}
        except (OSError, ValueError) as e:
            log.debug("instance metadata: %s", e)
            return {}
        if self.identity["instance_type"] is None:
            return {}  # a metadata service that does not know the instance: nothing to record
        if now - self.priced_at >= self.refresh_s and (self.pricing is None or not self.pricing.is_alive()):
            first = self.priced_at == -float("inf")
            self.priced_at = now
            if first:
                self.price = self.current_price()
            else:
                self.pricing = threading.Thread(target=self.refresh_price, name="spot-price", daemon=True)
                self.pricing.start()
        if self.price is not None:
            self.cost += (now - self.last) / 3600 * self.price
        self.last = now
        ident = self.identity
        return {"instance_type": ident["instance_type"], "az": ident["az"], "market": ident["market"],
                "price_usd_per_h": self.price, "cost_usd": self.cost if self.price is not None else None}

    def refresh_price(self) -> None:
        price = self.current_price()
        if price is not None:  # a failed refresh keeps the last known price
            self.price = price

    def current_price(self) -> float | None:
        ident = self.identity
        if ident["market"] != "spot":
            return INSTANCE_TYPES.get(ident["instance_type"], (None,) * 4)[3]
        try:
            prices = spot_prices(boto3_call(ident["region"]), ident["instance_type"], [ident["az"]])
            return prices.get(ident["az"])
        except Exception as e:  # no boto3, no permission, no network: training goes on without a price
            log.warning("could not read the spot price of %s in %s (%s); cost is not recorded until it can be",
                        ident["instance_type"], ident["az"], e)
            return None


def ebs_cost(disk_gb: float, hours: float) -> float:
    """USD for a gp3 volume of `disk_gb` kept for `hours`."""
    return disk_gb * GP3_USD_PER_GB_MONTH * hours / HOURS_PER_MONTH


class Budget:
    """train.budget_usd on EC2: after each epoch but the last, the run stops (with a checkpoint) when the cost so far
    plus one more epoch at the last epoch's cost would pass the budget. The cost is `source.cost`, an
    InstanceCost's running total, read right after the epoch's metrics line brought it up to date."""

    def __init__(self, budget_usd: float, source):
        self.budget_usd, self.source = budget_usd, source
        self.at_last_epoch: float | None = None  # the cost when the previous epoch ended (None: not seen yet)

    def check(self, control, last_epoch: bool) -> str | None:
        """Ask `control` to stop when the next epoch would pass the budget; the reason, or None."""
        spent = getattr(self.source, "cost", None)
        if spent is None or getattr(self.source, "price", None) is None:
            return None  # no price known yet: the cost is not known, and an unknown cost stops nothing
        epoch_cost = spent - (self.at_last_epoch if self.at_last_epoch is not None else self.source.cost_at_start)
        self.at_last_epoch = spent
        if last_epoch or spent + epoch_cost <= self.budget_usd:
            return None
        reason = (f"{BUDGET_REASON}: ${spent:.2f} spent of ${self.budget_usd:.2f}, and the next epoch "
                  f"(~${epoch_cost:.2f}) would pass it")
        control.request_stop(reason)
        return reason


def budget_text(spent: float, budget_usd: float | None, price: float | None, hours_left: float | None) -> str:
    """What follows "cost so far $X" in `watch` and `aws status`: ", ~$P projected at the end ($p/h now); budget
    $B: $L left". The projection is the price now times the hours the ETA gives: spot prices move."""
    text = ""
    projected = spent + price * hours_left if price is not None and hours_left is not None else None
    if projected is not None:
        text += f", ~${projected:.2f} projected at the end (${price:.4f}/h now)"
    if budget_usd is not None:
        text += f"; budget ${budget_usd:.2f}: ${budget_usd - spent:.2f} left"
        if projected is not None and projected > budget_usd:
            text += " (the run stops with a checkpoint before it would pass it: exit 4)"
    return text
