"""The step: the `Trainer` (model, EMA, optimizer, scheduler, scaler, loss, Mixup) built from a recipe, batches on
the device, `train_steps` over one epoch's batches, the stop checks between steps, and `evaluate`."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from timm.data.random_erasing import RandomErasing
from timm.utils import dispatch_clip_grad

from resnet50_recipe.data.pipeline import (
    UnreadableImage,
    mix_seed,
    seeded,
)
from resnet50_recipe.model import build_model
from resnet50_recipe.recipe import Recipe, RecipeError, scaled_lr
from resnet50_recipe.trainer.components import build_ema, build_loss, build_mixup, build_optimizer, build_scheduler
from resnet50_recipe.trainer.runtime import Runtime
from resnet50_recipe.trainer.stop import StopControl

__all__ = ["Trainer", "make_to_input", "device_batches", "prepare_model", "build_trainer", "train_steps",
           "optimizer_step", "should_stop", "agreed_stop", "evaluate"]

log = logging.getLogger(__name__)


@dataclass
class Trainer:
    """What one optimizer step needs, built once from the recipe. `global_step` counts optimizer updates."""
    recipe: Recipe
    rt: Runtime
    model: torch.nn.Module  # the module whose weights are saved
    forward: torch.nn.Module  # the same module, compiled when train.compile is set
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    criterion: torch.nn.Module
    mixup: object | None
    eraser: RandomErasing | None
    ema: object | None
    to_input: Callable[[torch.Tensor], torch.Tensor]
    # Loop accumulators, part of the checkpoint so that a resumed run logs exactly what an unbroken one does.
    epoch_loss: torch.Tensor  # summed per finished log window
    window_loss: torch.Tensor  # summed per micro-batch since the last step record
    window_steps: int = 0
    global_step: int = 0
    bad_images: list[str] = field(default_factory=list)


def make_to_input(recipe: Recipe, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 NCHW on the host -> normalised float on the device (channels_last when asked for), as timm's
    PrefetchLoader does: a quarter of the bytes of a float batch cross the bus."""
    mean = torch.tensor(recipe.augment.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(recipe.augment.std, device=device).view(1, 3, 1, 1) * 255
    memory_format = torch.channels_last if recipe.train.channels_last else torch.contiguous_format

    def to_input(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device, non_blocking=True)
        return images.float().sub_(mean).div_(std).contiguous(memory_format=memory_format)
    return to_input


def device_batches(batches: Iterable, to_input, device: torch.device) -> Iterator:
    """(uint8 images, targets, bad) from the loader -> (normalised device images, device targets, bad).

    On CUDA this runs one batch ahead, as timm's PrefetchLoader does: batch n+1 is copied and normalised on a
    side stream while the step for batch n runs, so the copy never stalls the compute stream.
    """
    if device.type != "cuda":
        for images, targets, bad in batches:
            yield to_input(images), targets.to(device), bad
        return
    stream = torch.cuda.Stream(device)
    ready = None
    for images, targets, bad in batches:
        with torch.cuda.stream(stream):
            upcoming = (to_input(images), targets.to(device, non_blocking=True), bad)
        if ready is not None:
            yield ready
        torch.cuda.current_stream(device).wait_stream(stream)
        for tensor in upcoming[:2]:
            # Made on the side stream, used on the compute stream: without this the allocator could hand the
            # memory back to the side stream for the next copy while the compute stream still reads it.
            tensor.record_stream(torch.cuda.current_stream(device))
        ready = upcoming
    if ready is not None:
        yield ready


def prepare_model(recipe: Recipe, rt: Runtime, num_classes: int) -> torch.nn.Module:
    model = build_model(recipe.model, num_classes).to(rt.device)
    return model.to(memory_format=torch.channels_last) if recipe.train.channels_last else model


def build_trainer(recipe: Recipe, rt: Runtime, num_classes: int, updates_per_epoch: int) -> Trainer:
    tc = recipe.train
    model = prepare_model(recipe, rt, num_classes)
    if tc.sync_bn and rt.distributed:
        if rt.device.type != "cuda":
            raise RecipeError("train.sync_bn: torch's SyncBatchNorm runs on CUDA devices only; set it to false "
                              "for CPU processes")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = build_ema(recipe.ema, model)  # after the move, so the EMA copy lives on the device too
    forward = model
    if rt.distributed:  # gradients are averaged over processes; rank 0's initial weights are broadcast
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device] if rt.device.type == "cuda" else None)
    global_batch = tc.batch_size * rt.world_size * tc.accum_steps
    optimizer = build_optimizer(recipe.optim, model, scaled_lr(recipe.optim, global_batch), rt.device)
    scheduler = build_scheduler(recipe.sched, optimizer, tc.epochs, updates_per_epoch)
    mixup = build_mixup(recipe.mixup, recipe.loss, num_classes)
    aug = recipe.augment
    eraser = RandomErasing(aug.re_prob, mode=aug.re_mode, max_count=aug.re_count, device=rt.device) \
        if aug.re_prob > 0 else None
    return Trainer(
        # dynamic=False: one static graph per input size, so a progressive-resizing step to a new size is a
        # clean recompile of a specialised graph rather than a switch to slower shape-generic kernels.
        recipe=recipe, rt=rt, model=model, forward=torch.compile(forward, dynamic=False) if tc.compile else forward,
        optimizer=optimizer, scheduler=scheduler, scaler=torch.amp.GradScaler(rt.device.type, enabled=rt.use_scaler),
        criterion=build_loss(recipe.loss, mixup is not None).to(rt.device), mixup=mixup, eraser=eraser, ema=ema,
        to_input=make_to_input(recipe, rt.device), epoch_loss=torch.zeros((), device=rt.device),
        window_loss=torch.zeros((), device=rt.device))


