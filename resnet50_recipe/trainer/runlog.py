"""The run directory's human-facing files: recipe.yaml, env.json, metrics.jsonl, curves.png, summary.json,
and the TensorBoard / W&B trackers fed from the same records (trackers.py).

metrics.jsonl holds one JSON record a line: `step` records every `log.every_steps` optimizer steps, `epoch`
records, and a `start` record each time a process starts or resumes the run (the wall-clock time and the
run's plan: epochs, steps per epoch, global batch), which `watch` and `report` use for ETA and restarts.

Only rank 0 writes; other ranks get a RunLog that does nothing, so callers need no rank checks.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from resnet50_recipe.errors import ExistingOutput
from resnet50_recipe.recipe import Recipe, to_yaml
from resnet50_recipe.trainer.runtime import versions, write_json
from resnet50_recipe.trainer.trackers import open_trackers

__all__ = ["ARTEFACTS", "RESULTS", "check_replaceable", "clear_run_dir", "RunLog", "read_metrics", "plot_curves"]

# What a fresh start replaces. checkpoints/ is not among them: its files belong to lineages, which the lineage
# rule sets aside or deletes (trainer/run.py's write_start), never this.
ARTEFACTS = ("recipe.yaml", "env.json", "metrics.jsonl", "curves.png", "summary.json", "export", "tensorboard",
             "wandb", "wandb.json", "report")

RESULTS = ("summary.json", "export")


def check_replaceable(out: Path, force: bool) -> None:
    """A fresh start in `out` replaces its logs; a finished run's results are never replaced without `force`.

    A summary that says the run stopped (`stopped`: a signal, a spot notice; exit 74 or 75) is no result: the run was
    meant to go on, and a restart that finds no checkpoint beside it (the process was killed before the first
    one reached the disk) starts it over, as the unit's restart expects, instead of refusing with exit 2."""
    results = [name for name in RESULTS if (out / name).exists() and not (name == "summary.json" and _stopped(out))]
    if results and not force:
        raise ExistingOutput(f"{out} holds the results of an earlier run ({', '.join(results)}) and no checkpoint "
                             "to resume; pass --output DIR for a new run, or --force to replace them")


def _stopped(out: Path) -> bool:
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    # `stopped`, not the status: 74 alone may also be a finished run whose last sync did not complete.
    return isinstance(summary, dict) and summary.get("stopped") is True


def clear_run_dir(out: Path) -> None:
    """Remove an earlier run's logs and results for a fresh start (checkpoints/ is the lineage rule's)."""
    for name in ARTEFACTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)


class RunLog:
    def __init__(self, out: Path, enabled: bool):
        self.out, self.enabled = out, enabled
        self.epochs: list[dict] = []  # per-epoch records, for curves.png and the summary
        self.extra: Callable[[], dict] | None = None  # fields added to every line (on EC2: instance and cost)
        self.resumed_at: int | None = None  # the global step of the checkpoint this process resumed from
        self.spent: dict = {}  # on EC2: the cost (and price) recorded before a resume, kept in its start line
        self.trackers: list = []

    def start(self, recipe: Recipe, plan: dict | None = None) -> None:
        if not self.enabled:
            return

        (self.out / "recipe.yaml").write_text(to_yaml(recipe))
        env = versions()
        write_json(self.out / "env.json", env)
        self.trackers = open_trackers(self.out, recipe, self.resumed_at)
        # The GPUs this process sees: with the step lines' img/s and resolution, what `aws price --from-run` reads
        # (a resume may land on another machine, so each start line says which ran the steps after it).
        self.log({"kind": "start", "global_step": self.resumed_at or 0, "time": time.time(), **(plan or {}),
                  "gpus": env["gpus"], **self.spent})

    def sample_images(self, dataset, count: int = 16) -> None:
        """A grid of augmented training images as epoch 0 sees them (before Mixup and erasing, which happen
        on the device), spread over the dataset so that several classes show."""
        if not self.trackers:
            return
        from torchvision.utils import make_grid

        indices = sorted({i * len(dataset) // count for i in range(count)})
        grid = make_grid([dataset[(0, i)].image for i in indices], nrow=8, padding=2)
        for tracker in self.trackers:
            tracker.images("train/augmented_samples", grid)

    def resume(self, global_step: int, history: list[dict]) -> None:
        """Drop what was logged after the checkpoint being resumed: those steps will run again. The money they
        cost was spent all the same: the last recorded `cost_usd` goes into the start line (`start`), from which
        the cost carried over (budget.py's InstanceCost) and `watch` read it."""
        self.resumed_at = global_step
        self.epochs = [r for r in history if r.get("kind") == "epoch"]
        path = self.out / "metrics.jsonl"
        if not self.enabled or not path.exists():
            return
        records = read_metrics(path)
        costed = [r for r in records if r.get("cost_usd") is not None]
        self.spent = {k: costed[-1][k] for k in ("cost_usd", "price_usd_per_h") if k in costed[-1]} if costed else {}
        kept = [r for r in records if r.get("global_step", 0) <= global_step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)

    def log(self, record: dict) -> None:
        """Append one JSON line; flushed at once so a killed run keeps everything logged so far."""
        if record.get("kind") == "epoch":
            self.epochs.append(record)
        if not self.enabled:
            return
        line = {**record, **self.extra()} if self.extra is not None else record
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        if record.get("kind") in ("step", "epoch"):
            for tracker in self.trackers:
                tracker.log(line)  # with the cost fields on EC2, so TensorBoard charts them too

    def plot(self) -> None:
        if self.enabled and self.epochs:
            plot_curves(self.epochs, self.out / "curves.png")

    def summary(self, data: dict) -> None:
        if self.enabled:
            write_json(self.out / "summary.json", data)
            for tracker in self.trackers:
                tracker.summary(data)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(epochs: list[dict], path: Path) -> None:
    """Loss, top-1 (raw and EMA) and lr against epoch, in one PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    x = [r["epoch"] + 1 for r in epochs]
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    loss_ax.plot(x, [r["train_loss"] for r in epochs], marker="o", label="train")
    if any(r.get("val_loss") is not None for r in epochs):
        loss_ax.plot(*_present(x, epochs, "val_loss"), marker="o", label="val")
    loss_ax.set(title="loss", xlabel="epoch")
    loss_ax.legend()
    acc_ax.plot(*_present(x, epochs, "top1"), marker="o", label="raw")
    if any(r.get("ema_top1") is not None for r in epochs):
        acc_ax.plot(*_present(x, epochs, "ema_top1"), marker="o", label="EMA")
    acc_ax.set(title="val top-1", xlabel="epoch", ylim=(0, 1))
    acc_ax.legend()
    lr_ax.plot(x, [r["lr"] for r in epochs], marker="o")
    lr_ax.set(title="learning rate (end of epoch)", xlabel="epoch")
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.grid(alpha=0.3)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)


def _present(x: list, records: list[dict], key: str) -> tuple[list, list]:
    pairs = [(xi, r[key]) for xi, r in zip(x, records) if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]
