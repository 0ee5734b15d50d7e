"""Recipe sections -> model, optimizer, scheduler, loss, Mixup/CutMix, EMA: a few lines over each timm factory."""
from __future__ import annotations

import torch
import timm
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from .recipe import EmaConfig, LossConfig, MixupConfig, ModelConfig, OptimConfig, SchedConfig


def build_model(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    """Any timm model, from scratch. zero_init_last zeroes the last BN gamma of each residual block (timm's
    ResNet option), which makes every block start as an identity and helps large-batch training."""
    kwargs = dict(num_classes=num_classes, drop_rate=cfg.drop_rate)
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    if cfg.name.split(".")[0].startswith(("resnet", "resnext", "seresnet", "test_resnet", "wide_resnet")):
        kwargs["zero_init_last"] = cfg.zero_init_last
    model = timm.create_model(cfg.name, pretrained=False, **kwargs)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer factory; `no_decay_norm_bias` keeps weight decay off norm weights and biases."""
    kwargs = {}
    if cfg.opt.lower() in ("sgd", "nesterov", "momentum"):
        kwargs["momentum"] = cfg.momentum
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
    """timm's ModelEmaV3. With `every: k` the decay is raised to the k-th power, so the EMA's time constant in
    optimizer steps stays the same while the update costs 1/k as much (torchvision's V2 recipe does this)."""
    if not cfg.enabled:
        return None
    return ModelEmaV3(model, decay=cfg.decay ** cfg.every, use_warmup=cfg.warmup)