# ---------------------------------------------------------------------------------------------------------
# One epoch


def train_steps(t: Trainer, batches: Iterable, epoch: int, num_batches: int, log, progress=None,
                    stop: StopControl | None = None, start_batch: int = 0,
                    after_step: Callable[[int], None] | None = None) -> dict:
    """Run micro-batches `start_batch` to `num_batches` of the epoch (a whole number of optimizer steps).

    `batches` yields them from `start_batch` on (the sampler skips ahead by index). `log(record)` receives a
    step record every `log.every_steps` optimizer steps; `after_step(batches_done)` runs after every optimizer
    step (mid-epoch checkpoints). Returns the epoch's train stats, or where it stopped.
    """
    tc, seed = t.recipe.train, t.recipe.seed
    t.model.train()
    if start_batch == 0:
        t.epoch_loss.zero_()
        t.window_loss.zero_()
        t.window_steps = 0
    window_seen, window_wait = 0, 0.0
    window_start = time.perf_counter()
    batch_iter: Iterator = device_batches(batches, t.to_input, t.rt.device)
    batch_idx, input_size = start_batch - 1, None
    for batch_idx in range(start_batch, num_batches):
        wait_start = time.perf_counter()
        try:
            images, targets, bad = next(batch_iter)
        except UnreadableImage as e:
            e.batches_done = batch_idx  # the state is at this step boundary: the run can checkpoint it
            raise
        window_wait += time.perf_counter() - wait_start
        if bad:
            t.bad_images += bad
        input_size = images.shape[-1]
        if t.eraser is not None or t.mixup is not None:
            # Per rank, as timm's train.py seeds it: each rank's batch gets its own lambda and erased boxes.
            with seeded(mix_seed(seed, epoch, batch_idx, 1, t.rt.rank)):
                if t.eraser is not None:
                    images = t.eraser(images)
                if t.mixup is not None:
                    images, targets = t.mixup(images, targets)

        with t.rt.autocast():
            loss = t.criterion(t.forward(images), targets)
        if batch_idx % tc.accum_steps == 0:
            # Freeing the old gradients right before backward lets it reuse their memory at once; freed
            # earlier, the CPU allocator hands the pages back and backward pays to fault them in again
            # (measured: 5-8 % of a ResNet-50 step on 2 cores, BENCHMARKS.md).
            t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(loss / tc.accum_steps if tc.accum_steps > 1 else loss).backward()
        t.window_loss += loss.detach()
        window_seen += images.shape[0]

        if (batch_idx + 1) % tc.accum_steps:
            continue  # gradient accumulation: keep summing into .grad
        optimizer_step(t)

        if t.window_steps == t.recipe.log.every_steps or batch_idx + 1 == num_batches:
            elapsed = time.perf_counter() - window_start
            window = t.rt.all_reduce(t.window_loss.clone()) / t.rt.world_size  # the mean over processes
            record = {"kind": "step", "epoch": epoch, "step": (batch_idx + 1) // tc.accum_steps,
                      "global_step": t.global_step,
                      "loss": window.item() / (t.window_steps * tc.accum_steps),  # the only sync point
                      "lr": t.optimizer.param_groups[0]["lr"],
                      "img_per_s": window_seen * t.rt.world_size / elapsed, "train_size": input_size,
                      "data_wait": window_wait / elapsed}
            log(record)
            t.epoch_loss += t.window_loss
            if progress is not None:
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.3g}",
                                     img_s=f"{record['img_per_s']:.0f}", refresh=False)
            t.window_loss.zero_()
            t.window_steps, window_seen, window_wait = 0, 0, 0.0
            window_start = time.perf_counter()
        if progress is not None:
            progress.update(tc.accum_steps)
        if after_step is not None:
            after_step(batch_idx + 1)
        if stop is not None and should_stop(t, stop):
            break
    done = batch_idx + 1
    epoch_loss = t.rt.all_reduce(t.epoch_loss.clone()) / t.rt.world_size
    return {"train_loss": epoch_loss.item() / max(1, done), "batches": done, "input_size": input_size,
            "stopped": stop is not None and stop.stop.is_set() and done < num_batches}


