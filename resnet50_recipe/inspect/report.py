"""`report`: one offline HTML page about a run, with its PNGs, in RUN_DIR/report/.

It holds the recipe and environment, the training curves, per-class accuracy and a confusion matrix from
evaluating the chosen checkpoint on the val set, the most confident mistakes, and time and cost. The page
loads nothing from the network: styles are inline and the images sit beside it. The Hub export copies the
PNGs into its model card when a report exists (publish/card.py).
"""

from __future__ import annotations

import html
import json
import os
import shutil
import statistics
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from resnet50_recipe.data.pipeline import (
    EpochSampler,
    ImageFolderDataset,
    class_names,
    eval_transform,
    make_loader,
    resolve_data_dir,
)
from resnet50_recipe.errors import MissingInput, UserError
from resnet50_recipe.inspect.watch import duration
from resnet50_recipe.publish.export import choose_weights, label_names, resolve_source
from resnet50_recipe.recipe import load_recipe
from resnet50_recipe.store.checkpoints import MANIFEST, load_state
from resnet50_recipe.trainer.runlog import read_metrics
from resnet50_recipe.trainer.runtime import Runtime, pick_amp_dtype, pick_device
from resnet50_recipe.trainer.step import make_to_input, prepare_model

__all__ = ["PNGS", "SECTIONS", "MISTAKES", "evaluate_val", "report", "class_stats", "time_cost", "plot_report_curves",
           "plot_per_class", "plot_confusion", "most_confident_mistakes", "STYLE", "page"]

PNGS = ("curves.png", "per_class_accuracy.png", "confusion_matrix.png", "mistakes.png")

SECTIONS = ("overview", "curves", "per-class", "confusion", "mistakes", "time-cost", "recipe", "environment")

MISTAKES = 16


@torch.no_grad()
def evaluate_val(path: Path, weights: str, data: str | Path | None, batch_size: int | None, workers: int | None,
                 device: str) -> dict:
    """Every val image's label, prediction and confidence for the checkpoint's `weights` (raw or ema)."""

    state = load_state(path)
    overrides = [f"data.path={data}", "data.synthetic=null"] if data else []
    recipe = load_recipe(state["recipe"], overrides)
    data_dir = resolve_data_dir(recipe.data)
    classes = class_names(data_dir)
    if classes != state["class_names"]:
        raise UserError(f"{data_dir}: its classes differ from the {len(state['class_names'])} the checkpoint was "
                        f"trained on (first: {state['class_names'][:3]}, got {classes[:3]}); pass --data DIR")
    torch_device = pick_device(device)
    rt = Runtime(torch_device, pick_amp_dtype(recipe.train, torch_device), 0, 1)
    val_set = ImageFolderDataset(data_dir / "val", classes, eval_transform(recipe.augment), recipe.seed,
                                 recipe.data.bad_images)
    loader = make_loader(val_set, EpochSampler(len(val_set), recipe.seed, shuffle=False),
                         batch_size or recipe.train.batch_size, workers if workers is not None else recipe.data.workers,
                         drop_last=False, pin_memory=recipe.data.pin_memory, seed=recipe.seed)
    model = prepare_model(recipe, rt, len(classes))
    model.load_state_dict(state["ema" if weights == "ema" else "model"])
    model.eval()
    to_input = make_to_input(recipe, rt.device)
    targets, probs = [], []
    for images, target, _ in loader:
        with rt.autocast():
            logits = model(to_input(images))
        probs.append(logits.float().softmax(dim=1).cpu())
        targets.append(target)
    prob = torch.cat(probs)
    confidence, predicted = prob.max(dim=1)
    return {"classes": classes, "paths": [p for p, _ in val_set.samples], "target": torch.cat(targets).numpy(),
            "predicted": predicted.numpy(), "confidence": confidence.numpy(), "data": str(data_dir),
            "state": state, "recipe": recipe}


