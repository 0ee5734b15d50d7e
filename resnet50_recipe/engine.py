"""The training loop: `train()` builds everything from a recipe, then runs `train_one_epoch()` and
`evaluate()` epoch by epoch. It reads top to bottom in the order it runs.

Rules the step keeps (docs/DESIGN.md):
- no host-device synchronisation per step: losses accumulate on the device and are read every
  `log.every_steps` steps;
- batches arrive as uint8 and are normalised on the device;
- per-batch randomness (random erasing positions, Mixup/CutMix) is seeded by (seed, epoch, step), and the
  stop event is looked at only between steps.
"""
from __future__ import annotations

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
                   resolve_data_dir, seeded, train_transform)
from .recipe import Recipe, load_recipe, scaled_lr, to_dict
from .runlog import RunLog, prepare_run_dir
from .runtime import Runtime, setup, versions


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
    global_step: int = 0
    seen: int = 0  # training samples consumed by this process, for img/s
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


def prepare_model(recipe: Recipe, rt: Runtime, num_classes: int) -> torch.nn.Module:
    model = build_model(recipe.model, num_classes).to(rt.device)
    return model.to(memory_format=torch.channels_last) if recipe.train.channels_last else model


def build_trainer(recipe: Recipe, rt: Runtime, num_classes: int, updates_per_epoch: int) -> Trainer:
    tc = recipe.train
    model = prepare_model(recipe, rt, num_classes)
    ema = build_ema(recipe.ema, model)  # after the move, so the EMA copy lives on the device too
    global_batch = tc.batch_size * rt.world_size * tc.accum_steps
    optimizer = build_optimizer(recipe.optim, model, scaled_lr(recipe.optim, global_batch))
    scheduler = build_scheduler(recipe.sched, optimizer, tc.epochs, updates_per_epoch)
    mixup = build_mixup(recipe.mixup, recipe.loss, num_classes)
    aug = recipe.augment
    eraser = RandomErasing(aug.re_prob, mode=aug.re_mode, max_count=aug.re_count, device=rt.device) \
        if aug.re_prob > 0 else None
    return Trainer(
        recipe=recipe, rt=rt, model=model, forward=torch.compile(model) if tc.compile else model,
        optimizer=optimizer, scheduler=scheduler, scaler=torch.amp.GradScaler(rt.device.type, enabled=rt.use_scaler),
        criterion=build_loss(recipe.loss, mixup is not None).to(rt.device), mixup=mixup, eraser=eraser, ema=ema,
        to_input=make_to_input(recipe, rt.device))


# ---------------------------------------------------------------------------------------------------------
# One epoch


def train_one_epoch(t: Trainer, batches: Iterable, epoch: int, num_batches: int, log, progress=None,
                    stop: threading.Event | None = None) -> dict:
    """Run `num_batches` micro-batches (a whole number of optimizer steps); return the epoch's train stats.

    `log(record)` receives a step record every `log.every_steps` optimizer steps.
    """
    tc, seed = t.recipe.train, t.recipe.seed
    t.model.train()
    epoch_loss = torch.zeros((), device=t.rt.device)  # summed per log window, read once at the end
    window_loss = torch.zeros((), device=t.rt.device)
    window_steps, window_seen, window_wait = 0, 0, 0.0
    window_start = time.perf_counter()
    batch_iter: Iterator = iter(batches)
    batch_idx = 0
    for batch_idx in range(num_batches):
        wait_start = time.perf_counter()
        images, targets, bad = next(batch_iter)
        window_wait += time.perf_counter() - wait_start
        if bad:
            t.bad_images += bad
        images = t.to_input(images)
        targets = targets.to(t.rt.device, non_blocking=True)
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
        window_loss += loss.detach()
        window_seen += images.shape[0]
        t.seen += images.shape[0]

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
        window_steps += 1

        if window_steps == t.recipe.log.every_steps or batch_idx + 1 == num_batches:
            elapsed = time.perf_counter() - window_start
            record = {"kind": "step", "epoch": epoch, "step": (batch_idx + 1) // tc.accum_steps,
                      "global_step": t.global_step,
                      "loss": window_loss.item() / (window_steps * tc.accum_steps),  # the only sync point
                      "lr": t.optimizer.param_groups[0]["lr"],
                      "img_per_s": window_seen * t.rt.world_size / elapsed,
                      "data_wait": window_wait / elapsed}
            log(record)
            epoch_loss += window_loss
            if progress is not None:
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.3g}",
                                     img_s=f"{record['img_per_s']:.0f}", refresh=False)
            window_loss.zero_()
            window_steps, window_seen, window_wait = 0, 0, 0.0
            window_start = time.perf_counter()
        if progress is not None:
            progress.update(tc.accum_steps)
        if stop is not None and stop.is_set():
            break
    epoch_loss += window_loss  # a stop request can end the epoch mid-window
    done = batch_idx + 1
    return {"train_loss": epoch_loss.item() / max(1, done), "batches": done,
            "stopped": stop is not None and stop.is_set()}


