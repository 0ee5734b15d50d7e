"""The training loop: `train()` builds everything from a recipe, then runs `train_one_epoch()` and
`evaluate()` epoch by epoch. It reads top to bottom in the order it runs.

Rules the step keeps (docs/DESIGN.md):
- no host-device synchronisation per step: losses accumulate on the device and are read every
  `log.every_steps` steps;
- batches arrive as uint8 and are normalised on the device; on CUDA the next batch is copied (pinned,
  non_blocking) and normalised on a side stream while the current step computes;
- per-batch randomness (random erasing positions, Mixup/CutMix) is seeded by (seed, epoch, step), and the
  stop event is looked at only between steps.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from timm.data.random_erasing import RandomErasing
from timm.utils import dispatch_clip_grad
from tqdm import tqdm

from . import checkpoint as ckpt
from .build import build_ema, build_loss, build_mixup, build_model, build_optimizer, build_scheduler
from .data import (EpochSampler, ImageFolderDataset, class_names, eval_transform, make_loader, mix_seed,
                   resolve_data_dir, seeded, train_size_at, train_transform)
from .recipe import Recipe, RecipeError, load_recipe, recipe_diff, scaled_lr, to_dict
from .runlog import RunLog, prepare_run_dir
from .runtime import Runtime, setup, versions
from .spot import StopControl, install_signal_handlers, restore_signal_handlers, start_spot_watcher

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
        images, targets, bad = next(batch_iter)
        window_wait += time.perf_counter() - wait_start
        if bad:
            t.bad_images += bad
        input_size = images.shape[-1]
        if t.eraser is not None or t.mixup is not None:
            with seeded(mix_seed(seed, epoch, batch_idx, 1)):
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
        if t.recipe.optim.clip_grad is not None:
            t.scaler.unscale_(t.optimizer)  # clip the true gradients, not the fp16-scaled ones
            dispatch_clip_grad(t.model.parameters(), t.recipe.optim.clip_grad, mode=t.recipe.optim.clip_mode)
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.global_step += 1
        if t.ema is not None and t.global_step % t.recipe.ema.every == 0:
            t.ema.update(t.model, step=t.global_step // t.recipe.ema.every)
        t.scheduler.step_update(num_updates=t.global_step)
        t.window_steps += 1

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
def evaluate(model: torch.nn.Module, batches: Iterable, to_input, rt: Runtime, flip: bool = False) -> dict:
    """Top-1/top-5 accuracy (fractions) and mean cross-entropy over every sample in `batches`.

    `flip`: test-time augmentation with the horizontal mirror; the two logits are averaged (FFCV's lr_tta).
    """
    model.eval()
    correct1 = torch.zeros((), dtype=torch.int64, device=rt.device)
    correct5 = torch.zeros((), dtype=torch.int64, device=rt.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    count = 0
    for images, targets, _ in device_batches(batches, to_input, rt.device):
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
# The whole run


def train(recipe: Recipe, output: str | Path | None = None, *, quiet: bool = False, resume: str = "auto",
          force: bool = False, allow_recipe_change: bool = False, control: StopControl | None = None) -> dict:
    """Train `recipe` in the run directory `output` (default runs/<recipe name>); return the summary.

    `resume`: "auto" continues from the newest valid checkpoint in `output` when there is one, "never"
    starts fresh (refusing to replace checkpoints unless `force`), or a checkpoint path. A stop request
    (SIGTERM, SIGINT, SIGUSR1, the EC2 spot notice, or `control`) ends the run after the current step with a
    checkpoint and `summary["stopped"]` set. This is exactly what `resnet50-recipe train` runs.
    """
    wall_start = time.time()
    tc = recipe.train
    rt = setup(tc, recipe.seed)
    out = Path(output or Path("runs") / recipe.name)
    folder = out / "checkpoints"
    control = control or StopControl()
    say = (lambda *a: None) if quiet or not rt.is_main else (lambda msg: print(msg, flush=True))

    cc = recipe.checkpoint
    store = None
    if cc.remote:
        from .storage import S3Store, fetch_latest, pull_files

        store = S3Store(cc.remote, cc.endpoint_url, cc.checksum)
        if rt.is_main:
            store.preflight()  # a wrong bucket or a missing permission fails here, before any work

    # Where to start: a checkpoint to resume from, or a clean run directory.
    state = None
    if resume == "auto":
        if store is not None and rt.is_main:
            # On a fresh machine (or when the bucket is ahead of the disk) the newest valid checkpoint wins.
            found = ckpt.find_latest(folder)
            if fetch_latest(store, folder, found[1]["global_step"] if found else -1, cc.keep_last):
                out.mkdir(parents=True, exist_ok=True)
                pull_files(store, out)
        rt.barrier()  # every rank loads the same checkpoint, after rank 0 has fetched it
        found = ckpt.find_latest(folder)
        if found is None and any(folder.glob("ckpt-*.pt")):
            raise ValueError(f"{folder}: holds checkpoints but none passes its size and hash check; move them "
                             "away, or pass --no-resume --force to start over")
        if found is not None:
            resume_path, state = found
    elif resume != "never":
        resume_path, state = Path(resume), ckpt.load_state(resume)
    diff = recipe_diff(state["recipe"], to_dict(recipe)) if state is not None else []
    if state is not None:
        if diff and not allow_recipe_change:
            raise RecipeError(f"{resume_path}: the recipe differs from the checkpoint's in keys that change the "
                              "result:\n  " + "\n  ".join(diff) + "\npass --allow-recipe-change to resume anyway, "
                              "or --output DIR for a new run")
    elif rt.is_main:
        prepare_run_dir(out, force)
    rt.barrier()
    out.mkdir(parents=True, exist_ok=True)
    runlog = RunLog(out, enabled=rt.is_main)

    # Data: ImageFolder train/ and val/, uint8 batches, order a pure function of (seed, epoch).
    data_dir = resolve_data_dir(recipe.data)
    classes = class_names(data_dir)
    # The transform is set per epoch with the loader below (progressive resizing); epoch 0's size until then, which
    # is what the sample images of a fresh run show.
    train_set = ImageFolderDataset(data_dir / "train", classes, train_transform(recipe.augment,
                                   train_size_at(recipe.augment, 0)), recipe.seed, recipe.data.bad_images)
    val_set = ImageFolderDataset(data_dir / "val", classes, eval_transform(recipe.augment), recipe.seed,
                                 recipe.data.bad_images)
    if state is not None and state["class_names"] != classes:
        raise ValueError(f"{data_dir}: its classes differ from the {len(state['class_names'])} the checkpoint "
                         f"{resume_path} was trained on")
    train_sampler = EpochSampler(len(train_set), recipe.seed, shuffle=True, rank=rt.rank,
                                 world_size=rt.world_size, aug_repeats=recipe.data.aug_repeats)
    val_sampler = EpochSampler(len(val_set), recipe.seed, shuffle=False, rank=rt.rank, world_size=rt.world_size)
    loader_args = dict(workers=recipe.data.workers, pin_memory=recipe.data.pin_memory, seed=recipe.seed)
    train_loader, loader_size = None, None  # made per training resolution, in the epoch loop
    val_loader = make_loader(val_set, val_sampler, tc.batch_size, drop_last=False, **loader_args)
    full_batches = len(train_set) // (tc.batch_size * rt.world_size)
    num_batches = full_batches if tc.steps_per_epoch is None else min(full_batches,
                                                                        tc.steps_per_epoch * tc.accum_steps)
    num_batches -= num_batches % tc.accum_steps
    if num_batches == 0:
        raise ValueError(f"{data_dir / 'train'}: {len(train_set)} images give no full optimizer step at "
                         f"train.batch_size={tc.batch_size} x accum_steps={tc.accum_steps}; lower the batch size")
    updates_per_epoch = num_batches // tc.accum_steps
    samples_per_batch = tc.batch_size * rt.world_size

    global_batch = samples_per_batch * tc.accum_steps
    if state is not None and state.get("global_batch", global_batch) != global_batch and not allow_recipe_change:
        raise RecipeError(f"{resume_path}: the global batch was {state['global_batch']} images per step and is "
                          f"now {global_batch} (batch_size {tc.batch_size} x {rt.world_size} processes x "
                          f"accum_steps {tc.accum_steps}); match it, or pass --allow-recipe-change")
    t = build_trainer(recipe, rt, len(classes), updates_per_epoch)
    n_params = sum(p.numel() for p in t.model.parameters())
    history: list[dict] = []
    best: dict | None = None  # best evaluated epoch
    best_checkpoint: dict | None = None  # best epoch that has a checkpoint, kept by retention
    start_epoch, start_batch, elapsed_before = 0, 0, 0.0
    if state is not None:
        # After an allowed recipe change (more epochs, say) the schedule follows the new recipe from here on.
        restore(t, state, scheduler=not diff)
        history, best, best_checkpoint = state["metrics"], state["best"], state["best_checkpoint"]
        start_epoch, elapsed_before = state["epoch"], state["elapsed_s"]
        start_batch = state["step_in_epoch"] // samples_per_batch
        runlog.resume(t.global_step, history)
        say(f"resuming from {resume_path}: epoch {start_epoch + 1}, batch {start_batch} of {num_batches}, "
            f"step {t.global_step}")
    runlog.start(recipe, {"epochs": tc.epochs, "steps_per_epoch": updates_per_epoch, "global_batch": global_batch,
                          "world_size": rt.world_size, "train_images": len(train_set), "device": str(rt.device)})
    if state is None:
        runlog.sample_images(train_set)
    say(f"{recipe.name}: {recipe.model.name} ({n_params / 1e6:.1f}M params), {len(classes)} classes, "
        f"{len(train_set)} train / {len(val_set)} val images from {data_dir}; {rt.device}, "
        f"amp={str(rt.amp_dtype).replace('torch.', '') if rt.amp_dtype else 'off'}, "
        f"peak lr {scaled_lr(recipe.optim, global_batch):.4g} at global batch {global_batch}; run dir {out}")

    uploader = None
    if store is not None and rt.is_main:
        from .storage import Uploader

        uploader = Uploader(store, out, cc.keep_last, cc.keep_best)
    writer = ckpt.Writer(folder, cc.keep_last, cc.keep_best, uploader.submit if uploader else None) \
        if rt.is_main else None
    last_save = time.monotonic()

    def save(epoch: int, batches_done: int) -> None:
        """Snapshot the state into CPU memory now; the writer thread puts it on disk."""
        nonlocal last_save
        last_save = time.monotonic()
        if writer is not None:
            writer.submit(snapshot(t, epoch, batches_done * samples_per_batch, best, best_checkpoint, history,
                                   elapsed_before + time.time() - wall_start, classes))

    def mid_epoch_save(epoch: int, batches_done: int) -> None:
        due = ((cc.every_steps and t.global_step % cc.every_steps == 0)
               or (cc.every_minutes and time.monotonic() - last_save >= cc.every_minutes * 60)
               or control.checkpoint_now.is_set())
        if due and batches_done < num_batches and not control.stop.is_set():
            control.checkpoint_now.clear()
            save(epoch, batches_done)

    previous_handlers = install_signal_handlers(control)
    watcher = start_spot_watcher(control, cc.spot_notice, cc.imds_endpoint, cc.spot_poll_s) if rt.is_main else None
    if watcher is not None:  # on EC2: every metrics line also says what the instance costs (aws.InstanceCost)
        from .aws import InstanceCost
        runlog.extra = InstanceCost(watcher, out / "metrics.jsonl")
    if state is not None:
        ckpt.set_rng_state(state["rng"])  # last, after everything that drew from the RNGs while being built
    show_bar = not quiet and rt.is_main and sys.stderr.isatty()
    stopped_at: tuple[int, int] | None = None
    try:
        for epoch in range(start_epoch, tc.epochs):
            epoch_start = time.time()
            size = train_size_at(recipe.augment, epoch)
            if size != loader_size:
                # Progressive resizing: new workers with the new crop size. This happens once per distinct size,
                # so restarting the persistent workers costs seconds in a run of hours.
                train_set.transform = train_transform(recipe.augment, size)
                train_loader = make_loader(train_set, train_sampler, tc.batch_size, drop_last=True, **loader_args)
                if loader_size is not None:
                    say(f"epoch {epoch + 1}: training resolution {loader_size} -> {size} px")
                loader_size = size
            first_batch = start_batch if epoch == start_epoch else 0
            train_sampler.set_epoch(epoch, first_batch * samples_per_batch)
            if rt.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(rt.device)
            with tqdm(total=num_batches, initial=first_batch, desc=f"epoch {epoch + 1}/{tc.epochs}",
                      disable=not show_bar, leave=False, dynamic_ncols=True) as bar:
                def log_step(record, epoch=epoch):
                    runlog.log(record)
                    if not show_bar:
                        say(f"epoch {epoch + 1} step {record['step']}/{updates_per_epoch} loss {record['loss']:.4f} "
                            f"lr {record['lr']:.4g} {record['img_per_s']:.0f} img/s "
                            f"data-wait {record['data_wait']:.0%}")
                stats = train_one_epoch(t, train_loader, epoch, num_batches, log_step, bar if show_bar else None,
                                        control.stop, first_batch, lambda done, e=epoch: mid_epoch_save(e, done))
            if stats["stopped"]:
                stopped_at = (epoch, stats["batches"])
                break

            record = {"kind": "epoch", "epoch": epoch, "global_step": t.global_step,
                      "train_loss": stats["train_loss"], "lr": t.optimizer.param_groups[0]["lr"],
                      "train_size": stats["input_size"]}
            last_epoch = epoch + 1 == tc.epochs
            if (epoch + 1) % tc.eval_every == 0 or last_epoch:
                flip = recipe.augment.eval_flip
                raw = evaluate(t.model, val_loader, t.to_input, rt, flip)
                record.update(top1=raw["top1"], top5=raw["top5"], val_loss=raw["loss"])
                if t.ema is not None:
                    ema = evaluate(t.ema.module, val_loader, t.to_input, rt, flip)
                    record.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
                score = max(record["top1"], record.get("ema_top1", -1.0))
                if best is None or score > best["top1"]:
                    best = {"top1": score, "epoch": epoch, "weights": "ema" if score != record["top1"] else "raw"}
            record.update(epoch_time_s=time.time() - epoch_start, bad_images=len(t.bad_images),
                          peak_gpu_mem_gb=(torch.cuda.max_memory_allocated(rt.device) / 2**30
                                           if rt.device.type == "cuda" else None))
            runlog.log(record)
            history.append(record)
            runlog.plot()
            say(_epoch_line(record, tc.epochs))

            if (epoch + 1) % cc.every_epochs == 0 or last_epoch or agreed_stop(rt, control.stop):
                if best is not None and best["epoch"] == epoch:
                    best_checkpoint = {**best, "file": ckpt.checkpoint_name(t.global_step)}
                save(epoch + 1, 0)
            if agreed_stop(rt, control.stop) and not last_epoch:  # a stop after the last epoch changes nothing
                stopped_at = (epoch + 1, 0)
                break
        if stopped_at is not None:
            if stopped_at[1] > 0:  # mid-epoch; an epoch-end stop was saved above
                save(*stopped_at)
            started = time.time()
            deadline = control.deadline - time.time() if control.deadline else None
            on_time = writer is None or writer.drain(deadline)
            took = time.time() - started
            if uploader is not None and on_time:
                on_time = uploader.drain(None if deadline is None else deadline - (time.time() - started))
            took = time.time() - started
            where = f"written and uploaded to {cc.remote}" if uploader is not None else "written"
            say(f"stopped ({control.reason}): checkpoint at step {t.global_step} {where} in {took:.1f} s"
                + (f" of the {deadline:.0f} s left before the deadline" if deadline is not None else "")
                + ("" if on_time else "; the deadline passed before it was complete"))
        if writer is not None:
            writer.drain()
        if uploader is not None and not uploader.drain(upload_wait(cc.upload_timeout_s, control)):
            log.warning("uploads to %s did not finish in time", cc.remote)
    finally:
        restore_signal_handlers(previous_handlers)
        if watcher is not None:
            watcher.halt()

    summary = make_summary(recipe, t, history, best, elapsed_before + time.time() - wall_start, n_params,
                           len(classes), stopped_at is not None, rt)
    if uploader is not None:
        summary["failed_uploads"] = list(uploader.failed) + ([uploader.pending] if uploader.pending else [])
    runlog.summary(summary)
    runlog.close()
    ec = recipe.export
    if ec.enabled and rt.is_main and not summary["stopped"]:
        from .hub import export, push  # here, so that training never needs huggingface_hub to start

        exported = export(out, out / "export", ec.weights, ec.label_names, ec.repo_id, ec.license, ec.dataset)
        say(f"exported {exported} (timm.create_model('local-dir:{exported}', pretrained=True))")
        if ec.repo_id:
            push(exported, ec.repo_id, private=ec.private)
            say(f"pushed to https://huggingface.co/{ec.repo_id}")
    if rt.distributed:
        import torch.distributed as dist
        dist.destroy_process_group()
    if uploader is not None:  # the summary, metrics, curves and export follow the checkpoints to the bucket
        uploader.sync_files()
        if not uploader.drain(upload_wait(cc.upload_timeout_s, control)):
            log.warning("syncing the run's files to %s did not finish in time", cc.remote)
        uploader.close()
    if summary["top1"] is not None and not summary["stopped"]:
        say(f"val top-1 {summary['top1']:.4f}  top-5 {summary['top5']:.4f}  best top-1 {summary['best_top1']:.4f} "
            f"(epoch {summary['best_epoch'] + 1}, {summary['best_weights']})  in {summary['wall_time_s']:.0f} s; "
            f"run dir {out}")
    return summary


def upload_wait(timeout_s: float, control: StopControl) -> float:
    """How long to wait for uploads: the configured limit, or what is left of a spot notice's deadline."""
    if control.deadline is None:
        return timeout_s
    return max(0.0, min(timeout_s, control.deadline - time.time()))


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


def snapshot(t: Trainer, epoch: int, step_in_epoch: int, best: dict | None, best_checkpoint: dict | None,
             history: list, elapsed_s: float, classes: list[str]) -> dict:
    """The whole training state (docs/DESIGN.md, section 3) as CPU copies, taken at a step boundary.

    `epoch` is the epoch to run next and `step_in_epoch` the samples of it already consumed, counted in the
    global sample order so that the position survives a change of process count.
    """
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
        "rng": ckpt.rng_state(),
        "best": best, "best_checkpoint": best_checkpoint, "metrics": [dict(r) for r in history],
        "elapsed_s": elapsed_s, "recipe": to_dict(t.recipe), "versions": versions(), "class_names": classes,
    }


def restore(t: Trainer, state: dict, scheduler: bool = True) -> None:
    """Load a snapshot into a freshly built trainer (the RNG states are restored separately, last)."""
    t.model.load_state_dict(state["model"])
    if t.ema is not None and state["ema"] is not None:
        t.ema.module.load_state_dict(state["ema"])
    t.optimizer.load_state_dict(state["optimizer"])
    if scheduler:
        t.scheduler.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
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
