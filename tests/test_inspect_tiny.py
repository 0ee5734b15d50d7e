"""predict, explain, watch and report on a 2-step run in seconds: inspect/ in the fast tier. test_inspect.py
checks what they say about a model that learned (the trained smoke run, slow)."""
import json
import re

import pytest
from helpers import tiny_overlay
from PIL import Image

from resnet50_recipe import load_recipe, train
from resnet50_recipe.cli import main
from resnet50_recipe.inspect.predict import predict
from resnet50_recipe.inspect.watch import read_run, summarize


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    train(load_recipe("smoke", tiny_overlay(tiny_data)), out, quiet=True)
    return out


def val_images(tiny_data):
    return sorted((tiny_data / "val").glob("*/*.jpg"))


def test_predict_ranks_every_class_from_run_and_export(tiny_run, tiny_data, capsys):
    images = val_images(tiny_data)[:3]
    for source in (tiny_run, tiny_run / "export"):
        results = predict(source, images, top=5)
        assert [r["image"] for r in results] == [str(p) for p in images]
        for r in results:
            probs = [t["prob"] for t in r["top"]]
            assert len(probs) == 3 and probs == sorted(probs, reverse=True)  # 3 classes: top 5 gives 3
            assert sum(probs) == pytest.approx(1, abs=1e-5)
    assert main(["predict", str(tiny_run / "export"), str(images[0]), "--json", "--top", "2"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["image"] == str(images[0]) and len(result["top"]) == 2


def test_explain_writes_an_overlay_at_the_input_size(tiny_run, tiny_data, tmp_path, capsys):
    image = val_images(tiny_data)[0]
    out = tmp_path / "heat.png"
    assert main(["explain", str(tiny_run), str(image), "--out", str(out), "--class", "0"]) == 0
    assert "Grad-CAM for" in capsys.readouterr().out
    with Image.open(out) as written, Image.open(image) as original:
        assert written.format == "PNG" and written.size == original.size


def test_watch_once_on_a_finished_tiny_run(tiny_run, capsys):
    assert main(["watch", str(tiny_run), "--once"]) == 0
    text = capsys.readouterr().out
    assert "finished" in text and "epoch 1/1" in text and "global step 2/2" in text
    assert summarize(read_run(str(tiny_run)))["status"] == "finished"


def test_report_of_a_tiny_run_references_only_files_that_exist(tiny_run, tmp_path, capsys):
    assert main(["report", str(tiny_run), "--out", str(tmp_path / "report")]) == 0
    page = tmp_path / "report" / "index.html"
    text = page.read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', text)
    assert {"curves.png", "per_class_accuracy.png", "confusion_matrix.png"} <= set(refs)
    for ref in refs:
        assert (page.parent / ref).is_file(), ref
    numbers = json.loads((page.parent / "report.json").read_text())
    assert numbers["val_images"] == 12 and sum(map(sum, numbers["confusion"])) == 12
    assert len(numbers["per_class_accuracy"]) == 3
