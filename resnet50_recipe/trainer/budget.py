"""What the machine a run trains on costs, on the instance: `InstanceCost` (fields for every metrics record) and
`Budget` (`train.budget_usd`: stop with a checkpoint before the next epoch would pass it), and `budget_text`
for `watch` and `aws status`. The prices come from ec2.py; the launcher (cloud/) is never imported."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from resnet50_recipe.ec2 import INSTANCE_TYPES, boto3_call, spot_prices
from resnet50_recipe.trainer.runlog import read_metrics

__all__ = ["BUDGET_REASON", "InstanceCost", "Budget", "budget_text"]

log = logging.getLogger(__name__)


# The StopControl reason of a budget stop; the summary and the exit status (errors.EXIT_BUDGET) key on it.
BUDGET_REASON = "train.budget_usd"


class InstanceCost:
    """Fields merged into every metrics.jsonl record on EC2: the instance type, AZ, market, the price now and the
    cost so far (price x time of the training processes, carried over from the last record of an earlier one; a
    resume keeps that record's cost in its start line when it drops the lines after its checkpoint, runlog.py).

    It asks the instance metadata (through the spot watcher's IMDSv2 session) once, and the spot price at most
    every `refresh_s` seconds, never per step. Every spot-price read, the first included, runs in a background
    thread with a short-timeout client (ec2.boto3_call), so that an EC2 API out of reach (a VPC that reaches S3 but
    not EC2) never stalls training, nor, under DDP, the ranks waiting for this one. Until the first price is known
    the lines carry none; the time before it is then counted at that price. Boot, install and time spent stopped
    are not in `cost_usd`; `aws status` gives the bill's upper bound from the price history.
    """

    def __init__(self, watcher, metrics_path: Path, refresh_s: float = 600.0):
        self.watcher, self.refresh_s = watcher, refresh_s
        self.identity: dict | None = None
        self.price: float | None = None
        self.priced_at = -float("inf")
        self.pricing: threading.Thread | None = None
        try:
            records = read_metrics(metrics_path)
        except (OSError, ValueError):
            records = []
        costs = [r["cost_usd"] for r in records if r.get("cost_usd") is not None]
        self.cost = costs[-1] if costs else 0.0  # what earlier processes spent
        # The cost when the epoch this process starts in began: the last epoch line's, or none spent before the
        # first one ended. A restart mid-epoch then measures the budget's first epoch whole (this process's part of
        # it would underestimate the next one); an epoch line without a price falls back to this process's start.
        epochs = [r for r in records if r.get("kind") == "epoch"]
        at_epoch_start = epochs[-1].get("cost_usd") if epochs else 0.0
        self.cost_at_epoch_start = self.cost if at_epoch_start is None else at_epoch_start
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
            self.priced_at = now
            if self.identity["market"] != "spot":
                self.price = self.current_price()  # the list price, from ec2.py: no request
            else:
                self.pricing = threading.Thread(target=self.refresh_price, name="spot-price", daemon=True)
                self.pricing.start()
        if self.price is not None:  # until a price is known the time adds up, to be counted at the first one
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
        epoch_cost = spent - (self.at_last_epoch if self.at_last_epoch is not None else
                              self.source.cost_at_epoch_start)
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