def report(run_dir: str | Path, weights: str = "auto", data: str | Path | None = None, out: str | Path | None = None,
           batch_size: int | None = None, workers: int | None = None, device: str = "auto") -> Path:
    """Write RUN_DIR/report/index.html (or `out`/index.html) and its PNGs; return the page's path.

    The page is built in a temporary folder and renamed into place, so a report folder is always complete.
    """

    run_dir = Path(run_dir)
    if not (run_dir / "checkpoints" / MANIFEST).is_file():
        raise MissingInput(f"{run_dir}: no checkpoints/{MANIFEST}; pass a run directory")
    path, kind = resolve_source(run_dir, weights)
    kind = choose_weights(load_state(path), kind)
    val = evaluate_val(path, kind, data, batch_size, workers, device)
    names = label_names(val["classes"])
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    summary = _read_json(run_dir / "summary.json")
    env = _read_json(run_dir / "env.json")
    recipe_text = (run_dir / "recipe.yaml").read_text() if (run_dir / "recipe.yaml").is_file() else \
        yaml.safe_dump(val["state"]["recipe"], sort_keys=False)

    out = Path(out) if out else run_dir / "report"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats = class_stats(val["target"], val["predicted"], len(names))
    plot_report_curves(records, tmp / "curves.png")
    plot_per_class(stats["accuracy"], names, tmp / "per_class_accuracy.png")
    plot_confusion(stats["confusion"], names, tmp / "confusion_matrix.png")
    mistakes = most_confident_mistakes(val, names, tmp / "mistakes.png")
    numbers = {"checkpoint": path.name, "weights": kind, "data": val["data"], "val_images": int(len(val["target"])),
               "top1": float((val["target"] == val["predicted"]).mean()),
               "per_class_accuracy": dict(zip(names, map(float, stats["accuracy"]))),
               "confusion": stats["confusion"].tolist(), "mistakes": mistakes, "time_cost": time_cost(records, summary)}
    (tmp / "report.json").write_text(json.dumps(numbers, indent=2) + "\n")
    (tmp / "index.html").write_text(page(run_dir, numbers, names, stats, recipe_text, env, summary))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out / "index.html"


def class_stats(target: np.ndarray, predicted: np.ndarray, num_classes: int) -> dict:
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (target, predicted), 1)
    counts = confusion.sum(axis=1)
    accuracy = np.divide(np.diag(confusion), counts, out=np.zeros(num_classes), where=counts > 0)
    return {"confusion": confusion, "counts": counts, "accuracy": accuracy}


def time_cost(records: list[dict], summary: dict) -> dict:
    starts = [r for r in records if r.get("kind") == "start"]
    rates = [r["img_per_s"] for r in records if r.get("kind") == "step" and r.get("img_per_s")]
    waits = [r["data_wait"] for r in records if r.get("kind") == "step" and r.get("data_wait") is not None]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    costed = [r for r in records + [summary] if r.get("cost_usd") is not None]
    typed = [r for r in records + [summary] if r.get("instance_type")]
    return {"wall_time_s": summary.get("wall_time_s"), "epochs": len(epochs), "global_step": summary.get(
            "global_step", max((r.get("global_step", 0) for r in records), default=0)),
            "restarts": max(0, len(starts) - 1), "median_img_per_s": statistics.median(rates) if rates else None,
            "median_data_wait": statistics.median(waits) if waits else None,
            "mean_epoch_time_s": statistics.mean(r["epoch_time_s"] for r in epochs) if epochs else None,
            "cost_usd": costed[-1]["cost_usd"] if costed else None,
            "instance_type": typed[-1]["instance_type"] if typed else None, "device": summary.get("device")}


# ---------------------------------------------------------------------------------------------------------
# Figures (matplotlib's Figure without pyplot: no global state, no GUI backend)


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=100)


