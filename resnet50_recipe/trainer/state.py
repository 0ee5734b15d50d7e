"""The training state a checkpoint holds: `snapshot` (a CPU copy at a step boundary, pickle-free) and `restore`,
the RNG states by rank, each rank's BatchNorm statistics, and the loop's `Progress`. The files themselves are
written by store/checkpoints.py."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from resnet50_recipe.data.pipeline import (
    mix_seed,
)
from resnet50_recipe.recipe import to_dict
from resnet50_recipe.store.checkpoints import FORMAT, new_lineage
from resnet50_recipe.trainer.runtime import versions
from resnet50_recipe.trainer.step import Trainer

__all__ = ["Progress", "cpu_copy", "rng_state", "set_rng_state", "cuda_states_to_apply", "rank_rng_state",
           "norm_buffers", "load_norm_buffers", "snapshot", "restore"]


@dataclass
class Progress:
    """What the loop carries besides the trainer: results so far, the best epoch, and the run's clock."""
    history: list[dict] = field(default_factory=list)  # epoch records
    best: dict | None = None  # best evaluated epoch
    best_checkpoint: dict | None = None  # best epoch that has a checkpoint, kept by retention
    pending_eval: dict | None = None  # an epoch whose evaluation a stop cut short: evaluated first on resume
    # train.budget_mode: fit's shortened plan, {"planned_epochs", "epochs", "after_epoch"} (trainer/run.py's replan)
    replan: dict | None = None
    elapsed_before: float = 0.0
    wall_start: float = field(default_factory=time.time)

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.wall_start


log = logging.getLogger(__name__)

log = logging.getLogger(__name__)


