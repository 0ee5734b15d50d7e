"""S3 sync against a real S3-compatible HTTP server (moto's server mode on 127.0.0.1), never AWS."""
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import boto3
import pytest

from conftest import free_port, tiny_overlay
from resnet50_recipe import load_recipe, train
from resnet50_recipe.checkpoint import find_latest, read_manifest
from resnet50_recipe.cli import main
from resnet50_recipe.spot import EXIT_PREEMPTED
from resnet50_recipe.storage import RemoteError, S3Store, fetch_latest
from test_resume import assert_same_tree, final_state, last_step, overlay, start, without_timing


def remote_args(bucket, endpoint, run):
    return {"checkpoint.remote": f"s3://{bucket}/runs/{run}", "checkpoint.endpoint_url": endpoint}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from resnet50_recipe.synthetic import generate
    return generate(tmp_path_factory.mktemp("data") / "shapes", classes=4, per_class=48, val_per_class=8, size=32)


def test_fresh_machine_resume_from_s3_is_bitwise_identical(data, bucket, s3_endpoint, tmp_path):
    reference = start(tmp_path / "reference", overlay(data))
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    out = tmp_path / "spot"
    args = overlay(data, **remote_args(bucket, s3_endpoint, "spot"))
    first = start(out, args)
    while last_step(out) < 30 and first.poll() is None:
        time.sleep(0.01)
    first.send_signal(signal.SIGTERM)
    output = first.communicate(timeout=120)[0]
    assert first.returncode == EXIT_PREEMPTED, output
    assert f"uploaded to s3://{bucket}/runs/spot in" in output

    shutil.rmtree(out)  # the instance is gone, and its disk with it
    second = start(out, args)
    output = second.communicate(timeout=300)[0]
    assert second.returncode == 0, output
    assert "fetched s3://" in output and "resuming from" in output

    a, b = final_state(tmp_path / "reference"), final_state(out)
    for key in ("model", "ema", "optimizer", "scheduler", "loop", "rng", "global_step"):
        assert_same_tree(a[key], b[key], key)
    assert without_timing(a["metrics"]) == without_timing(b["metrics"])
    store = S3Store(f"s3://{bucket}/runs/spot", s3_endpoint)
    names = set(store.list())
    for name in ("metrics.jsonl", "recipe.yaml", "env.json", "curves.png", "summary.json", "export/config.json"):
        assert name in names, name
    assert json.loads(store.client.get_object(Bucket=bucket, Key="runs/spot/summary.json")["Body"].read())[
        "failed_uploads"] == []


def test_server_down_mid_upload_training_goes_on_and_the_pointer_stays_valid(tiny_data, s3_endpoint, tmp_path,
                                                                           caplog):  # s3_endpoint: credentials
    from moto.server import ThreadedMotoServer

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="flaky-bucket")
    violations, seen = [], []
    done = threading.Event()

    def check_pointer():
        """Whenever the pointer can be read, the object it names must be complete."""
        while not done.is_set():
            try:
                pointer = json.loads(client.get_object(Bucket="flaky-bucket", Key="r/checkpoints/latest.json")[
                    "Body"].read())
                head = client.head_object(Bucket="flaky-bucket", Key=f"r/checkpoints/{pointer['file']}")
                seen.append(pointer["step"])
                if head["ContentLength"] != pointer["size"]:
                    violations.append(pointer)
            except Exception:
                pass  # server down, or nothing uploaded yet
            time.sleep(0.05)

    restarted = []

    def outage():
        while not seen:
            time.sleep(0.05)
        server.stop()  # in the middle of the run's uploads
        time.sleep(2)
        restarted.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
        restarted[0].start()  # moto keeps its in-memory state across the restart, as a real store keeps its disk

    threads = [threading.Thread(target=check_pointer, daemon=True), threading.Thread(target=outage, daemon=True)]
    for thread in threads:
        thread.start()
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **{
        "checkpoint.remote": "s3://flaky-bucket/r", "checkpoint.endpoint_url": endpoint, "train.epochs": 10,
        "train.steps_per_epoch": 4, "train.batch_size": 2, "checkpoint.every_steps": 1}))
    summary = train(recipe, tmp_path / "run", quiet=True)
    done.set()
    assert "upload to s3://flaky-bucket/r failed" in caplog.text  # the outage hit while the run was uploading
    assert not summary["stopped"] and summary["global_step"] == 40  # training went on through the outage
    assert violations == [] and len(set(seen)) > 1
    pointer = json.loads(client.get_object(Bucket="flaky-bucket", Key="r/checkpoints/latest.json")["Body"].read())
    assert pointer["step"] == 40  # the uploads completed after the restart
    body = client.get_object(Bucket="flaky-bucket", Key=f"r/checkpoints/{pointer['file']}")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == pointer["sha256"]
    restarted[0].stop()


