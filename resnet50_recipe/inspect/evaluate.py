"""`evaluate_checkpoint` (`resnet50-recipe eval`): a checkpoint's top-1/top-5 on a val folder, with the
trainer's own evaluation."""

from __future__ import annotations

import logging
from pathlib import Path

from resnet50_recipe.data.pipeline import (
    EpochSampler,
    ImageFolderDataset,
    class_names,
    eval_transform,
    make_loader,
    resolve_data_dir,
)
from resnet50_recipe.errors import UserError
from resnet50_recipe.recipe import load_recipe
from resnet50_recipe.store.checkpoints import load_state
from resnet50_recipe.trainer.runtime import setup
from resnet50_recipe.trainer.step import evaluate, make_to_input, prepare_model

__all__ = ["evaluate_checkpoint"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Evaluating a saved checkpoint


def evaluate_checkpoint(path: str | Path, data: str | Path | None = None, img_size: int | None = None,
                        crop_pct: float | None = None, batch_size: int | None = None, workers: int | None = None,
                        device: str = "auto", flip: bool | None = None) -> dict:
    """Top-1/top-5 of a checkpoint's raw (and EMA) weights on DIR/val, at the recipe's or the given size, with or
    without flip test-time augmentation (default: the recipe's augment.eval_flip)."""
    state = load_state(path)
    overrides = [f"train.device={device}"] + ([f"data.path={data}"] if data else [])
    if data:
        overrides.append("data.synthetic=null")
    recipe = load_recipe(state["recipe"], overrides)
    rt = setup(recipe.train, recipe.seed)
    data_dir = resolve_data_dir(recipe.data)
    classes = class_names(data_dir)
    if classes != state["class_names"]:
        raise UserError(f"{data_dir}: its classes differ from the {len(state['class_names'])} the checkpoint was "
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