def cpu_copy(tree: Any) -> Any:
    """Detached CPU copies of every tensor in a nested dict/list, so training can go on while it is written."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [cpu_copy(v) for v in tree]
    return tree


def rng_state() -> dict:
    """Every RNG stream of this process as tensors and lists (numpy's tuple state would need pickle). On CUDA,
    only the generator of the device this process uses: a machine with another GPU count can restore it."""
    cuda = [torch.cuda.get_rng_state()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return _plain(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)


def _plain(py_state, np_state, torch_state, cuda: list) -> dict:
    version, mt, gauss = py_state
    name, keys, pos, has_gauss, cached = np_state
    return {
        "python": [version, list(mt), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch_state,
        "cuda": cuda,
    }


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for device, cuda_state in cuda_states_to_apply(state["cuda"], [torch.cuda.current_device()]).items():
            torch.cuda.set_rng_state(cuda_state, device)


def cuda_states_to_apply(saved: list, devices: list[int]) -> dict:
    """device index -> saved CUDA generator state, for the devices this process uses.

    A checkpoint holds the states of the devices its process used, in order (checkpoints before this rule held
    every visible device's, the process's own first, since rank 0 uses device 0). They go to this process's
    devices in the same order, whatever the device count of either machine: a state with no device here is
    dropped, and a device with no saved state (a CPU checkpoint) keeps the seed it started with.
    """
    return dict(zip(devices, saved))


def rank_rng_state(saved, rank: int, world_size: int, seed: int, step: int) -> tuple[dict, str | None]:
    """The RNG state rank `rank` restores from a checkpoint's per-rank list, and a note when the process count
    changed (None when it did not).

    Each rank restores the state it saved. With another process count, rank r takes the state rank r saved
    when there is one, and a rank the checkpoint has no state for starts from streams seeded by
    (seed, global step, rank): deterministic, and different on every rank. `saved` is a single dict in
    checkpoints written before every rank's state was kept (rank 0's).
    """
    states = saved if isinstance(saved, list) else [saved]
    if rank < len(states):
        state = states[rank]
    else:
        generator = mix_seed(seed, step, rank)
        state = _plain(random.Random(generator).getstate(), np.random.RandomState(generator).get_state(),
                       torch.Generator().manual_seed(generator).get_state(), [])
    if len(states) == world_size:
        return state, None
    return state, (f"the checkpoint holds the RNG states of {len(states)} process(es) and this run has {world_size}: "
                   f"rank r restores rank r's saved state, and ranks {len(states)} and up start from streams seeded "
                   "by (seed, step, rank); the run is reproducible, but not bitwise the run it continues")


def norm_buffers(module: torch.nn.Module) -> dict:
    """CPU copies of the BatchNorm running statistics that timm's `distribute_bn` averages over processes (on
    the CPU, so that they pickle to another rank without touching its GPU)."""
    return {name: cpu_copy(buffer) for name, buffer in module.named_buffers()
            if "running_mean" in name or "running_var" in name}


def load_norm_buffers(module: torch.nn.Module, buffers: dict) -> None:
    own = dict(module.named_buffers())
    with torch.no_grad():
        for name, value in buffers.items():
            own[name].copy_(value)


def snapshot(t: Trainer, epoch: int, step_in_epoch: int, progress: Progress, classes: list[str],
             lineage: dict | None = None, pending_eval: dict | None = None, ranks: list[dict] | None = None,
             train_set: dict | None = None) -> dict:
    """The whole training state (docs/DESIGN.md, section 3) as CPU copies, taken at a step boundary.

    `epoch` is the epoch to run next and `step_in_epoch` the samples of it already consumed, counted in the
    global sample order so that the position survives a change of process count. `pending_eval` is the record
    of an epoch whose evaluation a stop cut short. `ranks` holds what each rank keeps for itself, by rank: its
    RNG state and, under DDP without SyncBN, its own BN statistics (default: this process's RNG state);
    `train_set` the train set's image count and file-list hash.
    """
    ranks = ranks or [{"rng": rng_state(), "norm_buffers": None}]
    return {
        "format": FORMAT,
        "model": cpu_copy(t.model.state_dict()),
        "ema": cpu_copy(t.ema.module.state_dict()) if t.ema is not None else None,
        "optimizer": cpu_copy(t.optimizer.state_dict()),
        "scheduler": cpu_copy(t.scheduler.state_dict()),
        "scaler": t.scaler.state_dict(),
        "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": t.global_step,
        "global_batch": t.recipe.train.batch_size * t.rt.world_size * t.recipe.train.accum_steps,
        "loop": {"epoch_loss": cpu_copy(t.epoch_loss), "window_loss": cpu_copy(t.window_loss),
                 "window_steps": t.window_steps, "bad_images": list(t.bad_images)},
        "rng": [r["rng"] for r in ranks],
        "norm_buffers": [r["norm_buffers"] for r in ranks] if ranks[0]["norm_buffers"] is not None else None,
        "train_set": train_set,
        "best": progress.best, "best_checkpoint": progress.best_checkpoint,
        "metrics": [dict(r) for r in progress.history], "pending_eval": pending_eval, "replan": progress.replan,
        "elapsed_s": progress.elapsed(), "recipe": to_dict(t.recipe), "versions": versions(), "class_names": classes,
        "lineage": lineage or new_lineage(),
    }


def restore(t: Trainer, state: dict, scheduler: bool = True) -> None:
    """Load a snapshot into a freshly built trainer (the RNG states are restored separately, last)."""
    t.model.load_state_dict(state["model"])
    if t.ema is not None and state["ema"] is not None:
        t.ema.module.load_state_dict(state["ema"])
    t.optimizer.load_state_dict(state["optimizer"])
    if scheduler:
        t.scheduler.load_state_dict(state["scheduler"])
    if t.scaler.is_enabled() and state["scaler"]:
        t.scaler.load_state_dict(state["scaler"])
    elif t.scaler.is_enabled():  # fp16 here, bf16 or fp32 on the machine that saved it (a T4 after an A10G, say)
        log.warning("GradScaler: the checkpoint was saved without one (bf16 or fp32) and this run uses one (fp16): "
                    "it starts fresh")
    elif state["scaler"]:
        log.warning("GradScaler: the checkpoint was saved with one (fp16) and this run uses none (bf16 or fp32): "
                    "its state is not used")
    own = state.get("norm_buffers")
    if own is not None and len(own) == t.rt.world_size:  # this rank's own BN statistics, as it left them
        for module, buffers in zip([t.model] + ([t.ema.module] if t.ema is not None else []), own[t.rt.rank]):
            load_norm_buffers(module, buffers)
    t.global_step = state["global_step"]
    t.scheduler.step_update(num_updates=t.global_step)  # the lr for the step about to run
    loop = state["loop"]
    t.epoch_loss.copy_(loop["epoch_loss"])
    t.window_loss.copy_(loop["window_loss"])
    t.window_steps, t.bad_images = loop["window_steps"], list(loop["bad_images"])
