"""The training loop: `train()` is the run's outline, one call per phase (docs/DESIGN.md, "The run's phases");
the phases around the loop live in lifecycle.py, the loop itself here: `run_epochs()` runs `train_one_epoch()`
and `evaluate()` epoch by epoch, and the `Checkpointer` saves at its cadence. It reads top to bottom in the
order it runs.

Rules the step keeps (docs/DESIGN.md):
- no host-device synchronisation per step: losses accumulate on the device and are read every
  `log.every_steps` steps;
- batches arrive as uint8 and are normalised on the device; on CUDA the next batch is copied (pinned,
  non_blocking) and normalised on a side stream while the current step computes;
- per-batch randomness (random erasing positions, Mixup/CutMix) is seeded by (seed, epoch, step, rank), and
  the stop event is looked at only between steps.
"""
from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from timm.data.random_erasing import RandomErasing
from timm.utils import dispatch_clip_grad, distribute_bn
from tqdm import tqdm

from . import checkpoint as ckpt
from .build import build_ema, build_loss, build_mixup, build_model, build_optimizer, build_scheduler
from .cost import BUDGET_REASON
from .data import (EpochSampler, ImageFolderDataset, UnreadableImage, class_names, eval_transform, make_loader,
                   mix_seed, resolve_data_dir, seeded, train_size_at, train_transform)
from .lifecycle import (EXIT_PREEMPTED, Inputs, Run, Services, SetupStopped, check_inputs, exit_status,
                        open_run, train_set_change)
from .recipe import Recipe, RecipeError, load_recipe, scaled_lr, to_dict
from .runlog import RunLog
from .runtime import Runtime, setup, versions, write_json
from .spot import StopControl, install_signal_handlers, restore_signal_handlers

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


def train_one_epoch(t: Trainer, batches: Iterable, epoch: int, num_batches: int, log, progress=None,
                    stop: threading.Event | None = None, start_batch: int = 0,
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
                      "img_per_s": window_seen * t.rt.world_size / elapsed,
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
            "stopped": stop is not None and stop.is_set() and done < num_batches}


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


def should_stop(t: Trainer, stop: threading.Event) -> bool:
    """One process alone decides in a single-process run. Under DDP a stop seen by any rank (a signal, the
    spot notice) is agreed every `train.stop_sync_every` steps, so that every rank stops after the same step
    and one consistent checkpoint is written."""
    if t.rt.distributed and t.global_step % t.recipe.train.stop_sync_every:
        return False
    return agreed_stop(t.rt, stop)


def agreed_stop(rt: Runtime, stop: threading.Event) -> bool:
    """Whether any process wants to stop (an all-reduce MAX under DDP); sets the event everywhere if so."""
    if not rt.distributed:
        return stop.is_set()
    flag = rt.all_reduce(torch.tensor(float(stop.is_set()), device=rt.device), op="max")
    if flag.item() > 0:
        stop.set()
        return True
    return False


# ---------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, to_input, rt: Runtime, flip: bool = False,
             stop: threading.Event | None = None, checks: int | None = None) -> dict | None:
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


# ---------------------------------------------------------------------------------------------------------
# The whole run: `train` is the outline; each phase is one call (docs/DESIGN.md, "The run's phases").


