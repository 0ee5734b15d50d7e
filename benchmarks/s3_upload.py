"""Against the 120 s spot notice: how long a full ResNet-50 checkpoint takes to reach S3, and how long from a
stop request to "checkpoint uploaded". The store is moto's S3 server on 127.0.0.1 (no network), so this
measures our pipeline (snapshot, local write, hash, multipart upload with a CRC64NVME, checksum check against
the CRC computed in the sha256 pass, sidecar, conditional pointer put),
not a real link; on EC2 add the size divided by the instance's bandwidth to S3.

    python benchmarks/s3_upload.py [--trials 3]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import boto3
import torch
from moto.server import ThreadedMotoServer

from resnet50_recipe import load_recipe
from resnet50_recipe.store.checkpoints import Writer
from resnet50_recipe.store.s3 import S3Store
from resnet50_recipe.store.uploader import Uploader
from resnet50_recipe.trainer.run import Progress
from resnet50_recipe.trainer.runtime import setup
from resnet50_recipe.trainer.state import snapshot
from resnet50_recipe.trainer.step import build_trainer, train_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")

    recipe = load_recipe("imagenet-100ep", ["train.device=cpu", "ema.enabled=true", "optim.opt=sgd",
                                           "train.batch_size=2", "augment.train_size=64"])
    rt = setup(recipe.train, recipe.seed)
    t = build_trainer(recipe, rt, num_classes=1000, updates_per_epoch=10)
    batch = (torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), torch.randint(0, 1000, (2,)), [])
    train_steps(t, [batch], epoch=0, num_batches=1, log=lambda r: None)

    uploads, stops, size = [], [], 0
    for trial in range(args.trials):
        run = Path(tempfile.mkdtemp(prefix="s3-bench-"))
        store = S3Store(f"s3://bench/run-{trial}", endpoint)
        uploader = Uploader(store, run, keep_last=2)
        writer = Writer(run / "checkpoints", keep_last=2, on_commit=uploader.submit)
        t.global_step = trial + 1
        stop_requested = time.perf_counter()  # as the loop does on a stop: snapshot, write, upload, wait
        writer.submit(snapshot(t, 0, 0, Progress(), [str(i) for i in range(1000)]))
        writer.drain()
        uploader.drain(600)
        stops.append(time.perf_counter() - stop_requested)
        uploads.append(uploader.last_upload_s)
        size = writer.last["size"]
        uploader.close()
        shutil.rmtree(run)
    server.stop()
    print(json.dumps({"state_mb": round(size / 2**20, 1), "trials": args.trials,
                      "upload_s": round(statistics.median(uploads), 2),
                      "stop_to_uploaded_s": round(statistics.median(stops), 2),
                      "notice_s": 120}))


if __name__ == "__main__":
    main()
