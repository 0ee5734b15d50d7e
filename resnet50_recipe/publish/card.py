"""The model card (the export's README.md): what was trained, on what, how well, at what cost, with the recipe and
the figures of the run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from resnet50_recipe.recipe import Recipe, to_yaml

__all__ = ["REPO_PLACEHOLDER", "REPORT_PNGS", "model_card", "card_data"]

REPO_PLACEHOLDER = "YOUR-USER/YOUR-MODEL"
# From inspect/report.py's PNGS, less its curves.png (the card shows the run's own). Its numbers are from the weights
# the report evaluated, which are the exported ones when both used the same --weights.
REPORT_PNGS = {"per_class_accuracy.png": "per-class accuracy on val",
               "confusion_matrix.png": "confusion matrix on val", "mistakes.png": "the most confident mistakes on val"}


log = logging.getLogger(__name__)


def model_card(recipe: Recipe, state: dict, kind: str, path: Path, run_dir: Path, repo_id: str | None,
               license: str, dataset: str | None) -> str:
    """README.md: Hub front matter (library, tags, license, datasets, model-index) and a plain-text body."""
    evaluated = [r for r in state["metrics"] if "top1" in r]
    last = evaluated[-1] if evaluated else {}
    top1 = last.get("ema_top1" if kind == "ema" else "top1")
    top5 = last.get("ema_top5" if kind == "ema" else "top5")
    dataset_id = dataset or ("imagenet-1k" if len(state["class_names"]) == 1000 else None)
    dataset_name = dataset_id or f"{len(state['class_names'])}-class ImageFolder"
    name = (repo_id or REPO_PLACEHOLDER).split("/")[-1]
    front_matter = card_data(name, license, dataset_id, dataset_name, top1, top5)
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
{front_matter}
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

- Epochs: {state['epoch']} of {_planned(state, recipe)}; {state['global_step']} optimizer steps
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


def card_data(name: str, license: str, dataset_id: str | None, dataset_name: str, top1: float | None,
              top5: float | None) -> str:
    """The card's YAML front matter: what the Hub indexes (library, tags, license, datasets, the model-index with
    the val top-1 and top-5)."""
    from huggingface_hub import EvalResult, ModelCardData

    results = [EvalResult(task_type="image-classification", dataset_type=dataset_id or "imagefolder",
                          dataset_name=dataset_name, dataset_split="validation", metric_type="accuracy",
                          metric_name=metric, metric_value=round(value, 4))
               for metric, value in (("top-1", top1), ("top-5", top5)) if value is not None]
    return ModelCardData(library_name="timm", license=license, tags=["image-classification", "timm"],
                         datasets=[dataset_id] if dataset_id else None, model_name=name,
                         eval_results=results or None).to_yaml()


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _planned(state: dict, recipe) -> str:
    """The run's length: the recipe's, or the shorter plan train.budget_mode: fit made (trainer/budget.py)."""
    plan = state.get("replan")
    if plan is None:
        return str(recipe.train.epochs)
    return (f"{plan['epochs']} (the recipe's {plan['planned_epochs']}, shortened after epoch {plan['after_epoch']} "
            "to fit train.budget_usd: decay and resolution ramp compressed)")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