def optimizer_step(t: Trainer) -> None:
    """One update from the accumulated gradients: clip, step, the EMA every `ema.every` updates, the lr."""
    if t.recipe.optim.clip_grad is not None:
        t.scaler.unscale_(t.optimizer)  # clip the true gradients, not the fp16-scaled ones
        dispatch_clip_grad(t.model.parameters(), t.recipe.optim.clip_grad, mode=t.recipe.optim.clip_mode)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.global_step += 1
    if t.ema is not None and t.global_step % t.recipe.ema.every == 0:
        t.ema.update(t.model, step=t.global_step)  # in optimizer steps: StridedEma raises its decay to `every`
    t.scheduler.step_update(num_updates=t.global_step)
    t.window_steps += 1


def should_stop(t: Trainer, control: StopControl) -> bool:
    """One process alone decides in a single-process run. Under DDP a stop seen by any rank (a signal, the
    spot notice) is agreed every `train.stop_sync_every` steps, so that every rank stops after the same step
    and one consistent checkpoint is written."""
    if t.rt.distributed and t.global_step % t.recipe.train.stop_sync_every:
        return False
    return agreed_stop(t.rt, control)


def agreed_stop(rt: Runtime, control: StopControl) -> bool:
    """Whether any process wants to stop. Under DDP, an all-reduce (MAX) of [wants to stop, -seconds left]: every
    rank stops, by the earliest deadline any rank has, so that a spot notice on one machine is every machine's
    deadline, fixed once (seconds left, not clock times: the machines' clocks differ)."""
    if not rt.distributed:
        return control.stop.is_set()
    mine = control.stop.is_set()
    left = control.stop_deadline() - time.time() if mine else control.timeout_s
    agreed = rt.all_reduce(torch.tensor([float(mine), -left], dtype=torch.float64, device=rt.device), op="max")
    if agreed[0].item() > 0:
        control.request_stop(control.reason or "a stop agreed with another rank (a signal or a spot notice there)",
                             time.time() - agreed[1].item())
        return True
    return False


# ---------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, to_input, rt: Runtime, flip: bool = False,
             stop: StopControl | None = None, checks: int | None = None) -> dict | None:
    """Top-1/top-5 accuracy (fractions) and mean cross-entropy over every sample in `batches`.

    `flip`: test-time augmentation with the horizontal mirror; the two logits are averaged (FFCV's lr_tta).
    `stop`: looked at before every batch; a stop ends the evaluation there and returns None (nothing it
    computed is kept, and it changed no training state). Under DDP the stop is agreed, so every rank takes
    part in each of the `checks` agreements (the longest shard's batch count), however many batches it has.
    """
    model.eval()
    correct1 = torch.zeros((), dtype=torch.int64, device=rt.device)
    correct5 = torch.zeros((), dtype=torch.int64, device=rt.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    count = 0
    batch_iter = device_batches(batches, to_input, rt.device)
    for _ in range(checks) if stop is not None and rt.distributed else itertools.count():
        if stop is not None and agreed_stop(rt, stop):
            return None
        batch = next(batch_iter, None)
        if batch is None:
            if stop is not None and rt.distributed:
                continue  # this rank's shard is done; it still joins the other ranks' stop agreements
            break
        images, targets, _ = batch
        with rt.autocast():
            logits = model(images)
            if flip:
                logits = (logits + model(images.flip(3))) / 2
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=1).sum()
        loss_sum += torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").double()
        count += targets.shape[0]
    # Each rank saw its own shard, with no padding: summing the counts counts every sample exactly once.
    totals = rt.all_reduce(torch.stack([correct1.double(), correct5.double(), loss_sum,
                                        torch.tensor(float(count), dtype=torch.float64, device=rt.device)]))
    correct1, correct5, loss_sum, count = totals.tolist()
    if count == 0:
        raise ValueError("evaluation saw no samples")
    return {"top1": correct1 / count, "top5": correct5 / count, "loss": loss_sum / count, "count": int(count)}
