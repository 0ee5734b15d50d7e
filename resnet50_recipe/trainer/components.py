"""Recipe sections -> model, optimizer, scheduler, loss, Mixup/CutMix, EMA: a few lines over each timm factory."""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from resnet50_recipe.recipe import (
    EmaConfig,
    LossConfig,
    MixupConfig,
    OptimConfig,
    RecipeError,
    SchedConfig,
)

__all__ = ["build_optimizer", "build_scheduler", "build_mixup", "build_loss", "build_ema", "StridedEma"]


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module, lr: float,
                    device: torch.device | None = None) -> torch.optim.Optimizer:
    """timm's optimizer factory; `no_decay_norm_bias` keeps weight decay off norm weights and biases.

    `fused: auto` takes torch's fused kernel (one launch for all parameters, and GradScaler's unscale and inf
    check inside it, with no host sync) on CUDA when the optimizer has one: SGD, Adam, AdamW. Elsewhere torch
    picks its foreach path itself.
    """
    kwargs = {}
    if cfg.opt.lower() in ("sgd", "nesterov", "momentum"):
        kwargs["momentum"] = cfg.momentum
    if cfg.fused != "off":
        import inspect

        import timm.optim

        has_fused = "fused" in inspect.signature(timm.optim.get_optimizer_class(cfg.opt, bind_defaults=False)
                                                 ).parameters
        if cfg.fused == "on" and not has_fused:
            raise RecipeError(f"optim.fused: on, but timm's {cfg.opt!r} optimizer has no fused kernel; use auto "
                              "or off, or an optimizer that has one (sgd, momentum, adam, adamw)")
        if has_fused and (cfg.fused == "on" or (device is not None and device.type == "cuda")):
            kwargs["fused"] = True
    return create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                               filter_bias_and_bn=cfg.no_decay_norm_bias, **kwargs)


def build_scheduler(cfg: SchedConfig, optimizer: torch.optim.Optimizer, epochs: int, updates_per_epoch: int):
    """timm's scheduler, stepped per optimizer update (`step_update`), so warmup is smooth at any batch size."""
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.kind, num_epochs=epochs, decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate,
        min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
        cooldown_epochs=cfg.cooldown_epochs, step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    return scheduler


def build_mixup(cfg: MixupConfig, loss: LossConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix; it also applies label smoothing to the mixed targets."""
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        return None
    return Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.prob,
                 switch_prob=cfg.switch_prob, mode=cfg.mode, label_smoothing=loss.label_smoothing,
                 num_classes=num_classes)


def build_loss(cfg: LossConfig, mixup_active: bool) -> torch.nn.Module:
    """As timm's train.py chooses: BCE (ResNet strikes back), soft-target CE after Mixup, or smoothed CE."""
    if cfg.kind == "bce":
        # With Mixup the targets are already smoothed; smoothing them again would double-count.
        return BinaryCrossEntropy(smoothing=0.0 if mixup_active else cfg.label_smoothing,
                                  target_threshold=cfg.bce_target_thresh)
    if mixup_active:
        return SoftTargetCrossEntropy()
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    return torch.nn.CrossEntropyLoss()


def build_ema(cfg: EmaConfig, model: torch.nn.Module) -> ModelEmaV3 | None:
    """timm's ModelEmaV3, updated every `ema.every` optimizer steps (see StridedEma)."""
    if not cfg.enabled:
        return None
    return StridedEma(model, decay=cfg.decay, use_warmup=cfg.warmup, every=cfg.every)


class StridedEma(ModelEmaV3):
    """ModelEmaV3 updated once every `every` optimizer steps, standing for the `every` per-step updates it
    replaces (torchvision's V2 recipe does this to cost 1/k as much).

    `update(model, step)` takes the optimizer step, as in timm, and the decay timm gives that step, its warmup
    included, is raised to the power `every`. The time constant and the warmup, in optimizer steps, are then
    those of a plain ModelEmaV3 with the recipe's decay; counting in updates, or raising only the final decay,
    would make the warmup `every` times slower than the recipe says.
    """

    def __init__(self, model: torch.nn.Module, decay: float, use_warmup: bool, every: int):
        super().__init__(model, decay=decay, use_warmup=use_warmup)
        self.every = every

    def get_decay(self, step: int | None = None) -> float:
        return super().get_decay(step) ** self.every