# ---------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, to_input, rt: Runtime) -> dict:
    """Top-1/top-5 accuracy (fractions) and mean cross-entropy over every sample in `batches`."""
    model.eval()
    correct1 = torch.zeros((), dtype=torch.int64, device=rt.device)
    correct5 = torch.zeros((), dtype=torch.int64, device=rt.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    count = 0
    for images, targets, _ in batches:
        targets = targets.to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = model(to_input(images))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=1).sum()
        loss_sum += torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").double()
        count += targets.shape[0]
    if count == 0:
        raise ValueError("evaluation saw no samples")
    return {"top1": correct1.item() / count, "top5": correct5.item() / count, "loss": loss_sum.item() / count,
            "count": count}


# ---------------------------------------------------------------------------------------------------------
# The whole run


def train(recipe: Recipe, output: str | Path | None = None, *, quiet: bool = False, overwrite: bool = False,
          stop: threading.Event | None = None) -> dict:
    """Train `recipe`, writing the run directory `output` (default runs/<recipe name>); return the summary.

    This is exactly what `resnet50-recipe train` runs.
    """
    wall_start = time.time()
    tc = recipe.train
    rt = setup(tc, recipe.seed)
    out = Path(output or Path("runs") / recipe.name)
    if rt.is_main:
        prepare_run_dir(out, overwrite)
    runlog = RunLog(out, enabled=rt.is_main)
    say = (lambda *a: None) if quiet or not rt.is_main else (lambda msg: print(msg, flush=True))

    # Data: ImageFolder train/ and val/, uint8 batches, order a pure function of (seed, epoch).
    data_dir = resolve_data_dir(recipe.data)
    classes = class_names(data_dir)
    train_set = ImageFolderDataset(data_dir / "train", classes, train_transform(recipe.augment), recipe.seed,
                                   recipe.data.bad_images)
    val_set = ImageFolderDataset(data_dir / "val", classes, eval_transform(recipe.augment), recipe.seed,
                                 recipe.data.bad_images)
    train_sampler = EpochSampler(len(train_set), recipe.seed, shuffle=True, rank=rt.rank,
                                 world_size=rt.world_size, aug_repeats=recipe.data.aug_repeats)
    val_sampler = EpochSampler(len(val_set), recipe.seed, shuffle=False, rank=rt.rank, world_size=rt.world_size)
    loader_args = dict(workers=recipe.data.workers, pin_memory=recipe.data.pin_memory, seed=recipe.seed)
    train_loader = make_loader(train_set, train_sampler, tc.batch_size, drop_last=True, **loader_args)
    val_loader = make_loader(val_set, val_sampler, tc.batch_size, drop_last=False, **loader_args)
    num_batches = len(train_loader) if tc.steps_per_epoch is None else min(len(train_loader),
                                                                              tc.steps_per_epoch * tc.accum_steps)
    num_batches -= num_batches % tc.accum_steps
    if num_batches == 0:
        raise ValueError(f"{data_dir / 'train'}: {len(train_set)} images give no full optimizer step at "
                         f"train.batch_size={tc.batch_size} x accum_steps={tc.accum_steps}; lower the batch size")
    updates_per_epoch = num_batches // tc.accum_steps

    t = build_trainer(recipe, rt, len(classes), updates_per_epoch)
    global_batch = tc.batch_size * rt.world_size * tc.accum_steps
    runlog.start(recipe)
    n_params = sum(p.numel() for p in t.model.parameters())
    say(f"{recipe.name}: {recipe.model.name} ({n_params / 1e6:.1f}M params), {len(classes)} classes, "
        f"{len(train_set)} train / {len(val_set)} val images from {data_dir}; {rt.device}, "
        f"amp={str(rt.amp_dtype).replace('torch.', '') if rt.amp_dtype else 'off'}, "
        f"peak lr {scaled_lr(recipe.optim, global_batch):.4g} at global batch {global_batch}; run dir {out}")

    best: dict | None = None
    history: list[dict] = []
    last_eval: dict = {}
    epoch = 0
    stopped = False
    show_bar = not quiet and rt.is_main and sys.stderr.isatty()
    for epoch in range(tc.epochs):
        epoch_start = time.time()
        train_sampler.set_epoch(epoch)
        if rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(rt.device)
        with tqdm(total=num_batches, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not show_bar,
                  leave=False, dynamic_ncols=True) as bar:
            def log_step(record, epoch=epoch):
                runlog.log(record)
                if not show_bar:
                    say(f"epoch {epoch + 1} step {record['step']}/{updates_per_epoch} loss {record['loss']:.4f} "
                        f"lr {record['lr']:.4g} {record['img_per_s']:.0f} img/s "
                        f"data-wait {record['data_wait']:.0%}")
            stats = train_one_epoch(t, train_loader, epoch, num_batches, log_step, bar if show_bar else None, stop)
        stopped = stats["stopped"]
        if stopped:
            break

        record = {"kind": "epoch", "epoch": epoch, "global_step": t.global_step, "train_loss": stats["train_loss"],
                  "lr": t.optimizer.param_groups[0]["lr"]}
        last_epoch = epoch + 1 == tc.epochs
        if (epoch + 1) % tc.eval_every == 0 or last_epoch:
            last_eval = {"raw": evaluate(t.model, val_loader, t.to_input, rt)}
            if t.ema is not None:
                last_eval["ema"] = evaluate(t.ema.module, val_loader, t.to_input, rt)
            record.update(top1=last_eval["raw"]["top1"], top5=last_eval["raw"]["top5"],
                          val_loss=last_eval["raw"]["loss"])
            if "ema" in last_eval:
                record.update(ema_top1=last_eval["ema"]["top1"], ema_top5=last_eval["ema"]["top5"])
            score = max(record["top1"], record.get("ema_top1", -1.0))
            if best is None or score > best["top1"]:
                best = {"top1": score, "epoch": epoch, "weights": "ema" if score != record["top1"] else "raw",
                        "file": None}
        record.update(epoch_time_s=time.time() - epoch_start, bad_images=len(t.bad_images),
                      peak_gpu_mem_gb=(torch.cuda.max_memory_allocated(rt.device) / 2**30
                                       if rt.device.type == "cuda" else None))
        runlog.log(record)
        history.append(record)
        runlog.plot()
        say(_epoch_line(record, tc.epochs))

        if (epoch + 1) % recipe.checkpoint.every_epochs == 0 or last_epoch:
            is_best = best is not None and best["epoch"] == epoch
            entry = save_checkpoint(t, out, epoch + 1, 0, best, history, time.time() - wall_start, classes,
                                    rt, is_best)
            if is_best and entry:
                best["file"] = entry["file"]

    summary = {
        "recipe": recipe.name, "model": recipe.model.name, "epochs": epoch + (0 if stopped else 1),
        "global_step": t.global_step, "stopped": stopped,
        "top1": last_eval.get("raw", {}).get("top1"), "top5": last_eval.get("raw", {}).get("top5"),
        "ema_top1": last_eval.get("ema", {}).get("top1"), "ema_top5": last_eval.get("ema", {}).get("top5"),
        "best_top1": best["top1"] if best else None, "best_epoch": best["epoch"] if best else None,
        "best_weights": best["weights"] if best else None,
        "wall_time_s": time.time() - wall_start, "num_params": n_params, "num_classes": len(classes),
        "bad_images": sorted(set(t.bad_images)), "device": str(rt.device),
    }
    if stopped:
        save_checkpoint(t, out, epoch, stats["batches"] * tc.batch_size * rt.world_size, best, history,
                        summary["wall_time_s"], classes, rt, False)
    runlog.summary(summary)
    if summary["top1"] is not None:
        say(f"val top-1 {summary['top1']:.4f}  top-5 {summary['top5']:.4f}  best top-1 {summary['best_top1']:.4f} "
            f"(epoch {summary['best_epoch'] + 1}, {summary['best_weights']})  in {summary['wall_time_s']:.0f} s; "
            f"run dir {out}")
    return summary