def test_a_corrupted_remote_checkpoint_is_detected_and_the_previous_used(tiny_data, bucket, s3_endpoint, tmp_path,
                                                                         caplog):
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **remote_args(bucket, s3_endpoint, "c"),
                                               **{"checkpoint.every_steps": 1, "train.steps_per_epoch": 3}))
    train(recipe, tmp_path / "run", quiet=True)
    store = S3Store(f"s3://{bucket}/runs/c", s3_endpoint)
    pointer, _ = store.get_json("checkpoints/latest.json")
    key = store.key(f"checkpoints/{pointer['file']}")
    body = bytearray(store.client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF  # same size, one byte altered
    store.client.put_object(Bucket=bucket, Key=key, Body=bytes(body))

    fresh = tmp_path / "fresh" / "checkpoints"
    assert fetch_latest(store, fresh, newer_than=-1, keep_last=2)
    assert f"checkpoints/{pointer['file']} is corrupt" in caplog.text
    path, state = find_latest(fresh)
    assert state["global_step"] == pointer["checkpoints"][-2]["step"] < pointer["step"]


def test_wrong_bucket_or_unreachable_store_fails_fast(tiny_data, s3_endpoint, tmp_path):
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **{"checkpoint.remote": "s3://no-such-bucket-here/x",
                                                             "checkpoint.endpoint_url": s3_endpoint}))
    with pytest.raises(RemoteError, match="bucket 'no-such-bucket-here' does not exist"):
        train(recipe, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()  # failed before any work
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RemoteError, match="cannot reach the store"):
        S3Store("s3://some-bucket/x", closed).preflight()


def test_missing_credentials_fail_with_a_clear_message(tiny_data, s3_endpoint, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
           "AWS_CONFIG_FILE": "/nonexistent", "AWS_DEFAULT_REGION": "us-east-1", "HOME": str(tmp_path)}
    args = [sys.executable, "-m", "resnet50_recipe", "train", "smoke", "--output", str(tmp_path / "run"),
            "--remote", "s3://any-bucket/x"]
    for item in tiny_overlay(tiny_data, **{"checkpoint.endpoint_url": s3_endpoint}):
        args += ["--set", item]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "no AWS credentials found" in done.stderr and "testing" not in done.stderr + done.stdout


def test_runs_ls_and_pull(tiny_data, bucket, s3_endpoint, tmp_path, capsys):
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **remote_args(bucket, s3_endpoint, "listed")))
    summary = train(recipe, tmp_path / "run", quiet=True)
    assert main(["runs", "ls", f"s3://{bucket}/runs", "--endpoint-url", s3_endpoint]) == 0
    listing = capsys.readouterr().out
    assert f"s3://{bucket}/runs/listed  epoch 1  step 2  top-1 {summary['top1']:.4f}" in listing
    assert "finished" in listing
    assert main(["runs", "pull", f"s3://{bucket}/runs/listed", str(tmp_path / "pulled"),
                 "--endpoint-url", s3_endpoint]) == 0
    pulled = tmp_path / "pulled"
    assert read_manifest(pulled / "checkpoints")["step"] == 2
    assert (pulled / "metrics.jsonl").read_text() == (tmp_path / "run" / "metrics.jsonl").read_text()
    assert (pulled / "export" / "model.safetensors").is_file()


def test_missing_permission_fails_fast_with_a_clear_message(tiny_data, tmp_path):
    """moto with IAM enforced (after 4 set-up calls): a user who may read but not write the bucket."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    admin = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, **admin, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        setup = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing")
        boto3.client("s3", **setup).create_bucket(Bucket="locked-bucket")
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        args = [sys.executable, "-m", "resnet50_recipe", "train", "smoke", "--output", str(tmp_path / "run"),
                "--remote", "s3://locked-bucket/runs/x"]
        for item in tiny_overlay(tiny_data, **{"checkpoint.endpoint_url": endpoint}):
            args += ["--set", item]
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert done.returncode == 2, done.stderr
    assert "s3://locked-bucket/runs/x: not allowed to write there (AccessDenied)" in done.stderr
    assert key["SecretAccessKey"] not in done.stderr + done.stdout
    assert not (tmp_path / "run").exists()
