"""`resnet50-recipe bench step`: the trainer's training step against a bare PyTorch loop doing the same work.

Both sides get the same synthetic uint8 batches, already on the device (no decoding, no transfer), and do:
normalise on the device, forward (under autocast with AMP), cross-entropy, backward (through a GradScaler with
fp16), and a Nesterov SGD step with the same fused/foreach choice. The trainer's side is `train.step.train_steps`
itself, so it also pays for what it does every step: the scheduler update, on-device loss accumulation, the step
timing and the stop check. Trials alternate between the sides and alternate who goes first, so that drift in
the machine's speed favours neither; the result is the median of each side and their ratio.
"""

from __future__ import annotations

import statistics
import time

import timm
import torch

from resnet50_recipe.recipe import load_recipe
from resnet50_recipe.trainer.components import build_optimizer
from resnet50_recipe.trainer.runtime import setup
from resnet50_recipe.trainer.step import build_trainer, train_steps

__all__ = ["bench_step", "time_sides"]


def bench_step(model: str = "resnet50", img_size: int = 224, batch_size: int = 128, amp: bool = True,
               channels_last: bool = True, compile: bool = False, device: str = "auto", steps: int = 20,
               warmup: int = 5, trials: int = 7, classes: int = 1000) -> dict:
    """Images/s of our step and of the bare loop (medians over `trials` of `steps` optimizer steps each)."""
    recipe = load_recipe({
        "name": "bench-step", "model": {"name": model},
        "augment": {"train_size": img_size, "color_jitter": None},
        "loss": {"label_smoothing": 0.0}, "ema": {"enabled": False},
        "optim": {"opt": "nesterov", "lr": 0.01, "weight_decay": 0.0},
        "sched": {"warmup_epochs": 0},
        "train": {"batch_size": batch_size, "amp": amp, "channels_last": channels_last, "compile": compile,
                  "device": device, "epochs": 1},
        "log": {"every_steps": steps}})
    rt = setup(recipe.train, recipe.seed)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (batch_size, 3, img_size, img_size), dtype=torch.uint8,
                              generator=generator).to(rt.device),
                torch.randint(0, classes, (batch_size,), generator=generator).to(rt.device), [])
               for _ in range(2)]

    def feed(n: int):
        return (batches[i % 2] for i in range(n))

    trainer = build_trainer(recipe, rt, classes, updates_per_epoch=steps)

    # The bare loop: what one writes by hand around the same timm model, optimizer and mixed precision.
    torch.manual_seed(recipe.seed)
    net = timm.create_model(model, num_classes=classes).to(rt.device, memory_format=memory_format)
    forward = torch.compile(net, dynamic=False) if compile else net
    optimizer = build_optimizer(recipe.optim, net, 0.01, rt.device)  # the same torch class and kernel choice
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.use_scaler)
    criterion = torch.nn.CrossEntropyLoss()
    mean = torch.tensor(recipe.augment.mean, device=rt.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(recipe.augment.std, device=rt.device).view(1, 3, 1, 1) * 255

    def bare(n: int) -> None:
        net.train()
        loss = None
        for images, targets, _ in feed(n):
            images = images.float().sub_(mean).div_(std).contiguous(memory_format=memory_format)
            with rt.autocast():
                loss = criterion(forward(images), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        loss.item()  # the trainer reads its loss once per window too

    def ours(n: int) -> None:
        train_steps(trainer, feed(n), epoch=0, num_batches=n, log=lambda record: None)

    cuda = rt.device.type == "cuda"
    rates, peak = time_sides({"bare": bare, "trainer": ours}, rt.device, warmup, steps, trials, batch_size)
    bare_median, ours_median = statistics.median(rates["bare"]), statistics.median(rates["trainer"])
    return {
        "model": model, "img_size": img_size, "batch_size": batch_size, "amp": str(rt.amp_dtype).replace(
            "torch.", "") if rt.amp_dtype else "off", "channels_last": channels_last, "compile": compile,
        "device": str(rt.device), "card": torch.cuda.get_device_name(rt.device) if cuda else "cpu",
        "threads": torch.get_num_threads(), "steps_per_trial": steps, "trials": trials,
        "trainer_img_per_s": round(ours_median, 1), "bare_img_per_s": round(bare_median, 1),
        "ratio": round(ours_median / bare_median, 3),
        "median_paired_ratio": round(statistics.median(o / b for o, b in zip(rates["trainer"], rates["bare"])), 3),
        # Both models live on the device throughout, so each peak includes the other's weights and optimizer
        # state (about 0.2 GB for ResNet-50); the difference between the two is what the trainer adds.
        "trainer_peak_mem_gb": round(peak["trainer"], 2) if cuda else None,
        "bare_peak_mem_gb": round(peak["bare"], 2) if cuda else None,
        "torch": str(torch.__version__), "timm": timm.__version__,
    }


def time_sides(sides: dict, device: torch.device, warmup: int, steps: int, trials: int,
               batch_size: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Images/s of each side per trial, and each side's peak GPU memory (GiB). Trials alternate the sides and
    who goes first, so that drift in the machine's speed favours neither."""
    cuda = device.type == "cuda"
    rates: dict[str, list[float]] = {name: [] for name in sides}
    peak: dict[str, float] = {name: 0.0 for name in sides}
    for run in sides.values():  # compilation, cuDNN autotuning, allocator growth
        run(warmup)
    order = list(sides)
    for _ in range(trials):
        for name in order:
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            sides[name](steps)
            if cuda:
                torch.cuda.synchronize(device)
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device) / 2**30)
            rates[name].append(steps * batch_size / (time.perf_counter() - start))
        order.reverse()
    return rates, peak