def train(recipe: Recipe, output: str | Path | None = None, *, quiet: bool = False, resume: str = "auto",
          force: bool = False, allow_recipe_change: bool = False, control: StopControl | None = None) -> dict:
    """Train `recipe` in the run directory `output` (default runs/<recipe name>); return the summary, whose
    `exit_status` is what `resnet50-recipe train` exits with (README, "Exit codes").

    `resume`: "auto" continues the run's current lineage from its newest valid checkpoint, locally or in S3,
    when there is one; "never" starts a new lineage (refusing to replace checkpoints unless `force`); a path
    continues from that checkpoint (a new lineage unless it is the current lineage's newest). A stop request
    (SIGTERM, SIGINT, SIGUSR1, the EC2 spot notice, or `control`) at any point ends the run at the next step
    boundary with a checkpoint, and `summary["stopped"]` set.
    """
    control = control or StopControl()
    handlers = install_signal_handlers(control)  # before any set-up work: a stop is honoured from here on
    run = services = None
    try:
        rt = setup(recipe.train, recipe.seed)
        say = (lambda *a: None) if quiet or not rt.is_main else (lambda msg: print(msg, flush=True))
        inputs = check_inputs(recipe, rt, control)  # 1. every check that needs no checkpoint; nothing written
        run = open_run(recipe, rt, inputs, output, resume, force, allow_recipe_change, control, say)  # 2.
        loop = build(recipe, rt, inputs, run, say, quiet)  # 3. loaders, trainer, the checkpoint restored
        services = Services(run, recipe, rt, inputs, control, loop.runlog)  # 4. writer, uploader, spot watcher
        outcome = run_epochs(loop, Checkpointer(loop, services, control), control)  # 5. the epoch loop
        unfinished = stop_and_drain(loop, services, outcome, control)  # 6. a stop's checkpoint made safe
        return finish(loop, services, outcome, unfinished, control)  # 7. summary, sync, export, push
    except SetupStopped as e:
        log.warning(str(e))
        return {"stopped": True, "during": "set-up", "global_step": None, "top1": None,
                "exit_status": EXIT_PREEMPTED}
    finally:
        if services is not None:
            services.close()
        if run is not None:
            run.close()
        restore_signal_handlers(handlers)  # after the last sync


@dataclass
class Progress:
    """What the loop carries besides the trainer: results so far, the best epoch, and the run's clock."""
    history: list[dict] = field(default_factory=list)  # epoch records
    best: dict | None = None  # best evaluated epoch
    best_checkpoint: dict | None = None  # best epoch that has a checkpoint, kept by retention
    pending_eval: dict | None = None  # an epoch whose evaluation a stop cut short: evaluated first on resume
    elapsed_before: float = 0.0
    wall_start: float = field(default_factory=time.time)

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.wall_start


@dataclass
class Loop:
    """What the epoch loop works with, built once by `build`."""
    recipe: Recipe
    rt: Runtime
    t: Trainer
    inputs: Inputs
    run: Run
    progress: Progress
    runlog: RunLog
    train_sampler: EpochSampler
    val_loader: torch.utils.data.DataLoader
    val_batches: int  # evaluation batches of the longest shard: every rank checks for a stop that often
    loader_args: dict
    say: Callable[[str], None]
    show_bar: bool
    start_epoch: int = 0
    start_batch: int = 0
    train_loader: torch.utils.data.DataLoader | None = None  # made per training resolution, in the epoch loop
    loader_size: int | None = None


@dataclass
class Outcome:
    """How the epoch loop ended: at the end, or stopped with a checkpoint at (epoch, batches done)."""
    stopped: bool = False
    at: tuple[int, int] | None = None
    during: str | None = None  # "training" or "evaluation"


