"""Export trained weights in timm's Hugging Face Hub format, check them, and push them to the Hub.

An export folder holds model.safetensors and config.json as timm's `save_for_hf` writes them, a model card
(README.md) and curves.png. It loads with `timm.create_model("local-dir:DIR", pretrained=True)` here and
`timm.create_model("hf-hub:user/name", pretrained=True)` once pushed.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import timm
import torch
from timm.data import ImageNetInfo
from timm.models import load_checkpoint, save_for_hf

from . import checkpoint as ckpt
from .build import build_model
from .recipe import Recipe, load_recipe, to_yaml

log = logging.getLogger(__name__)

REPO_PLACEHOLDER = "YOUR-USER/YOUR-MODEL"
FILES = ("model.safetensors", "config.json", "README.md")
# From report.py's PNGS, less its curves.png (the card shows the run's own). Its numbers are from the weights
# the report evaluated, which are the exported ones when both used the same --weights.
REPORT_PNGS = {"per_class_accuracy.png": "per-class accuracy on val",
               "confusion_matrix.png": "confusion matrix on val", "mistakes.png": "the most confident mistakes on val"}


def resolve_source(source: str | Path, weights: str) -> tuple[Path, str]:
    """A run directory or a checkpoint file -> (checkpoint path, weights kind to export)."""
    source = Path(source)
    if source.is_dir():
        folder = source / "checkpoints" if (source / "checkpoints").is_dir() else source
        manifest = ckpt.read_manifest(folder)
        if manifest is None or not manifest.get("file"):
            raise FileNotFoundError(f"{source}: no checkpoint recorded in checkpoints/latest.json; pass a run "
                                    "directory that has one, or a checkpoint file")
        if weights == "best":
            best = manifest.get("best")
            if not best or not best.get("file"):
                raise ValueError(f"{source}: no best checkpoint is recorded; use --weights auto, ema or raw")
            return folder / best["file"], best["weights"]
        return folder / manifest["file"], weights
    if weights == "best":
        raise ValueError(f"{source}: --weights best needs a run directory, not a single checkpoint")
    return source, weights


def choose_weights(state: dict, weights: str) -> str:
    """`auto`: the EMA weights when their last measured top-1 beats the raw weights', else the raw ones."""
    if weights in ("raw", "ema"):
        if weights == "ema" and state.get("ema") is None:
            raise ValueError("this checkpoint has no EMA weights (ema.enabled was false); use --weights raw")
        return weights
    evaluated = [r for r in state.get("metrics", []) if "top1" in r]
    if state.get("ema") is not None and evaluated and evaluated[-1].get("ema_top1", -1) > evaluated[-1]["top1"]:
        return "ema"
    return "raw"


def label_names(classes: list[str], names_file: str | Path | None = None) -> list[str]:
    """Human-readable names in class-index order: a names file (one per line), ImageNet's descriptions when
    the classes are ImageNet synsets (n01440764, ...), or the folder names."""
    if names_file:
        names = [line.strip() for line in Path(names_file).read_text().splitlines() if line.strip()]
        if len(names) != len(classes):
            raise ValueError(f"{names_file}: {len(names)} names for {len(classes)} classes")
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
    state = ckpt.load_state(path)
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
    check_export(out, reference=model)
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


