"""Export trained weights in timm's Hugging Face Hub format, check them, and push them to the Hub.

An export folder holds model.safetensors and config.json as timm's `save_for_hf` writes them, a model card
(README.md) and curves.png. It loads with `timm.create_model("local-dir:DIR", pretrained=True)` here and
`timm.create_model("hf-hub:user/name", pretrained=True)` once pushed.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import timm
import torch
from timm.data import ImageNetInfo
from timm.models import load_checkpoint, save_for_hf

from resnet50_recipe.errors import MissingInput, UserError
from resnet50_recipe.model import build_model
from resnet50_recipe.publish.card import REPORT_PNGS, model_card
from resnet50_recipe.recipe import Recipe, load_recipe
from resnet50_recipe.store.checkpoints import load_state, read_manifest

__all__ = ["FILES", "resolve_source", "choose_weights", "label_names", "export", "pretrained_cfg", "verify_export"]

log = logging.getLogger(__name__)


FILES = ("model.safetensors", "config.json", "README.md")


def resolve_source(source: str | Path, weights: str) -> tuple[Path, str]:
    """A run directory or a checkpoint file -> (checkpoint path, weights kind to export)."""
    source = Path(source)
    if source.is_dir():
        folder = source / "checkpoints" if (source / "checkpoints").is_dir() else source
        manifest = read_manifest(folder)
        if manifest is None or not manifest.get("file"):
            raise MissingInput(f"{source}: no checkpoint recorded in checkpoints/latest.json; pass a run "
                               "directory that has one, or a checkpoint file")
        if weights == "best":
            best = manifest.get("best")
            if not best or not best.get("file"):
                raise UserError(f"{source}: no best checkpoint is recorded; use --weights auto, ema or raw")
            return folder / best["file"], best["weights"]
        return folder / manifest["file"], weights
    if weights == "best":
        raise UserError(f"{source}: --weights best needs a run directory, not a single checkpoint")
    return source, weights


def choose_weights(state: dict, weights: str) -> str:
    """`auto`: the EMA weights when their last measured top-1 beats the raw weights', else the raw ones."""
    if weights in ("raw", "ema"):
        if weights == "ema" and state.get("ema") is None:
            raise UserError("this checkpoint has no EMA weights (ema.enabled was false); use --weights raw")
        return weights
    evaluated = [r for r in state.get("metrics", []) if "top1" in r]
    if state.get("ema") is not None and evaluated and evaluated[-1].get("ema_top1", -1) > evaluated[-1]["top1"]:
        return "ema"
    return "raw"


def label_names(classes: list[str], names_file: str | Path | None = None) -> list[str]:
    """Human-readable names in class-index order: a names file (one per line), ImageNet's descriptions when
    the classes are ImageNet synsets (n01440764, ...), or the folder names."""
    if names_file:
        if not Path(names_file).is_file():
            raise MissingInput(f"{names_file}: not found; expected a text file with one class name per line, in "
                               "class-index order")
        names = [line.strip() for line in Path(names_file).read_text().splitlines() if line.strip()]
        if len(names) != len(classes):
            raise UserError(f"{names_file}: {len(names)} names for {len(classes)} classes")
        return names
    info = ImageNetInfo()
    synsets = {name: i for i, name in enumerate(info.label_names())}
    if all(c in synsets for c in classes):
        return [info.index_to_description(synsets[c]) for c in classes]
    return list(classes)


def export(source: str | Path, out: str | Path, weights: str = "auto", names_file: str | Path | None = None,
           repo_id: str | None = None, license: str = "apache-2.0", dataset: str | None = None) -> Path:
    """Write model.safetensors, config.json, README.md (and curves.png when the run has one) to `out`.

    `source` is a run directory or a checkpoint; `weights` is auto, ema, raw or best (the run's best
    checkpoint). The folder is checked by loading it back through timm before this returns.
    """
    path, weights = resolve_source(source, weights)
    state = load_state(path)
    recipe = load_recipe(state["recipe"])
    kind = choose_weights(state, weights)
    classes = state["class_names"]
    model = build_model(recipe.model, len(classes))
    model.load_state_dict(state["ema" if kind == "ema" else "model"])
    model.eval()
    model.pretrained_cfg = pretrained_cfg(model, recipe, license)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(out), model_config={"label_names": label_names(classes, names_file)},
                safe_serialization=True)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if (run_dir / "curves.png").is_file():
        shutil.copyfile(run_dir / "curves.png", out / "curves.png")
    for name in REPORT_PNGS:  # `resnet50-recipe report`'s figures, when the run has a report
        if (run_dir / "report" / name).is_file():
            shutil.copyfile(run_dir / "report" / name, out / name)
    card = model_card(recipe, state, kind, path, run_dir, repo_id, license, dataset)
    (out / "README.md").write_text(card)
    verify_export(out, reference=model)
    return out


def pretrained_cfg(model: torch.nn.Module, recipe: Recipe, license: str) -> dict:
    """The preprocessing our recipe evaluated with, in timm's pretrained_cfg terms."""
    aug = recipe.augment
    keep = {k: model.pretrained_cfg[k] for k in ("architecture", "first_conv", "classifier")
            if k in model.pretrained_cfg}
    return {**keep, "input_size": (3, aug.eval_size, aug.eval_size),
            "interpolation": "bicubic" if aug.interpolation == "random" else aug.interpolation,
            "crop_pct": aug.crop_pct, "crop_mode": "center", "mean": tuple(aug.mean), "std": tuple(aug.std),
            "num_classes": model.num_classes, "license": license}


def verify_export(folder: str | Path, reference: torch.nn.Module | None = None) -> None:
    """The round trip: the folder loads through timm's `local-dir:` source, gives the same fp32 logits as the
    weights it was made from (`reference`, or its own safetensors file read directly), and its model card
    parses. Raises UserError naming what failed."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{folder}: not an export folder, missing {', '.join(missing)}")
    try:
        config = json.loads((folder / "config.json").read_text())
        loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        if reference is None:
            reference = timm.create_model(config["architecture"], num_classes=config["num_classes"]).eval()
            load_checkpoint(reference, str(folder / "model.safetensors"), strict=True)
    except Exception as e:  # timm and torch raise assorted errors for a broken folder
        raise UserError(f"{folder}: fails the round trip, timm cannot load it as exported ({e})") from None
    size = config["pretrained_cfg"]["input_size"]
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(2, *size, generator=generator)
    with torch.no_grad():
        if not torch.equal(loaded(batch), reference(batch)):
            raise UserError(f"{folder}: the model timm loads gives different logits from the exported weights")
    card = ModelCard.load(folder / "README.md")
    if not card.data.eval_results:
        raise UserError(f"{folder}/README.md: the model card carries no eval results")
