"""Watching and inspecting runs: TensorBoard and W&B trackers, watch, predict, explain (Grad-CAM), report."""
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from helpers import tiny_overlay
from PIL import Image

from resnet50_recipe import load_recipe, train
from resnet50_recipe.cli import main
from resnet50_recipe.data.synthetic import SHAPES, draw_sample
from resnet50_recipe.inspect.predict import class_index, explain, grad_cam, load_classifier, predict
from resnet50_recipe.inspect.watch import read_run, summarize
from resnet50_recipe.store.checkpoints import read_manifest
from resnet50_recipe.trainer.runlog import read_metrics


def scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return events, [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_holds_the_logged_scalars_and_sample_images(smoke_run):
    records = read_metrics(smoke_run.dir / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    events, loss = scalars(smoke_run.dir / "tensorboard", "step/loss")
    assert loss == [(r["global_step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    for tag, key, source in (("step/lr", "lr", steps), ("step/img_per_s", "img_per_s", steps),
                             ("step/data_wait", "data_wait", steps), ("epoch/top1", "top1", epochs),
                             ("epoch/ema_top1", "ema_top1", epochs), ("epoch/train_loss", "train_loss", epochs)):
        assert [v for _, v in scalars(smoke_run.dir / "tensorboard", tag)[1]] == \
            [pytest.approx(r[key], rel=1e-6, abs=1e-12) for r in source], tag
    image = events.Images("train/augmented_samples")[0]
    assert image.step == 0 and image.width > 64 and image.height > 64
    assert json.loads(events.Tensors("summary/text_summary")[0].tensor_proto.string_val[0].decode()
                      .strip("`\n"))["top1"] == smoke_run.summary["top1"]


def test_a_resume_replaces_the_steps_logged_after_its_checkpoint(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **{
        "train.steps_per_epoch": 4, "checkpoint.every_steps": 2, "checkpoint.keep_last": 3}))
    out = tmp_path / "run"
    train(recipe, out, quiet=True)
    folder = out / "checkpoints"
    at_step_2 = folder / next(e["file"] for e in read_manifest(folder)["checkpoints"] if e["step"] == 2)
    # As after a crash at step 4: steps 3 and 4 are in the event file, the newest checkpoint is step 2's.
    train(recipe, out, quiet=True, resume=str(at_step_2))
    _, loss = scalars(out / "tensorboard", "step/loss")
    steps = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"]
    assert [s for s, _ in loss] == [r["global_step"] for r in steps] == [1, 2, 3, 4]
    files = sorted((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2
    # What TensorBoard hides the first process's steps 3 and 4 by: a session start at the purge step.
    starts = [e.step for e in EventFileLoader(str(files[1])).Load() if e.HasField("session_log")]
    assert starts == [3]
    assert [r["global_step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "start"] == [0, 2]


def test_wandb_offline_resumes_the_same_run(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **{"log.wandb": "true", "log.tensorboard": "false",
                                                              "train.steps_per_epoch": 4, "checkpoint.every_steps": 2}))
    out = tmp_path / "run"
    train(recipe, out, quiet=True)
    run_id = json.loads((out / "wandb.json").read_text())["id"]
    folder = out / "checkpoints"
    at_step_2 = folder / next(e["file"] for e in read_manifest(folder)["checkpoints"] if e["step"] == 2)
    train(recipe, out, quiet=True, resume=str(at_step_2))
    assert json.loads((out / "wandb.json").read_text())["id"] == run_id
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(f"-{run_id}") for run in runs)
    assert list((runs[0] / "files" / "media" / "images" / "train").glob("augmented_samples_*.png"))
    for run in runs:  # the scalars are in W&B's own record file, under our names
        assert b"step/loss" in (run / f"run-{run_id}.wandb").read_bytes()
    assert not (out / "tensorboard").exists()


def test_predict_names_the_right_class_from_checkpoint_and_export(smoke_run, capsys):
    images = [p for shape in SHAPES for p in sorted((smoke_run.data / "val" / shape).glob("*.jpg"))[:2]]
    checkpoint = smoke_run.dir / "checkpoints" / read_manifest(smoke_run.dir / "checkpoints")["file"]
    for source in (checkpoint, smoke_run.dir / "export"):
        results = predict(source, images)
        right = sum(r["top"][0]["label"] == os.path.basename(os.path.dirname(r["image"])) for r in results)
        assert right >= 0.9 * len(images), (source, results)
        for r in results:
            probs = [t["prob"] for t in r["top"]]
            assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert main(["predict", str(smoke_run.dir / "export"), str(images[0]), "--json", "--top", "2"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["image"] == str(images[0]) and len(result["top"]) == 2
    assert result["top"][0]["label"] == SHAPES[0]
    assert main(["predict", str(smoke_run.dir / "export"), str(smoke_run.dir / "missing.jpg")]) == 2
    assert "missing.jpg: image not found" in capsys.readouterr().err
    assert main(["predict", str(smoke_run.dir / "nothing"), str(images[0])]) == 2
    assert "nothing: not found; pass a checkpoint file, a run directory or an export folder" in \
        capsys.readouterr().err


def test_explain_heat_lies_on_the_shape(smoke_run, tmp_path):
    """Shapes drawn at known positions, as the dataset draws them but from unseen seeds: Grad-CAM puts more
    heat per pixel on the shape than on the background for most of them."""
    clf = load_classifier(smoke_run.dir)
    inside, outside = [], []
    for label, shape in enumerate(SHAPES):
        for i in range(3):
            image, mask = draw_sample(shape, 64, np.random.default_rng([2026, label, i]))
            heat, index, _ = grad_cam(clf, image, target=class_index(clf, shape))
            assert heat.shape == mask.shape and heat.max() <= 1.0 and clf.classes[index] == shape
            inside.append(heat[mask > 0.5].mean())
            outside.append(heat[mask < 0.5].mean())
    inside, outside = np.array(inside), np.array(outside)
    assert (inside > outside).mean() >= 0.7, list(zip(inside.round(2), outside.round(2)))
    assert inside.mean() > 1.1 * outside.mean()
    # explain() draws its overlay from the same map.
    image.save(tmp_path / "last.png")
    result = explain(smoke_run.dir, tmp_path / "last.png", tmp_path / "heat.png", target=shape)
    np.testing.assert_allclose(result["heat"], heat, atol=1e-6)
    with Image.open(tmp_path / "heat.png") as written:
        assert written.size == image.size


def test_explain_cli_writes_an_overlay_at_the_input_size(smoke_run, tmp_path, capsys):
    image, _ = draw_sample("star", 80, np.random.default_rng(5), center=(0.6, 0.5), radius=0.3)
    wide = Image.new("RGB", (120, 80), (30, 30, 30))
    wide.paste(image, (20, 0))
    wide.save(tmp_path / "wide.jpg")
    out = tmp_path / "heat" / "star.png"
    assert main(["explain", str(smoke_run.dir / "export"), str(tmp_path / "wide.jpg"), "--out", str(out)]) == 0
    assert "Grad-CAM for" in capsys.readouterr().out
    with Image.open(out) as written:
        assert written.format == "PNG" and written.size == (120, 80)
    assert main(["explain", str(smoke_run.dir), str(tmp_path / "wide.jpg"), "--out", str(out), "--class", "7"]) == 0
    assert "Grad-CAM for star (7," in capsys.readouterr().out
    assert main(["explain", str(smoke_run.dir), str(tmp_path / "wide.jpg"), "--out", str(out),
                 "--class", "hexagon"]) == 2
    assert "--class 'hexagon': no class of that name" in capsys.readouterr().err


def test_watch_once_on_a_finished_run(smoke_run, capsys):
    assert main(["watch", str(smoke_run.dir), "--once"]) == 0
    text = capsys.readouterr().out
    assert "finished" in text and "epoch 16/16" in text and "global step 736/736" in text
    assert f"val top-1 {smoke_run.summary['top1']:.4f}" in text
    assert re.search(r"last checkpoint ckpt-000000736\.pt \(epoch 16, step 736\), \d+ (s|min)", text)
    assert "ETA" not in text and "cost" not in text


def test_watch_a_running_run_in_s3_with_cost(smoke_run, s3_endpoint, bucket, tmp_path, capsys):
    from resnet50_recipe.store.s3 import S3Store

    # The run as it stood at step 300 of 736, on an instance whose records carry cost (issue 7's fields).
    records = [r for r in read_metrics(smoke_run.dir / "metrics.jsonl") if r["global_step"] <= 300]
    records[-1].update(cost_usd=0.4213, instance_type="g5.xlarge", price_usd_per_h=0.5)
    records[0].update(budget_usd=1.5)  # train.budget_usd, as the start line records it
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = read_manifest(smoke_run.dir / "checkpoints")
    (run / "checkpoints" / "latest.json").write_text(json.dumps({**manifest, "file": "ckpt-000000230.pt",
                                                                  "step": 230, "epoch": 5}))
    store = S3Store(f"s3://{bucket}/runs/smoke", s3_endpoint)
    store.upload_file(run / "metrics.jsonl", "metrics.jsonl")
    store.upload_file(run / "checkpoints" / "latest.json", "checkpoints/latest.json")

    assert main(["watch", f"s3://{bucket}/runs/smoke", "--once", "--endpoint-url", s3_endpoint]) == 0
    text = capsys.readouterr().out
    step = records[-1]
    assert "running" in text and f"epoch {step['epoch'] + 1}/16  step {step['step']}/46" in text
    assert f"loss {step['loss']:.4f}" in text and "ETA " in text and "GPU" not in text
    assert "last checkpoint ckpt-000000230.pt (epoch 5, step 230)" in text
    assert "cost so far $0.42 on g5.xlarge, ~$" in text and "projected at the end ($0.5000/h now)" in text
    assert "budget $1.50: $1.08 left" in text
    # The same run read locally gives the same view, and an ETA from the mean of the last epochs' times.
    snap = summarize(read_run(str(run)))
    epochs = [r for r in records if r["kind"] == "epoch"][-3:]
    expected = (736 - step["global_step"]) * np.mean([r["epoch_time_s"] for r in epochs]) / 46
    assert snap["status"] == "running" and snap["eta_s"] == pytest.approx(expected)
    projected = 0.4213 + 0.5 * expected / 3600  # spent, plus the price now for the hours the ETA gives
    assert f"~${projected:.2f} projected at the end" in text
    assert main(["watch", str(tmp_path / "nothing"), "--once"]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smoke_report(smoke_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(smoke_run.dir, run, ignore=shutil.ignore_patterns("export"))
    assert main(["report", str(run)]) == 0
    return run


def test_report_references_only_files_that_exist(smoke_report, smoke_run):
    page = smoke_report / "report" / "index.html"
    text = page.read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', text)
    assert {"curves.png", "per_class_accuracy.png", "confusion_matrix.png", "mistakes.png"} <= set(refs)
    for ref in refs:
        assert not re.match(r"[a-z]+:", ref), ref  # nothing fetched from anywhere: the page works offline
        assert (page.parent / ref).is_file(), ref
    for section in ("overview", "curves", "per-class", "confusion", "mistakes", "time-cost", "recipe", "environment"):
        assert f'<section id="{section}">' in text
    numbers = json.loads((page.parent / "report.json").read_text())
    recorded = [r for r in read_metrics(smoke_run.dir / "metrics.jsonl") if r["kind"] == "epoch"][-1]
    assert numbers["val_images"] == 500
    assert abs(numbers["top1"] - recorded["ema_top1" if numbers["weights"] == "ema" else "top1"]) <= 1 / 500
    assert len(numbers["per_class_accuracy"]) == 10 and sum(map(sum, numbers["confusion"])) == 500
    assert all(m["true"] != m["predicted"] for m in numbers["mistakes"])
    assert not list(smoke_report.glob(".report.tmp*"))


def test_export_model_card_reuses_the_report_figures(smoke_report, tmp_path):
    assert main(["export", str(smoke_report), str(tmp_path / "export")]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    for name in ("per_class_accuracy.png", "confusion_matrix.png", "mistakes.png"):
        assert (tmp_path / "export" / name).read_bytes() == (smoke_report / "report" / name).read_bytes()
        assert f"]({name})" in card


def test_chromium_renders_the_report(smoke_report, tmp_path):
    """Debian's chromium, headless: the page renders to a PNG and its DOM has every section."""
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing; .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    page = (smoke_report / "report" / "index.html").resolve().as_uri()
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,3000", page], check=True, timeout=120,
                   capture_output=True)
    with Image.open(shot) as image:
        assert image.size == (1200, 3000)
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 20  # text and figures, not a blank page
    dom = subprocess.run(flags + ["--dump-dom", page], check=True, timeout=120, capture_output=True, text=True).stdout
    for section, heading in (("overview", "Overview"), ("curves", "Training curves"),
                             ("per-class", "Per-class accuracy on val"), ("confusion", "Confusion matrix on val"),
                             ("mistakes", "Most confident mistakes"), ("time-cost", "Time and cost"),
                             ("recipe", "Recipe"), ("environment", "Environment")):
        assert re.search(rf'<section id="{section}">\s*<h2>{heading}</h2>', dom), section
    assert dom.count("<img ") == 4