def build(recipe: Recipe, rt: Runtime, inputs: Inputs, run: Run, say, quiet: bool) -> Loop:
    """The build phase: samplers and loaders, the trainer, the checkpoint restored, the run's log opened."""
    tc, n = recipe.train, inputs.samples_per_batch
    train_sampler = EpochSampler(len(inputs.train_set), recipe.seed, shuffle=True, rank=rt.rank,
                                 world_size=rt.world_size, aug_repeats=recipe.data.aug_repeats)
    val_sampler = EpochSampler(len(inputs.val_set), recipe.seed, shuffle=False, rank=rt.rank, world_size=rt.world_size)
    loader_args = dict(workers=recipe.data.workers, pin_memory=recipe.data.pin_memory, seed=recipe.seed)
    val_loader = make_loader(inputs.val_set, val_sampler, tc.batch_size, drop_last=False, **loader_args)
    longest_shard = -(-len(inputs.val_set) // rt.world_size)
    t = build_trainer(recipe, rt, len(inputs.classes), inputs.updates_per_epoch)
    loop = Loop(recipe, rt, t, inputs, run, Progress(), RunLog(run.out, enabled=rt.is_main), train_sampler,
                val_loader, -(-longest_shard // tc.batch_size), loader_args, say,
                show_bar=not quiet and rt.is_main and sys.stderr.isatty())
    state, p = run.state, loop.progress
    if state is not None:
        # After an allowed recipe change (more epochs, say) the schedule follows the new recipe from here on.
        restore(t, state, scheduler=not run.diff)
        p.history, p.best, p.best_checkpoint = state["metrics"], state["best"], state["best_checkpoint"]
        p.pending_eval, p.elapsed_before = state.get("pending_eval"), state["elapsed_s"]
        loop.start_epoch, loop.start_batch = state["epoch"], state["step_in_epoch"] // n
        if loop.start_batch and train_set_change(state, inputs):  # allowed: the rest of the old order means nothing
            loop.start_epoch, loop.start_batch = loop.start_epoch + 1, 0
            say(f"the train set changed ({train_set_change(state, inputs)}): epoch {loop.start_epoch} ends here; "
                f"training goes on from the first batch of epoch {loop.start_epoch + 1}")
        loop.runlog.resume(t.global_step, p.history)
        say(f"resuming from {run.resume_path}: epoch {loop.start_epoch + 1}, batch {loop.start_batch} of "
            f"{inputs.num_batches}, step {t.global_step}")
    loop.runlog.start(recipe, {"epochs": tc.epochs, "steps_per_epoch": inputs.updates_per_epoch,
                               "global_batch": inputs.global_batch, "world_size": rt.world_size,
                               "train_images": len(inputs.train_set), "device": str(rt.device),
                               "run_id": run.lineage["run_id"], "budget_usd": tc.budget_usd})
    if state is None:
        loop.runlog.sample_images(inputs.train_set)
    n_params = sum(p.numel() for p in t.model.parameters())
    say(f"{recipe.name}: {recipe.model.name} ({n_params / 1e6:.1f}M params), {len(inputs.classes)} classes, "
        f"{len(inputs.train_set)} train / {len(inputs.val_set)} val images from {inputs.data_dir}; {rt.device}, "
        f"amp={str(rt.amp_dtype).replace('torch.', '') if rt.amp_dtype else 'off'}, "
        f"peak lr {scaled_lr(recipe.optim, inputs.global_batch):.4g} at global batch {inputs.global_batch}; "
        f"run dir {run.out}")
    if state is not None:
        rng, note = ckpt.rank_rng_state(state["rng"], rt.rank, rt.world_size, recipe.seed, state["global_step"])
        if note:
            say(note)
        ckpt.set_rng_state(rng)  # last, after everything that drew from the RNGs while being built
    return loop


class Checkpointer:
    """Checkpoint cadence and saving: the snapshot, the writer, when the last save was, and the best checkpoint.

    Saves come at epoch ends (`checkpoint.every_epochs`, the last epoch, a stop), inside an epoch
    (`every_steps`, `every_minutes`, a rebalance recommendation) and at a stop. Only rank 0 has a writer; the
    other ranks keep the cadence's bookkeeping and write nothing.
    """

    def __init__(self, loop: Loop, services: Services, control: StopControl):
        self.loop, self.services, self.control = loop, services, control
        self.writer = services.writer
        self.last_save = time.monotonic()

    def save(self, epoch: int, batches_done: int, pending_eval: dict | None = None, is_best: bool = False) -> None:
        """Snapshot the state into CPU memory now (the epoch to run next and the batches of it done); the writer
        thread puts it on disk. A best epoch's snapshot is never superseded in the writer's queue."""
        loop, p, t, rt = self.loop, self.loop.progress, self.loop.t, self.loop.rt
        self.last_save = time.monotonic()
        if is_best:
            p.best_checkpoint = {**p.best, "file": ckpt.checkpoint_name(t.global_step)}
        # Every rank takes part: its RNG state and its own BN statistics go into the checkpoint, and under DDP
        # without SyncBN the saved statistics are the mean over ranks (timm's distribute_bn), while each rank's
        # own are put back, so that a save leaves the run exactly as an unsaved one goes on.
        modules = [t.model] + ([t.ema.module] if t.ema is not None else [])
        reduce = rt.distributed and not loop.recipe.train.sync_bn
        own = [ckpt.norm_buffers(m) for m in modules] if reduce else None
        ranks = rt.gather({"rng": ckpt.rng_state(), "norm_buffers": own})
        for module in modules if reduce else []:
            distribute_bn(module, rt.world_size, reduce=True)
        if self.writer is not None:
            state = snapshot(t, epoch, batches_done * loop.inputs.samples_per_batch, p, loop.inputs.classes,
                             loop.run.lineage, pending_eval, ranks, loop.inputs.train_set.fingerprint())
            self.writer.submit({**state, "is_best": is_best})
        for module, buffers in zip(modules, own or []):
            ckpt.load_norm_buffers(module, buffers)

    def after_step(self, epoch: int, batches_done: int) -> None:
        """After every optimizer step: a failed write stops the run at once; a mid-epoch save when one is due."""
        if self.writer is not None and self.writer.error is not None:
            self.writer.raise_error()
        cc = self.loop.recipe.checkpoint
        timed = bool((cc.every_minutes and time.monotonic() - self.last_save >= cc.every_minutes * 60)
                     or self.control.checkpoint_now.is_set())
        rt, step = self.loop.rt, self.loop.t.global_step
        if rt.distributed:
            # A save is a collective (every rank's RNG state is gathered), so the clock's and the rebalance
            # notice's saves are agreed at the stop-agreement cadence, when every rank is at the same step.
            timed = step % self.loop.recipe.train.stop_sync_every == 0 and rt.all_reduce(
                torch.tensor(float(timed), device=rt.device), op="max").item() > 0
        due = (cc.every_steps and step % cc.every_steps == 0) or timed
        # A single process skips a save that its stop's own save follows at once; under DDP the stop is not agreed
        # yet at this point, and every rank must join the same saves.
        if due and batches_done < self.loop.inputs.num_batches and (rt.distributed or not self.control.stop.is_set()):
            self.control.checkpoint_now.clear()
            self.save(epoch, batches_done)

    def save_and_wait(self, epoch: int, batches_done: int) -> list[str]:
        """A checkpoint before the run ends on an error it cannot train past (an unreadable image)."""
        self.save(epoch, batches_done)
        return self.services.drain(time.time() + self.loop.recipe.checkpoint.stop_timeout_s)


def run_epochs(loop: Loop, checkpointer: Checkpointer, control: StopControl) -> Outcome:
    """The epoch loop. A stop during training ends it with a checkpoint at the step boundary; a stop during
    evaluation with the epoch-end state and the epoch's record, which the resumed run evaluates first."""
    pending, loop.progress.pending_eval = loop.progress.pending_eval, None
    if pending is not None:
        loop.say(f"evaluating epoch {pending['epoch'] + 1} first: a stop interrupted its evaluation")
        stopped = end_epoch(loop, checkpointer, pending, control)
        if stopped is not None:
            return stopped
    for epoch in range(loop.start_epoch, loop.recipe.train.epochs):
        first_batch = loop.start_batch if epoch == loop.start_epoch else 0
        record = train_epoch(loop, checkpointer, epoch, first_batch, control)
        if isinstance(record, Outcome):
            return record
        stopped = end_epoch(loop, checkpointer, record, control)
        if stopped is not None:
            return stopped
    return Outcome()


def train_epoch(loop: Loop, checkpointer: Checkpointer, epoch: int, first_batch: int,
                control: StopControl) -> dict | Outcome:
    """Train one epoch from `first_batch`; its record, or the Outcome of a stop (checkpoint submitted)."""
    recipe, rt, t, inputs, tc = loop.recipe, loop.rt, loop.t, loop.inputs, loop.recipe.train
    size = train_size_at(recipe.augment, epoch)
    if size != loop.loader_size:
        # Progressive resizing: new workers with the new crop size. This happens once per distinct size,
        # so restarting the persistent workers costs seconds in a run of hours.
        inputs.train_set.transform = train_transform(recipe.augment, size)
        loop.train_loader = make_loader(inputs.train_set, loop.train_sampler, tc.batch_size, drop_last=True,
                                        **loop.loader_args)
        if loop.loader_size is not None:
            loop.say(f"epoch {epoch + 1}: training resolution {loop.loader_size} -> {size} px")
        loop.loader_size = size
    loop.train_sampler.set_epoch(epoch, first_batch * inputs.samples_per_batch)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    epoch_start = time.time()
    with tqdm(total=inputs.num_batches, initial=first_batch, desc=f"epoch {epoch + 1}/{tc.epochs}",
              disable=not loop.show_bar, leave=False, dynamic_ncols=True) as bar:
        def log_step(record):
            loop.runlog.log(record)
            if not loop.show_bar:
                loop.say(f"epoch {epoch + 1} step {record['step']}/{inputs.updates_per_epoch} loss "
                         f"{record['loss']:.4f} lr {record['lr']:.4g} {record['img_per_s']:.0f} img/s "
                         f"data-wait {record['data_wait']:.0%}")
        try:
            stats = train_one_epoch(t, loop.train_loader, epoch, inputs.num_batches, log_step,
                                    bar if loop.show_bar else None, control.stop, first_batch,
                                    lambda done: checkpointer.after_step(epoch, done))
        except UnreadableImage as e:  # bad input met mid-run: keep the work done so far, then say what is wrong
            done = getattr(e, "batches_done", None)
            # Under DDP only this rank met the image, and a save is a collective that needs every rank.
            if done is not None and done > first_batch and done % tc.accum_steps == 0 and not rt.distributed:
                left = checkpointer.save_and_wait(epoch, done)
                log.error("checkpoint at step %d %s before stopping on an unreadable image", t.global_step,
                          "written" if not left else f"not complete ({', '.join(left)})")
            raise
    if stats["stopped"]:
        checkpointer.save(epoch, stats["batches"])
        return Outcome(True, (epoch, stats["batches"]), "training")
    return {"kind": "epoch", "epoch": epoch, "global_step": t.global_step, "train_loss": stats["train_loss"],
            "lr": t.optimizer.param_groups[0]["lr"], "train_size": stats["input_size"],
            "epoch_time_s": time.time() - epoch_start}


def end_epoch(loop: Loop, checkpointer: Checkpointer, record: dict, control: StopControl) -> Outcome | None:
    """Evaluate (when due), log, and checkpoint an epoch's end. The stop is agreed once here (one collective
    under DDP), so that a stop arriving at any point of the epoch end is either seen or left to the next step."""
    recipe, rt, p, epoch = loop.recipe, loop.rt, loop.progress, record["epoch"]
    last_epoch = epoch + 1 == recipe.train.epochs
    eval_start = time.time()
    if (epoch + 1) % recipe.train.eval_every == 0 or last_epoch:
        scores = evaluate_epoch(loop, control)
        if scores is None:  # evaluation changes no training state: the epoch-end state is the checkpoint
            checkpointer.save(epoch + 1, 0, pending_eval=record)
            return Outcome(True, (epoch + 1, 0), "evaluation")
        record.update(scores)
        score = max(record["top1"], record.get("ema_top1", -1.0))
        if p.best is None or score > p.best["top1"]:
            p.best = {"top1": score, "epoch": epoch, "weights": "ema" if score != record["top1"] else "raw"}
    record.update(epoch_time_s=record["epoch_time_s"] + time.time() - eval_start, bad_images=len(loop.t.bad_images),
                  peak_gpu_mem_gb=(torch.cuda.max_memory_allocated(rt.device) / 2**30
                                   if rt.device.type == "cuda" else None))
    loop.runlog.log(record)
    p.history.append(record)
    loop.runlog.plot()
    loop.say(_epoch_line(record, recipe.train.epochs))
    if checkpointer.services.budget is not None:  # on EC2 with train.budget_usd: rank 0 asks, the ranks agree below
        checkpointer.services.budget.check(control, last_epoch)
    stop = agreed_stop(rt, control.stop)
    if (epoch + 1) % recipe.checkpoint.every_epochs == 0 or last_epoch or stop:
        checkpointer.save(epoch + 1, 0, is_best=p.best is not None and p.best["epoch"] == epoch)
    if stop and not last_epoch:  # a stop after the last epoch changes nothing: the run finishes
        return Outcome(True, (epoch + 1, 0), "training")
    return None


def evaluate_epoch(loop: Loop, control: StopControl) -> dict | None:
    """Raw and EMA top-1/top-5 on val; None when a stop cut the evaluation short."""
    t, flip = loop.t, loop.recipe.augment.eval_flip
    if loop.rt.distributed and not loop.recipe.train.sync_bn:
        # Without SyncBN each rank's running statistics drift apart: average them (timm's --dist-bn reduce), so
        # that every shard is evaluated with one model.
        distribute_bn(t.model, loop.rt.world_size, reduce=True)
        if t.ema is not None:
            distribute_bn(t.ema.module, loop.rt.world_size, reduce=True)
    raw = evaluate(t.model, loop.val_loader, t.to_input, loop.rt, flip, control.stop, loop.val_batches)
    if raw is None:
        return None
    scores = {"top1": raw["top1"], "top5": raw["top5"], "val_loss": raw["loss"]}
    if t.ema is not None:
        ema = evaluate(t.ema.module, loop.val_loader, t.to_input, loop.rt, flip, control.stop, loop.val_batches)
        if ema is None:
            return None
        scores.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
    return scores


def stop_and_drain(loop: Loop, services: Services, outcome: Outcome, control: StopControl) -> list[str]:
    """After a stop: wait for its checkpoint on disk and in S3, until the deadline at most (the spot notice's,
    or `checkpoint.stop_timeout_s` from now); return what did not finish."""
    if not outcome.stopped:
        return []
    cc = loop.recipe.checkpoint
    started = time.time()
    deadline = control.stop_deadline(cc.stop_timeout_s)
    unfinished = services.drain(deadline)
    where = f"written and uploaded to {cc.remote}" if services.uploader is not None else "written"
    loop.say(f"stopped ({control.reason}): checkpoint at step {loop.t.global_step} {where} in "
             f"{time.time() - started:.1f} s of the {deadline - started:.0f} s left before the deadline"
             + (f"; not finished by then: {', '.join(unfinished)}" if unfinished else "")
             + (f"; the resumed run evaluates epoch {outcome.at[0]} first" if outcome.during == "evaluation" else ""))
    return unfinished


def finish(loop: Loop, services: Services, outcome: Outcome, unfinished: list[str], control: StopControl) -> dict:
    """The end, in this order: the summary; metrics and checkpoints synced to S3; then export and push, whose
    failure leaves the run complete and synced, is recorded in summary.json and exits 3 (not restarted)."""
    recipe, rt, t, p, cc = loop.recipe, loop.rt, loop.t, loop.progress, loop.recipe.checkpoint
    summary = make_summary(recipe, t, p.history, p.best, p.elapsed(), sum(q.numel() for q in t.model.parameters()),
                           len(loop.inputs.classes), outcome.stopped, rt)
    summary.update(during=outcome.during, run_id=loop.run.lineage["run_id"])
    if outcome.stopped and (control.reason or "").startswith(BUDGET_REASON):
        summary.update(over_budget=True, stop_reason=control.reason)
    deadline = control.stop_deadline(cc.stop_timeout_s) if control.stop.is_set() else time.time() + cc.upload_timeout_s
    publish = recipe.export.enabled and rt.is_main and not outcome.stopped
    if publish and control.stop.is_set():  # trained to the end, but the machine is going: the restart exports
        summary.update(stopped=True, during="finish")
        publish = False
    unfinished = unfinished + (services.drain(deadline) if not outcome.stopped else [])
    uploader = services.uploader

    def record(left):
        summary["unfinished"] = sorted(set(left))
        summary["failed_uploads"] = list(uploader.failed) if uploader is not None else []
        summary["exit_status"] = exit_status(summary)
        if rt.is_main:
            write_json(loop.run.out / "summary.json", summary)
    record(unfinished)
    unfinished += services.sync(deadline)  # the summary, metrics and curves follow the checkpoints
    if publish:
        summary.update(publish_run(loop))
        record(unfinished)
        unfinished += services.sync(deadline)  # the export, and the summary that says how it went
    record(unfinished)
    loop.runlog.summary(summary)
    loop.runlog.close()
    summary["exit_status"] = rt.broadcast(summary["exit_status"])  # every rank waits for rank 0's last sync
    if rt.distributed:
        import torch.distributed as dist
        dist.destroy_process_group()
    if summary["top1"] is not None and not summary["stopped"]:
        loop.say(f"val top-1 {summary['top1']:.4f}  top-5 {summary['top5']:.4f}  best top-1 "
                 f"{summary['best_top1']:.4f} (epoch {summary['best_epoch'] + 1}, {summary['best_weights']})  in "
                 f"{summary['wall_time_s']:.0f} s; run dir {loop.run.out}")
    return summary


def publish_run(loop: Loop) -> dict:
    """Export, then push when export.repo_id is set; an error is reported with the command that retries it."""
    from .hub import export, push  # here, so that training never needs huggingface_hub to start

    ec, out = loop.recipe.export, loop.run.out
    try:
        exported = export(out, out / "export", ec.weights, ec.label_names, ec.repo_id, ec.license, ec.dataset)
    except Exception as e:  # the run is done and synced; a failed export must not make it look unfinished
        log.error("export failed (%s: %s); the run is complete and synced. Retry with: resnet50-recipe export %s "
                  "%s", type(e).__name__, e, out, out / "export")
        return {"export_error": f"{type(e).__name__}: {e}"}
    loop.say(f"exported {exported} (timm.create_model('local-dir:{exported}', pretrained=True))")
    if not ec.repo_id:
        return {}
    try:
        push(exported, ec.repo_id, private=ec.private)
    except Exception as e:
        log.error("push to %s failed (%s: %s); the run is complete, synced and exported. Retry with: "
                  "resnet50-recipe push %s --repo-id %s%s", ec.repo_id, type(e).__name__, e, exported, ec.repo_id,
                  " --private" if ec.private else "")
        return {"push_error": f"{type(e).__name__}: {e}"}
    loop.say(f"pushed to https://huggingface.co/{ec.repo_id}")
    return {"pushed": ec.repo_id}


def make_summary(recipe: Recipe, t: Trainer, history: list[dict], best: dict | None, wall_time_s: float,
                 n_params: int, num_classes: int, stopped: bool, rt: Runtime) -> dict:
    evaluated = [r for r in history if "top1" in r]
    last = evaluated[-1] if evaluated else {}
    return {
        "recipe": recipe.name, "model": recipe.model.name, "epochs": len(history),
        "global_step": t.global_step, "stopped": stopped,
        "top1": last.get("top1"), "top5": last.get("top5"),
        "ema_top1": last.get("ema_top1"), "ema_top5": last.get("ema_top5"),
        "best_top1": best["top1"] if best else None, "best_epoch": best["epoch"] if best else None,
        "best_weights": best["weights"] if best else None,
        "wall_time_s": wall_time_s, "num_params": n_params, "num_classes": num_classes,
        "bad_images": sorted(set(t.bad_images)), "device": str(rt.device),
    }


def _epoch_line(r: dict, epochs: int) -> str:
    line = f"epoch {r['epoch'] + 1}/{epochs}: train loss {r['train_loss']:.4f}"
    if "top1" in r:
        line += f", val top-1 {r['top1']:.4f} top-5 {r['top5']:.4f}"
    if "ema_top1" in r:
        line += f", EMA top-1 {r['ema_top1']:.4f}"
    return line + f" ({r['epoch_time_s']:.1f} s)"


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
    ranks = ranks or [{"rng": ckpt.rng_state(), "norm_buffers": None}]
    return {
        "format": ckpt.FORMAT,
        "model": ckpt.cpu_copy(t.model.state_dict()),
        "ema": ckpt.cpu_copy(t.ema.module.state_dict()) if t.ema is not None else None,
        "optimizer": ckpt.cpu_copy(t.optimizer.state_dict()),
        "scheduler": ckpt.cpu_copy(t.scheduler.state_dict()),
        "scaler": t.scaler.state_dict(),
        "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": t.global_step,
        "global_batch": t.recipe.train.batch_size * t.rt.world_size * t.recipe.train.accum_steps,
        "loop": {"epoch_loss": ckpt.cpu_copy(t.epoch_loss), "window_loss": ckpt.cpu_copy(t.window_loss),
                 "window_steps": t.window_steps, "bad_images": list(t.bad_images)},
        "rng": [r["rng"] for r in ranks],
        "norm_buffers": [r["norm_buffers"] for r in ranks] if ranks[0]["norm_buffers"] is not None else None,
        "train_set": train_set,
        "best": progress.best, "best_checkpoint": progress.best_checkpoint,
        "metrics": [dict(r) for r in progress.history], "pending_eval": pending_eval,
        "elapsed_s": progress.elapsed(), "recipe": to_dict(t.recipe), "versions": versions(), "class_names": classes,
        "lineage": lineage or ckpt.new_lineage(),
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
            ckpt.load_norm_buffers(module, buffers)
    t.global_step = state["global_step"]
    t.scheduler.step_update(num_updates=t.global_step)  # the lr for the step about to run
    loop = state["loop"]
    t.epoch_loss.copy_(loop["epoch_loss"])
    t.window_loss.copy_(loop["window_loss"])
    t.window_steps, t.bad_images = loop["window_steps"], list(loop["bad_images"])


# ---------------------------------------------------------------------------------------------------------
# Evaluating a saved checkpoint


def evaluate_checkpoint(path: str | Path, data: str | Path | None = None, img_size: int | None = None,
                        crop_pct: float | None = None, batch_size: int | None = None, workers: int | None = None,
                        device: str = "auto", flip: bool | None = None) -> dict:
    """Top-1/top-5 of a checkpoint's raw (and EMA) weights on DIR/val, at the recipe's or the given size, with or
    without flip test-time augmentation (default: the recipe's augment.eval_flip)."""
    state = ckpt.load_state(path)
    overrides = [f"train.device={device}"] + ([f"data.path={data}"] if data else [])
    if data:
        overrides.append("data.synthetic=null")
    recipe = load_recipe(state["recipe"], overrides)
    rt = setup(recipe.train, recipe.seed)
    data_dir = resolve_data_dir(recipe.data)
    classes = class_names(data_dir)
    if classes != state["class_names"]:
        raise ValueError(f"{data_dir}: its classes differ from the {len(state['class_names'])} the checkpoint was "
                         f"trained on (first: {state['class_names'][:3]}, got {classes[:3]})")
    size = img_size or recipe.augment.eval_size
    pct = crop_pct or recipe.augment.crop_pct
    val_set = ImageFolderDataset(data_dir / "val", classes, eval_transform(recipe.augment, size, pct), recipe.seed,
                                 recipe.data.bad_images)
    loader = make_loader(val_set, EpochSampler(len(val_set), recipe.seed, shuffle=False), batch_size or
                         recipe.train.batch_size, workers if workers is not None else recipe.data.workers,
                         drop_last=False, pin_memory=recipe.data.pin_memory, seed=recipe.seed)
    model = prepare_model(recipe, rt, len(classes))
    to_input = make_to_input(recipe, rt.device)
    result = {"checkpoint": str(path), "data": str(data_dir), "img_size": size, "crop_pct": pct,
              "epoch": state["epoch"], "global_step": state["global_step"]}
    flip = recipe.augment.eval_flip if flip is None else flip
    result["flip"] = flip
    model.load_state_dict(state["model"])
    result["raw"] = evaluate(model, loader, to_input, rt, flip)
    if state.get("ema") is not None:
        model.load_state_dict(state["ema"])
        result["ema"] = evaluate(model, loader, to_input, rt, flip)
    return result
