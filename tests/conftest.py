import pytest
import torch

from resnet50_recipe.synthetic import generate


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A real JPEG ImageFolder: 3 classes, 8 train and 4 val images each, 32 px."""
    return generate(tmp_path_factory.mktemp("data") / "tiny", classes=3, per_class=8, val_per_class=4, size=32)


def tiny_overlay(data_dir, **extra) -> list[str]:
    """Shrinks any recipe to a 2-step, 32 px run on generated data: what the recipe tests train."""
    overrides = {
        "data.path": str(data_dir), "data.synthetic": "null", "data.workers": 0,
        "train.epochs": 1, "train.steps_per_epoch": 2, "train.batch_size": 4, "train.accum_steps": 1,
        "augment.train_size": 32, "augment.eval_size": 32, "log.every_steps": 1, "train.device": "cpu",
    }
    overrides.update(extra)
    return [f"{k}={v}" for k, v in overrides.items()]