def _epoch_line(r: dict, epochs: int) -> str:
    line = f"epoch {r['epoch'] + 1}/{epochs}: train loss {r['train_loss']:.4f}"
    if "top1" in r:
        line += f", val top-1 {r['top1']:.4f} top-5 {r['top5']:.4f}"
    if "ema_top1" in r:
        line += f", EMA top-1 {r['ema_top1']:.4f}"
    return line + f" ({r['epoch_time_s']:.1f} s)"


def save_checkpoint(t: Trainer, out: Path, epoch: int, step_in_epoch: int, best: dict | None, history: list,
                    elapsed_s: float, classes: list[str], rt: Runtime, is_best: bool) -> dict | None:
    """Capture the whole training state (docs/DESIGN.md, section 3) and write it atomically; rank 0 only.

    `epoch` is the epoch to run next and `step_in_epoch` the samples of it already consumed.
    """
    if not rt.is_main:
        return None
    state = {
        "format": ckpt.FORMAT,
        "model": ckpt.cpu_copy(t.model.state_dict()),
        "ema": ckpt.cpu_copy(t.ema.module.state_dict()) if t.ema is not None else None,
        "optimizer": ckpt.cpu_copy(t.optimizer.state_dict()),
        "scheduler": ckpt.cpu_copy(t.scheduler.state_dict()),
        "scaler": t.scaler.state_dict(),
        "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": t.global_step,
        "rng": ckpt.rng_state(),
        "best": best, "metrics": history, "elapsed_s": elapsed_s,
        "recipe": to_dict(t.recipe), "versions": versions(), "class_names": classes,
    }
    folder = out / "checkpoints"
    entry = ckpt.save_atomic(state, folder / ckpt.checkpoint_name(t.global_step))
    best_file = entry["file"] if is_best else (best or {}).get("file")
    ckpt.write_manifest(folder, entry, {**best, "file": best_file} if best else None)
    keep = {entry["file"]} | ({best_file} if best_file and t.recipe.checkpoint.keep_best else set())
    ckpt.prune(folder, t.recipe.checkpoint.keep_last, keep)
    return entry


# ---------------------------------------------------------------------------------------------------------
# Evaluating a saved checkpoint


def evaluate_checkpoint(path: str | Path, data: str | Path | None = None, img_size: int | None = None,
                        crop_pct: float | None = None, batch_size: int | None = None, workers: int | None = None,
                        device: str = "auto") -> dict:
    """Top-1/top-5 of a checkpoint's raw (and EMA) weights on DIR/val, at the recipe's or the given size."""
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
    model.load_state_dict(state["model"])
    result["raw"] = evaluate(model, loader, to_input, rt)
    if state.get("ema") is not None:
        model.load_state_dict(state["ema"])
        result["ema"] = evaluate(model, loader, to_input, rt)
    return result
