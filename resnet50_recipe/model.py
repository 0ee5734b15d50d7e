"""The model: any timm model from the recipe's `model` section (`build_model`), and the timm name it resolves to
(`model_name`: a BlurPool variant for `model.aa_layer`). Used by the trainer, the export and `predict`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import timm
import torch

from resnet50_recipe.errors import RecipeError

__all__ = ["build_model", "model_name"]

if TYPE_CHECKING:  # the recipe imports this module to check model names, so only the type checker reads it back
    from resnet50_recipe.recipe import ModelConfig


def build_model(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    """Any timm model, from scratch. zero_init_last zeroes the last BN gamma of each residual block (timm's
    ResNet option), which makes every block start as an identity and helps large-batch training."""
    kwargs = dict(num_classes=num_classes, drop_rate=cfg.drop_rate)
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    if cfg.name.split(".")[0].startswith(("resnet", "resnext", "seresnet", "test_resnet", "wide_resnet")):
        kwargs["zero_init_last"] = cfg.zero_init_last
    model = timm.create_model(model_name(cfg), pretrained=False, **kwargs)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def model_name(cfg: ModelConfig) -> str:
    """The timm model to create. `aa_layer: blurpool` picks timm's anti-aliased variant of the same ResNet
    (resnet50 -> resnetblur50: BlurPool2d before each stride-2 step, Zhang 2019, as FFCV trains). A named
    variant rather than `aa_layer=BlurPool2d` passed to create_model: the export's config.json then names an
    architecture that `timm.create_model("hf-hub:...")` rebuilds, where a layer class cannot be written to JSON."""
    if cfg.aa_layer is None:
        return cfg.name
    base = cfg.name.split(".")[0]
    variant = base.replace("resnet", "resnetblur", 1) if base.startswith("resnet") else None
    if variant is None or not timm.is_model(variant):
        raise RecipeError(f"model.aa_layer: timm has no BlurPool variant of {cfg.name!r}; it has "
                          f"{', '.join(timm.list_models('resnetblur*'))} (set model.name to the plain ResNet, "
                          "e.g. resnet50, or model.aa_layer: null)")
    return variant
