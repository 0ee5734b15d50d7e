import pytest
import torch
from helpers import free_port

from resnet50_recipe.data.synthetic import generate


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


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The shipped smoke recipe, unchanged but for where it writes, trained once per session (~70 s on 2 cores):
    test_train checks its accuracy; the TensorBoard, predict, explain, watch and report tests inspect it.
    Tests must not change its run directory (copy it first)."""
    from types import SimpleNamespace

    from resnet50_recipe import load_recipe, train

    base = tmp_path_factory.mktemp("smoke")
    recipe = load_recipe("smoke", [f"data.path={base / 'shapes'}"])
    summary = train(recipe, base / "run", quiet=True)
    return SimpleNamespace(dir=base / "run", data=base / "shapes", summary=summary, recipe=recipe)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto in server mode on 127.0.0.1: real HTTP S3, never AWS. Subprocesses inherit the fake credentials."""
    import os

    from moto.server import ThreadedMotoServer

    fake = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in fake}
    os.environ.update(fake)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def bucket(s3_endpoint, request):
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + "-b"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name
