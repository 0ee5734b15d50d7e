"""`predict` (top-k labels with probabilities) and `explain` (a Grad-CAM heatmap) for image files, from a
checkpoint, a run directory or an export folder.

An export folder loads exactly as a user of the Hub model would load it: `timm.create_model("local-dir:DIR")`
with timm's data config and transform. A checkpoint loads through the recipe it carries, with the recipe's
eval transform, so both paths see the preprocessing the reported accuracy was measured with.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from resnet50_recipe.data.pipeline import eval_transform
from resnet50_recipe.errors import MissingInput, UserError
from resnet50_recipe.model import build_model
from resnet50_recipe.publish.export import choose_weights, label_names, resolve_source
from resnet50_recipe.recipe import load_recipe
from resnet50_recipe.store.checkpoints import MANIFEST, load_state

__all__ = ["BATCH", "Classifier", "load_classifier", "open_image", "predict", "class_index", "grad_cam",
           "to_image_frame", "overlay", "explain"]

BATCH = 32


@dataclass
class Classifier:
    model: torch.nn.Module  # in eval mode, on the CPU
    transform: Callable[[Image.Image], torch.Tensor]  # PIL image -> normalised float CHW
    names: list[str]  # human-readable, in class-index order
    classes: list[str]  # the class folder names (the same as `names` for an export folder)
    size: int  # the square the transform crops to
    crop_pct: float  # the center crop's fraction of the resized image


def load_classifier(source: str | Path, weights: str = "auto") -> Classifier:
    """An export folder (config.json), a run directory or a checkpoint file -> a classifier on the CPU."""
    import timm

    source = Path(source)
    if not source.exists():
        raise MissingInput(f"{source}: not found; pass a checkpoint file, a run directory or an export folder")
    if source.is_dir() and (source / "config.json").is_file():
        from timm.data import create_transform, resolve_data_config

        model = timm.create_model(f"local-dir:{source}", pretrained=True).eval()
        config = resolve_data_config({}, model=model)
        names = json.loads((source / "config.json").read_text()).get("label_names") \
            or [str(i) for i in range(model.num_classes)]
        return Classifier(model, create_transform(**config), names, names, config["input_size"][-1],
                          config["crop_pct"])


    if source.is_dir() and not (source / "checkpoints").is_dir() and not (source / MANIFEST).is_file():
        raise MissingInput(f"{source}: neither an export folder (config.json) nor a run directory "
                           "(checkpoints/latest.json); pass one of those or a checkpoint file")
    path, kind = resolve_source(source, weights)
    state = load_state(path)
    recipe = load_recipe(state["recipe"])
    classes = state["class_names"]
    model = build_model(recipe.model, len(classes))
    model.load_state_dict(state["ema" if choose_weights(state, kind) == "ema" else "model"])
    aug = recipe.augment
    to_uint8 = eval_transform(aug)
    mean = torch.tensor(aug.mean).view(3, 1, 1)
    std = torch.tensor(aug.std).view(3, 1, 1)

    def transform(image: Image.Image) -> torch.Tensor:
        return (to_uint8(image).float() / 255 - mean) / std
    names_file = recipe.export.label_names  # used when it is still where the run found it
    names = label_names(classes, names_file if names_file and Path(names_file).is_file() else None)
    return Classifier(model.eval(), transform, names, classes, aug.eval_size, aug.crop_pct)


def open_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise MissingInput(f"{path}: image not found") from None
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None


@torch.no_grad()
def predict(source: str | Path, images: list[str | Path], top: int = 5, weights: str = "auto") -> list[dict]:
    """For each image: {"image", "top": [{"index", "label", "prob"}, ...]}, most probable first."""
    if top < 1:
        raise UserError(f"--top {top}: give how many labels to show per image, 1 or more")
    clf = load_classifier(source, weights)
    k = min(top, len(clf.names))
    results = []
    for start in range(0, len(images), BATCH):
        paths = images[start:start + BATCH]
        batch = torch.stack([clf.transform(open_image(p)) for p in paths])
        probs, indices = clf.model(batch).float().softmax(dim=1).topk(k, dim=1)
        for path, p, i in zip(paths, probs.tolist(), indices.tolist()):
            results.append({"image": str(path), "top": [{"index": ci, "label": clf.names[ci], "prob": pi}
                                                        for pi, ci in zip(p, i)]})
    return results


def class_index(clf: Classifier, wanted: str | int) -> int:
    """A class given by index, folder name or label name (case-insensitive)."""
    if isinstance(wanted, int) or str(wanted).isdigit():
        index = int(wanted)
        if not 0 <= index < len(clf.names):
            raise UserError(f"--class {wanted}: the model has classes 0 to {len(clf.names) - 1}")
        return index
    for names in (clf.classes, clf.names):
        lowered = [n.lower() for n in names]
        if str(wanted).lower() in lowered:
            return lowered.index(str(wanted).lower())
    raise UserError(f"--class {wanted!r}: no class of that name; give an index (0-{len(clf.names) - 1}) or one "
                    f"of {', '.join(clf.names[:10])}{', ...' if len(clf.names) > 10 else ''}")


def grad_cam(clf: Classifier, image: Image.Image, target: int | None = None) -> tuple[np.ndarray, int, float]:
    """Grad-CAM (Selvaraju et al., 2017) on the model's last feature stage, as timm's feature_info names it:
    the stage's activations weighted by the spatially averaged gradient of the class logit, summed over
    channels, clipped at zero. Returns (heat in [0, 1] at the image's own size, class index, probability)."""
    model = clf.model
    info = getattr(model, "feature_info", None)
    if not info:
        raise UserError(f"{type(model).__name__}: no feature_info, so no last conv stage to explain")
    stage = model.get_submodule(info[-1]["module"])
    saved: dict[str, torch.Tensor] = {}

    def keep(module, inputs, output):
        saved["activation"] = output
        output.register_hook(lambda grad: saved.__setitem__("gradient", grad))

    handle = stage.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(clf.transform(image).unsqueeze(0)).float()
            index = int(logits.argmax()) if target is None else target
            model.zero_grad(set_to_none=True)
            logits[0, index].backward()
    finally:
        handle.remove()
    activation, gradient = saved["activation"].detach(), saved["gradient"]
    cam = (gradient.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1, keepdim=True).clamp(min=0)
    cam = cam / cam.max() if cam.max() > 0 else cam
    return to_image_frame(cam, image.size, clf.size, clf.crop_pct), index, float(logits.detach().softmax(1)[0, index])


def to_image_frame(cam: torch.Tensor, image_size: tuple[int, int], size: int, crop_pct: float) -> np.ndarray:
    """Undo the eval transform's geometry: the shorter side was resized to floor(size / crop_pct) and the
    center size x size square kept, so the map covers that square of the original image; outside it is 0."""
    width, height = image_size
    side = size * min(width, height) / math.floor(size / crop_pct)  # the crop, in original pixels
    box = max(1, round(side))
    left, top = round((width - side) / 2), round((height - side) / 2)
    heat = torch.nn.functional.interpolate(cam, size=(box, box), mode="bilinear", align_corners=False)[0, 0]
    full = torch.zeros(height, width)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + box, width), min(top + box, height)
    full[y0:y1, x0:x1] = heat[y0 - top:y1 - top, x0 - left:x1 - left]
    return full.numpy()


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.45) -> Image.Image:
    from matplotlib import colormaps

    colours = colormaps["jet"](heat)[..., :3] * 255
    pixels = (1 - alpha) * np.asarray(image, dtype=np.float32) + alpha * colours
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def explain(source: str | Path, image_path: str | Path, out: str | Path, target: str | int | None = None,
            weights: str = "auto") -> dict:
    """Write a Grad-CAM overlay PNG at the input image's size; return the class explained and the heat map."""
    clf = load_classifier(source, weights)
    image = open_image(image_path)
    heat, index, prob = grad_cam(clf, image, None if target is None else class_index(clf, target))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    overlay(image, heat).save(tmp)
    tmp.replace(out)
    return {"image": str(image_path), "out": str(out), "index": index, "label": clf.names[index], "prob": prob,
            "heat": heat}