def plot_report_curves(records: list[dict], path: Path) -> None:
    """Loss, top-1 for raw and EMA weights, lr and img/s, against the global step."""
    from matplotlib.figure import Figure

    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    evaluated = [r for r in epochs if r.get("top1") is not None]
    fig = Figure(figsize=(12, 7), layout="constrained")
    (loss_ax, acc_ax), (lr_ax, speed_ax) = fig.subplots(2, 2)
    x = [r["global_step"] for r in steps]
    loss_ax.plot(x, [r["loss"] for r in steps], label="train (per log window)")
    val = [r for r in evaluated if r.get("val_loss") is not None]
    if val:
        loss_ax.plot([r["global_step"] for r in val], [r["val_loss"] for r in val], marker="o", label="val")
    loss_ax.set(title="loss", xlabel="step")
    acc_ax.plot([r["global_step"] for r in evaluated], [r["top1"] for r in evaluated], marker="o", label="raw")
    ema = [r for r in evaluated if r.get("ema_top1") is not None]
    if ema:
        acc_ax.plot([r["global_step"] for r in ema], [r["ema_top1"] for r in ema], marker="o", label="EMA")
    acc_ax.set(title="val top-1", xlabel="step", ylim=(0, 1))
    lr_ax.plot(x, [r["lr"] for r in steps])
    lr_ax.set(title="learning rate", xlabel="step")
    speed_ax.plot(x, [r["img_per_s"] for r in steps])
    speed_ax.set(title="throughput (img/s)", xlabel="step", ylim=(0, None))
    for ax in (loss_ax, acc_ax):
        ax.legend()
    for ax in (loss_ax, acc_ax, lr_ax, speed_ax):
        ax.grid(alpha=0.3)
    _save(fig, path)