def check_export(folder: str | Path, reference: torch.nn.Module | None = None) -> None:
    """The round trip: the folder loads through timm's `local-dir:` source, gives the same fp32 logits as the
    weights it was made from (`reference`, or its own safetensors file read directly), and its model card
    parses. Raises ValueError naming what failed."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder}: not an export folder, missing {', '.join(missing)}")
    try:
        config = json.loads((folder / "config.json").read_text())
        loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        if reference is None:
            reference = timm.create_model(config["architecture"], num_classes=config["num_classes"]).eval()
            load_checkpoint(reference, str(folder / "model.safetensors"), strict=True)
    except Exception as e:  # timm and torch raise assorted errors for a broken folder
        raise ValueError(f"{folder}: fails the round trip, timm cannot load it as exported ({e})") from None
    size = config["pretrained_cfg"]["input_size"]
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(2, *size, generator=generator)
    with torch.no_grad():
        if not torch.equal(loaded(batch), reference(batch)):
            raise ValueError(f"{folder}: the model timm loads gives different logits from the exported weights")
    card = ModelCard.load(folder / "README.md")
    if not card.data.eval_results:
        raise ValueError(f"{folder}/README.md: the model card carries no eval results")


def model_card(recipe: Recipe, state: dict, kind: str, path: Path, run_dir: Path, repo_id: str | None,
               license: str, dataset: str | None) -> str:
    """README.md: Hub front matter (library, tags, license, datasets, model-index) and a plain-text body."""
    from huggingface_hub import EvalResult, ModelCardData

    evaluated = [r for r in state["metrics"] if "top1" in r]
    last = evaluated[-1] if evaluated else {}
    top1 = last.get("ema_top1" if kind == "ema" else "top1")
    top5 = last.get("ema_top5" if kind == "ema" else "top5")
    dataset_id = dataset or ("imagenet-1k" if len(state["class_names"]) == 1000 else None)
    dataset_name = dataset_id or f"{len(state['class_names'])}-class ImageFolder"
    name = (repo_id or REPO_PLACEHOLDER).split("/")[-1]
    results = [EvalResult(task_type="image-classification", dataset_type=dataset_id or "imagefolder",
                          dataset_name=dataset_name, dataset_split="validation", metric_type="accuracy",
                          metric_name=metric, metric_value=round(value, 4))
               for metric, value in (("top-1", top1), ("top-5", top5)) if value is not None]
    data = ModelCardData(library_name="timm", license=license, tags=["image-classification", "timm"],
                         datasets=[dataset_id] if dataset_id else None, model_name=name,
                         eval_results=results or None)
    env = state.get("versions", {})
    hardware = ", ".join(env.get("gpus") or []) or f"CPU ({env.get('platform', 'unknown platform')})"
    summary = _read_json(run_dir / "summary.json")
    cost = summary.get("cost_usd")
    rows = "\n".join(f"| {r['epoch'] + 1} | {r['train_loss']:.4f} | {r['top1']:.4f} | {r['top5']:.4f} | "
                     f"{_fmt(r.get('ema_top1'))} |" for r in evaluated)
    aug = recipe.augment
    figures = "".join(f"![{alt}]({name})\n\n" for name, alt in REPORT_PNGS.items()
                      if (run_dir / "report" / name).is_file())
    analysis = f"\n## Analysis\n\nFrom `resnet50-recipe report` on the run.\n\n{figures}" if figures else ""
    return f"""---
{data.to_yaml()}
---

# {name}

A `{recipe.model.name}` image classifier trained from scratch with
[resnet50-recipe](https://pypi.org/project/resnet50-recipe/) (recipe `{recipe.name}`) on {dataset_name}
({len(state['class_names'])} classes). These are the {'EMA' if kind == 'ema' else 'raw'} weights of
`{path.name}` (epoch {state['epoch']}, step {state['global_step']}).

## Results

Validation top-1 {_fmt(top1)}, top-5 {_fmt(top5)}, at {aug.eval_size} px, crop {aug.crop_pct}.

| epoch | train loss | top-1 | top-5 | EMA top-1 |
|---|---|---|---|---|
{rows}

![training curves](curves.png)
{analysis}
## How it was trained

- Epochs: {state['epoch']} of {recipe.train.epochs}; {state['global_step']} optimizer steps
- Hardware: {hardware}; wall time {_duration(state['elapsed_s'])}{f"; cost ${cost:.2f}" if cost else ""}
- Software: torch {env.get('torch')}, timm {env.get('timm')}, resnet50-recipe {env.get('resnet50_recipe')}

The resolved recipe:

```yaml
{to_yaml(recipe).rstrip()}
```

## How to use it

```python
import timm
from PIL import Image

model = timm.create_model("hf-hub:{repo_id or REPO_PLACEHOLDER}", pretrained=True).eval()
config = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**config)
logits = model(transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0))
```

## Limitations

- Trained on {dataset_name} only: it knows these {len(state['class_names'])} classes and nothing else, and
  inherits that data's biases.
- Accuracy was measured on the validation split above, at the stated size and crop; other preprocessing
  gives other numbers.
- Trained from scratch with the recipe above; compare with published weights before relying on it.
"""


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def push(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         create_pr: bool = False, commit_message: str | None = None, token: str | None = None) -> str:
    """Check the export folder, then create the repo (exist_ok) and upload the folder; returns the commit URL.

    The token comes from `token`, HF_TOKEN or the huggingface login cache, as huggingface_hub resolves it;
    it is never printed or logged.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    check_export(folder)
    with tempfile.TemporaryDirectory() as staging:
        # Upload a copy whose model card names the real repo, leaving the export folder as it was checked.
        staged = Path(staging) / folder.name
        shutil.copytree(folder, staged)
        card = staged / "README.md"
        card.write_text(card.read_text().replace(REPO_PLACEHOLDER, repo_id))
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(staged), repo_type="model", revision=revision,
                                 create_pr=create_pr,
                                 commit_message=commit_message or f"Upload {folder.name} from resnet50-recipe")
    log.info("pushed %s to %s", folder, repo_id)
    return str(info)
