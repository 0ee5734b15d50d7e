"""TensorBoard and Weights & Biases: the records RunLog writes to metrics.jsonl, sent on to a viewer.

Every numeric field of a step or epoch record becomes a scalar named `<kind>/<field>` (step/loss, step/lr,
step/img_per_s, step/data_wait, epoch/top1, epoch/ema_top1, ...) at the record's global step, so fields that
other parts add to the records (cost_usd on EC2) show up without changes here.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path

import torch

from resnet50_recipe.recipe import Recipe, RecipeError, to_dict
from resnet50_recipe.trainer.runtime import write_json

__all__ = ["WANDB_ID_FILE", "scalars", "TensorBoard", "WandB", "open_trackers"]

log = logging.getLogger(__name__)

_NOT_SCALARS = {"kind", "epoch", "step", "global_step", "time"}

WANDB_ID_FILE = "wandb.json"


def scalars(record: dict) -> dict[str, float]:
    values = {f"{record['kind']}/{k}": float(v) for k, v in record.items()
              if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if record["kind"] == "step" and torch.cuda.is_available() and torch.cuda.is_initialized():
        values["step/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30  # peak since the epoch began
    return values


class TensorBoard:
    """Event files in <run dir>/tensorboard. On a resume from step N, `purge_step` N + 1 makes TensorBoard
    drop what an earlier process logged after that checkpoint, as metrics.jsonl is cut back."""

    def __init__(self, folder: Path, resumed_at: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=None if resumed_at is None else resumed_at + 1,
                                    flush_secs=10)

    def log(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["global_step"])

    def images(self, tag: str, grid: torch.Tensor) -> None:
        self.writer.add_image(tag, grid, 0)

    def summary(self, data: dict) -> None:  # the Text tab; markdown, so a code block keeps the layout
        text = "```\n" + json.dumps(data, indent=2) + "\n```"
        self.writer.add_text("summary", text, data.get("global_step", 0))

    def close(self) -> None:
        self.writer.close()


class WandB:
    """One W&B run per run directory: its id is kept in wandb.json, which is synced to the remote with the
    checkpoints and fetched back on a resume, so a run resumed after a preemption, even on another machine,
    continues the same W&B run. W&B ignores steps it already has, so steps that run again after a resume
    keep their first values there."""

    def __init__(self, out: Path, recipe: Recipe):
        try:
            import wandb
        except ImportError:
            raise RecipeError("log.wandb: true needs the wandb package: pip install 'resnet50-recipe[wandb]', "
                              "or set log.wandb: false") from None
        id_file = out / WANDB_ID_FILE
        run_id = json.loads(id_file.read_text())["id"] if id_file.is_file() else secrets.token_hex(4)
        write_json(id_file, {"id": run_id, "project": recipe.log.wandb_project, "entity": recipe.log.wandb_entity})
        self.wandb = wandb
        self.run = wandb.init(project=recipe.log.wandb_project, entity=recipe.log.wandb_entity, id=run_id,
                              resume="allow", name=f"{recipe.name}-{run_id}", dir=str(out), config=to_dict(recipe))

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["global_step"])

    def images(self, tag: str, grid: torch.Tensor) -> None:
        self.run.log({tag: self.wandb.Image(grid.permute(1, 2, 0).numpy())}, step=0)

    def summary(self, data: dict) -> None:
        self.run.summary.update({k: v for k, v in data.items() if isinstance(v, (int, float, str, bool))})

    def close(self) -> None:
        self.run.finish()


def open_trackers(out: Path, recipe: Recipe, resumed_at: int | None) -> list:
    trackers: list = []
    if recipe.log.wandb:
        trackers.append(WandB(out, recipe))  # first: a missing package fails before anything is written
    if recipe.log.tensorboard:
        try:
            trackers.append(TensorBoard(out / "tensorboard", resumed_at))
        except ImportError:  # an optional viewer must not stop a training run
            log.warning("log.tensorboard: the tensorboard package is not installed, so no event files are "
                        "written; pip install 'resnet50-recipe[tensorboard]' to get them")
    return trackers
