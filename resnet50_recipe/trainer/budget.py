"""What the machine a run trains on costs, on the instance: `InstanceCost` (fields for every metrics record) and
`Budget` (`train.budget_usd`: stop with a checkpoint before the next epoch would pass it, or with
`train.budget_mode: fit` shorten the schedule so that it fits), `fitted` (a recipe's schedule and resolution
ramp compressed to fewer epochs), and `budget_text` for `watch` and `aws status`. The prices come from ec2.py;
the launcher (cloud/) is never imported."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from pathlib import Path

from resnet50_recipe.ec2 import INSTANCE_TYPES, boto3_call, spot_prices
from resnet50_recipe.recipe import AugmentConfig, Recipe, SchedConfig
from resnet50_recipe.trainer.runlog import read_metrics

__all__ = ["BUDGET_REASON", "InstanceCost", "Budget", "fitted", "planned_epochs", "budget_text"]

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

    def __init__(self, watcher, metrics_path: Path, refresh_s: float = 600.0, machines: int = 1):
        # `machines`: a run on several machines (torchrun's nodes, a SkyPilot job's num_nodes) costs this
        # instance's price on each; they are of one type, which is how both start them.
        self.watcher, self.refresh_s, self.machines = watcher, refresh_s, machines
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
            self.cost += (now - self.last) / 3600 * self.price * self.machines
            self.last = now
        ident = self.identity
        return {"instance_type": ident["instance_type"], "az": ident["az"], "market": ident["market"],
                "price_usd_per_h": self.price, **({"machines": self.machines} if self.machines > 1 else {}),
                "cost_usd": self.cost if self.price is not None else None}

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
    """train.budget_usd on EC2, checked after each epoch but the last. The cost is `source.cost`, an InstanceCost's
    running total, read right after the epoch's metrics line brought it up to date; the cost of an epoch to come
    is taken to be the last epoch's.

    `mode` "stop": the run stops (with a checkpoint) when the cost so far plus one more epoch would pass the
    budget. "fit": when the cost so far plus the epochs left would pass it, the run is shortened to the most
    epochs that fit (never fewer than the epochs done + 1: the one it has to train next); when not even one more
    epoch fits, it stops as "stop" does. A plan is only ever shortened: a later check that finds the epochs
    dearer (a resolution ramp still to come) shortens it again, and none lengthens it."""

    def __init__(self, budget_usd: float, source, mode: str = "stop"):
        self.budget_usd, self.source, self.mode = budget_usd, source, mode
        self.at_last_epoch: float | None = None  # the cost when the previous epoch ended (None: not seen yet)

    def check(self, control, epochs_done: int, epochs: int) -> tuple[int, str | None]:
        """After `epochs_done` of the run's `epochs`: the run's length from here on, and what was decided (None:
        nothing). A stop is asked of `control`, with the reason returned; a shorter plan is returned with its line,
        for the run to apply and say."""
        spent = getattr(self.source, "cost", None)
        if spent is None or getattr(self.source, "price", None) is None:
            return epochs, None  # no price known yet: the cost is not known, and an unknown cost changes nothing
        epoch_cost = spent - (self.at_last_epoch if self.at_last_epoch is not None else
                              self.source.cost_at_epoch_start)
        self.at_last_epoch = spent
        left = epochs - epochs_done
        if left <= 0 or spent + (left if self.mode == "fit" else 1) * epoch_cost <= self.budget_usd:
            return epochs, None
        fits = min(left - 1, math.floor((self.budget_usd - spent) / epoch_cost)) \
            if self.mode == "fit" and epoch_cost > 0 else 0  # fewer than `left`: all of them did not fit
        if fits >= 1:
            return epochs_done + fits, (
                f"{BUDGET_REASON}: ${spent:.2f} spent of ${self.budget_usd:.2f} after epoch {epochs_done}, and "
                f"{left} more epochs (~${epoch_cost:.2f} each) would pass it: the schedule now ends at epoch "
                f"{epochs_done + fits} instead of {epochs}, its learning-rate decay and resolution ramp compressed "
                "to fit (train.budget_mode: fit)")
        reason = (f"{BUDGET_REASON}: ${spent:.2f} spent of ${self.budget_usd:.2f}, and the next epoch "
                  f"(~${epoch_cost:.2f}) would pass it")
        control.request_stop(reason)
        return epochs, reason


def fitted(recipe: Recipe, epochs: int) -> tuple[AugmentConfig, SchedConfig]:
    """The recipe's resolution ramp (augment.progressive) and learning-rate schedule compressed from train.epochs
    to `epochs`: every length in epochs (the ramp's start and end, warmup, step decay, cooldown) scaled by
    epochs / train.epochs, so that the ramp ends and the decay reaches its end value (timm's scheduler, built for
    `epochs`) by the new last epoch. At epochs == train.epochs, the recipe's own sections."""
    if epochs == recipe.train.epochs:
        return recipe.augment, recipe.sched
    scale = epochs / recipe.train.epochs
    aug, sched, ramp = recipe.augment, recipe.sched, recipe.augment.progressive
    if ramp is not None:  # train_size_at interpolates: fractional epochs keep the ramp's shape exactly
        aug = dataclasses.replace(aug, progressive=dataclasses.replace(
            ramp, start_epoch=ramp.start_epoch * scale, end_epoch=ramp.end_epoch * scale))
    sched = dataclasses.replace(sched, warmup_epochs=sched.warmup_epochs * scale,
                                decay_epochs=sched.decay_epochs * scale, cooldown_epochs=sched.cooldown_epochs * scale)
    return aug, sched


def planned_epochs(records: list[dict]) -> tuple[int | None, int | None]:
    """(the run's length, the recipe's) when train.budget_mode: fit has shortened the run, else (None, None), from
    metrics records: the newest `start` or `replan` line says (a resume that dropped the plan starts without it)."""
    plan = next((r for r in reversed(records) if r.get("kind") in ("start", "replan")), {})
    return (plan["epochs"], plan["planned_epochs"]) if "planned_epochs" in plan else (None, None)


def budget_text(spent: float, budget_usd: float | None, price: float | None, hours_left: float | None,
                mode: str | None = "stop") -> str:
    """What follows "cost so far $X" in `watch` and `aws status`: ", ~$P projected at the end ($p/h now); budget
    $B: $L left". The projection is the price now times the hours the ETA gives: spot prices move. `mode`:
    train.budget_mode (None, from a run that predates it: "stop")."""
    text = ""
    projected = spent + price * hours_left if price is not None and hours_left is not None else None
    if projected is not None:
        text += f", ~${projected:.2f} projected at the end (${price:.4f}/h now)"
    if budget_usd is not None:
        text += f"; budget ${budget_usd:.2f}: ${budget_usd - spent:.2f} left"
        if projected is not None and projected > budget_usd:
            text += (" (the run shortens its schedule at the next epoch end to fit it, or stops with a checkpoint "
                     "when not even one more epoch fits: exit 4)" if mode == "fit" else
                     " (the run stops with a checkpoint before it would pass it: exit 4)")
    return text