def plot_per_class(accuracy: np.ndarray, names: list[str], path: Path) -> None:
    """Classes sorted from worst to best; named when there are few enough to read."""
    from matplotlib.figure import Figure

    order = np.argsort(accuracy, kind="stable")
    labelled = len(names) <= 40
    fig = Figure(figsize=(12, max(3.0, 0.28 * len(names)) if labelled else 4), layout="constrained")
    ax = fig.subplots()
    if labelled:
        ax.barh(range(len(order)), accuracy[order])
        ax.set_yticks(range(len(order)), [names[i] for i in order])
        ax.invert_yaxis()  # the worst class on top, as in the table
        ax.set(xlim=(0, 1), xlabel="val top-1", title="per-class accuracy, worst first")
    else:
        ax.plot(accuracy[order])
        ax.set(ylim=(0, 1), ylabel="val top-1", xlabel="classes, sorted", title="per-class accuracy, worst first")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_confusion(confusion: np.ndarray, names: list[str], path: Path) -> None:
    """Rows are true classes, columns predictions, each row normalised to fractions."""
    from matplotlib.figure import Figure

    rows = confusion.sum(axis=1, keepdims=True)
    fractions = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    n = len(names)
    fig = Figure(figsize=(9, 8) if n <= 30 else (10, 9), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    if n <= 30:
        ax.set_xticks(range(n), names, rotation=60, ha="right")
        ax.set_yticks(range(n), names)
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if fractions[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (val)")
    _save(fig, path)


def most_confident_mistakes(val: dict, names: list[str], path: Path, count: int = MISTAKES) -> list[dict]:
    """The wrong predictions the model was surest of, as a grid of the original images; returns them."""
    from matplotlib.figure import Figure

    wrong = np.flatnonzero(val["target"] != val["predicted"])
    wrong = wrong[np.argsort(-val["confidence"][wrong], kind="stable")][:count]
    picked = [{"image": val["paths"][i], "true": names[val["target"][i]], "predicted": names[val["predicted"][i]],
               "confidence": float(val["confidence"][i])} for i in wrong]
    cols = 4
    rows = max(1, (len(picked) + cols - 1) // cols)
    fig = Figure(figsize=(12, 3.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, m in zip(axes, picked):
        with Image.open(m["image"]) as image:
            image = image.convert("RGB")
            image.thumbnail((256, 256))
        ax.imshow(np.asarray(image))
        ax.set_title(f"true {m['true']}\npredicted {m['predicted']} ({m['confidence']:.0%})", fontsize=9)
    if not picked:
        axes[0].text(0.5, 0.5, "no mistakes on val", ha="center", va="center")
    _save(fig, path)
    return picked


# ---------------------------------------------------------------------------------------------------------
# The page

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.muted { color: #666; }
"""


def _table(header: list[str] | None, rows: list[list]) -> str:
    def cell(v):
        return f'<td class="num">{html.escape(v)}</td>' if isinstance(v, str) and v[:1].isdigit() \
            else f"<td>{html.escape(str(v))}</td>"
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def page(run_dir: Path, numbers: dict, names: list[str], stats: dict, recipe_text: str, env: dict,
         summary: dict) -> str:
    tc = numbers["time_cost"]
    accuracy, counts, confusion = stats["accuracy"], stats["counts"], stats["confusion"]
    order = np.argsort(accuracy, kind="stable")
    shown = order if len(names) <= 50 else order[:20]
    class_rows = [[names[i], _fmt(accuracy[i]), str(int(counts[i]))] for i in shown]
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    pairs = [divmod(int(i), len(names)) for i in np.argsort(-off, axis=None, kind="stable")[:10]]
    pair_rows = [[names[t], names[p], str(int(off[t, p]))] for t, p in pairs if off[t, p] > 0]
    mistake_rows = [[m["true"], m["predicted"], _fmt(m["confidence"], ".3f"), m["image"]]
                    for m in numbers["mistakes"]]
    overview = [["checkpoint", f"{numbers['checkpoint']} ({numbers['weights']} weights)"],
                ["val top-1 (this evaluation)", _fmt(numbers["top1"])],
                ["val images", str(numbers["val_images"])], ["data", numbers["data"]],
                ["recipe / model", f"{summary.get('recipe', '-')} / {summary.get('model', '-')}"],
                ["best val top-1 during training", f"{_fmt(summary.get('best_top1'))} (epoch "
                 f"{(summary['best_epoch'] + 1) if summary.get('best_epoch') is not None else '-'}, "
                 f"{summary.get('best_weights', '-')})"]]
    time_rows = [["wall time", duration(tc["wall_time_s"]) if tc["wall_time_s"] is not None else "-"],
                 ["epochs / optimizer steps", f"{tc['epochs']} / {tc['global_step']}"],
                 ["mean epoch time (with evaluation)", duration(tc["mean_epoch_time_s"])
                  if tc["mean_epoch_time_s"] is not None else "-"],
                 ["median throughput", f"{_fmt(tc['median_img_per_s'], '.0f')} img/s"],
                 ["median data-wait fraction", _fmt(tc["median_data_wait"], ".1%")],
                 ["restarts (preemptions, resumes)", str(tc["restarts"])],
                 ["device", tc["device"] or "-"], ["instance type", tc["instance_type"] or "-"],
                 ["cost", f"${tc['cost_usd']:.2f}" if tc["cost_usd"] is not None else "not recorded"]]
    env_rows = [[k, ", ".join(map(str, v)) if isinstance(v, list) else str(v)] for k, v in env.items()]
    per_class_note = "" if len(names) <= 50 else f'<p class="muted">The 20 worst of {len(names)} classes.</p>'
    sections = {
        "overview": ("Overview", _table(None, overview)),
        "curves": ("Training curves", '<img src="curves.png" alt="loss, top-1, learning rate and throughput">'),
        "per-class": ("Per-class accuracy on val", '<img src="per_class_accuracy.png" alt="per-class accuracy">'
                      + per_class_note + _table(["class", "top-1", "images"], class_rows)),
        "confusion": ("Confusion matrix on val", '<img src="confusion_matrix.png" alt="confusion matrix">'
                      + "<p>Most confused pairs:</p>"
                      + (_table(["true", "predicted as", "images"], pair_rows) if pair_rows else "<p>none</p>")),
        "mistakes": ("Most confident mistakes", '<img src="mistakes.png" alt="most confident mistakes">'
                     + (_table(["true", "predicted", "confidence", "file"], mistake_rows) if mistake_rows
                        else "<p>No mistakes on val.</p>")),
        "time-cost": ("Time and cost", _table(None, time_rows)),
        "recipe": ("Recipe", f"<pre>{html.escape(recipe_text)}</pre>"),
        "environment": ("Environment", _table(None, env_rows)),
    }
    body = "\n".join(f'<section id="{key}">\n<h2>{sections[key][0]}</h2>\n{sections[key][1]}\n</section>'
                     for key in SECTIONS)
    title = f"Run report: {html.escape(run_dir.resolve().name)}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>{title}</h1>
<p class="muted">{html.escape(str(run_dir.resolve()))}, written by resnet50-recipe report</p>
{body}
</body>
</html>
"""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
