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
from helpers import (
    MetadataStandIn,
    assert_same_tree,
    final_state,
    free_port,
    last_step,
    overlay,
    remote_args,
    start,
    tiny_overlay,
    without_timing,
)

from resnet50_recipe import load_recipe, train
from resnet50_recipe.cli import main
from resnet50_recipe.errors import EXIT_PREEMPTED
from resnet50_recipe.store.checkpoints import find_latest, read_manifest
from resnet50_recipe.store.lineage import fetch_latest
from resnet50_recipe.store.s3 import RemoteError, RemoteUnavailable, S3Store


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from resnet50_recipe.data.synthetic import generate
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


def test_server_down_mid_upload_training_goes_on_and_the_pointer_stays_valid(tiny_data, s3_endpoint,
                                                                           tmp_path):  # s3_endpoint: credentials
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

    restarted, stopped = [], []

    def outage():
        while not seen:
            time.sleep(0.05)
        server.stop()  # in the middle of the run's uploads
        stopped.append(time.monotonic())
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
    finished = time.monotonic()
    done.set()
    # The outage hit while the run was uploading. Whether an upload failed, or boto3's own retries carried it,
    # depends on botocore's backoff: 5 attempts span about 1.4 s in botocore 1.44, up to 20 s in 1.36.
    assert stopped and stopped[0] < finished
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
    closed = f"http://127.0.0.1:{free_port()}"  # a network error may pass: exit 75 after the retry window
    with pytest.raises(RemoteUnavailable, match="the store kept failing for 0 s .*Could not connect"):
        S3Store("s3://some-bucket/x", closed).preflight(retry_s=0)


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


def test_on_ec2_a_slow_instance_role_is_waited_for_not_refused(tiny_data, bucket, s3_endpoint, tmp_path):
    """On EC2 the credentials come from the instance role, through the metadata service, which botocore asks with
    a 1 s timeout and one attempt. A busy metadata service then means NoCredentialsError: transient there, so
    the start waits for it (preflight's retry window) instead of exiting 2, which terminates the instance."""
    from http.server import ThreadingHTTPServer

    class SlowRole(MetadataStandIn):
        role, stalls, stall_s, requests = "resnet50-recipe-run", 2, 2.5, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowRole)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # The instance's environment: no keys, the metadata service enabled (the s3_endpoint fixture sets both).
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_SERVICE_ENDPOINT=f"http://127.0.0.1:{server.server_port}/",
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent",
               AWS_DEFAULT_REGION="us-east-1", HOME=str(tmp_path))
    args = [sys.executable, "-m", "resnet50_recipe", "train", "smoke", "--output", str(tmp_path / "run"),
            "--remote", f"s3://{bucket}/runs/role"]
    for item in tiny_overlay(tiny_data, **{"checkpoint.endpoint_url": s3_endpoint, "export.enabled": "false"}):
        args += ["--set", item]
    try:
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    assert SlowRole.stalls == 0 and "/latest/meta-data/iam/security-credentials/resnet50-recipe-run" in \
        SlowRole.requests  # the role's keys were read, after the stalls
    assert S3Store(f"s3://{bucket}/runs/role", s3_endpoint).manifest()[0]["step"] == 2


def test_on_ec2_a_role_that_never_answers_exits_75_and_off_ec2_no_credentials_exit_2(s3_endpoint, monkeypatch):
    from http.server import ThreadingHTTPServer

    from resnet50_recipe.store.s3 import RemoteRefused

    class NoRole(MetadataStandIn):  # an instance without a role: 404 where the credentials would be
        requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), NoRole)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{server.server_port}/")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it caches the credentials an earlier test resolved
    try:
        with pytest.raises(RemoteUnavailable, match="kept failing for 2 s .*Unable to locate credentials"):
            S3Store("s3://any-bucket/x", s3_endpoint, on_ec2=lambda: True).preflight(retry_s=2)
        with pytest.raises(RemoteRefused, match="no AWS credentials found"):
            S3Store("s3://any-bucket/x", s3_endpoint, on_ec2=lambda: False).preflight(retry_s=60)
    finally:
        server.shutdown()
    assert "/latest/meta-data/iam/security-credentials/" in NoRole.requests


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


# ---------------------------------------------------------------------------------------------------------
# Real buckets: checksums, AWS's permission semantics, transient faults, stray objects, safe pulls (issue 17).
# The stand-ins for what moto does not model are botocore event hooks on the clients the code creates.


@pytest.fixture
def default_session_hooks():
    """Hooks registered here reach every client the code creates afterwards through boto3.client(...)."""
    boto3.setup_default_session()
    yield boto3.DEFAULT_SESSION.events
    boto3.DEFAULT_SESSION = None


def missing_key_is_403(parsed, http_response, **kwargs):
    """AWS answers a HEAD or GET of a missing key with 403 when the caller may not list the whole bucket."""
    if http_response.status_code == 404:
        parsed["Error"] = {"Code": "403", "Message": "Forbidden"}
        parsed["ResponseMetadata"]["HTTPStatusCode"] = 403


def local_checkpoint(run_dir, step, size, lineage):
    """A committed local "checkpoint" of random bytes: the uploader moves bytes, whatever they are."""
    from resnet50_recipe.store.checkpoints import checkpoint_name, commit, sha256_of

    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / checkpoint_name(step)
    path.write_bytes(os.urandom(size))
    entry = {"file": path.name, "step": step, "epoch": 0, "sha256": sha256_of(path), "size": size}
    return commit(folder, entry, None, keep_last=2, lineage=lineage)


def crc64nvme(data: bytes) -> str:
    import base64

    from awscrt.checksums import crc64nvme as crc
    return base64.b64encode(crc(data).to_bytes(8, "big")).decode()


def test_uploads_carry_a_full_object_crc64nvme(bucket, s3_endpoint, tmp_path):
    from boto3.s3.transfer import TransferConfig

    from resnet50_recipe.store.checkpoints import new_lineage
    from resnet50_recipe.store.uploader import Uploader

    store = S3Store(f"s3://{bucket}/r", s3_endpoint)
    store.preflight()
    assert store.crc64
    store.transfer = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)  # 3 parts
    lineage = new_lineage()
    uploader = Uploader(store, tmp_path, keep_last=2, lineage=lineage)
    for step, size in ((1, 11 * 2**20), (2, 1000)):  # multipart, then a single put
        uploader.submit(local_checkpoint(tmp_path, step, size, lineage))
        assert uploader.drain(120) and not uploader.failed
        name = f"ckpt-{step:09d}.pt"
        head = store.client.head_object(Bucket=bucket, Key=f"r/checkpoints/{name}", ChecksumMode="ENABLED")
        assert head["ChecksumCRC64NVME"] == crc64nvme((tmp_path / "checkpoints" / name).read_bytes())
    uploader.close()
    pointer, _ = store.get_json("checkpoints/latest.json")
    assert pointer["step"] == 2 and [e["step"] for e in pointer["checkpoints"]] == [1, 2]


def test_an_object_rewritten_after_upload_is_caught(bucket, s3_endpoint, tmp_path, caplog):
    from resnet50_recipe.store.checkpoints import new_lineage
    from resnet50_recipe.store.uploader import Uploader

    store = S3Store(f"s3://{bucket}/r", s3_endpoint)
    other = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    key = "r/checkpoints/ckpt-000000001.pt"
    rewritten = []

    def behind_the_uploaders_back(params, **kwargs):  # once: between the upload and its verification
        if params["Key"] == key and not rewritten:
            rewritten.append(True)
            other.put_object(Bucket=bucket, Key=key, Body=os.urandom(4096), ChecksumAlgorithm="CRC64NVME")

    store.client.meta.events.register("before-parameter-build.s3.HeadObject", behind_the_uploaders_back)
    lineage = new_lineage()
    uploader = Uploader(store, tmp_path, keep_last=2, lineage=lineage)
    uploader.submit(local_checkpoint(tmp_path, 1, 4096, lineage))  # same size as the rewrite
    assert uploader.drain(60)
    uploader.close()
    assert rewritten and "the uploaded object does not match the local file" in caplog.text
    body = other.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert body == (tmp_path / "checkpoints" / "ckpt-000000001.pt").read_bytes()  # uploaded again, then named
    assert store.get_json("checkpoints/latest.json")[0]["step"] == 1


def test_a_store_without_flexible_checksums_falls_back_to_reading_back(bucket, s3_endpoint, tmp_path, caplog):
    import logging

    from resnet50_recipe.store.checkpoints import new_lineage
    from resnet50_recipe.store.uploader import Uploader

    caplog.set_level(logging.INFO, logger="resnet50_recipe")
    store = S3Store(f"s3://{bucket}/r", s3_endpoint)

    def strip_checksums(parsed, **kwargs):  # an older MinIO: the headers are not there
        for k in [k for k in parsed if k.startswith("Checksum")]:
            del parsed[k]

    reads = []
    store.client.meta.events.register("after-call.s3.HeadObject", strip_checksums)
    store.client.meta.events.register("before-parameter-build.s3.GetObject",
                                      lambda params, **kw: reads.append(params["Key"]))
    store.preflight()
    assert not store.crc64
    lineage = new_lineage()
    uploader = Uploader(store, tmp_path, keep_last=2, lineage=lineage)
    for step in (1, 2):
        uploader.submit(local_checkpoint(tmp_path, step, 3000, lineage))
        assert uploader.drain(60) and not uploader.failed
    uploader.close()
    assert caplog.text.count("verified by reading them back") == 1
    assert caplog.text.count("the store keeps no CRC64NVME checksums") == 1
    assert reads.count("r/checkpoints/ckpt-000000001.pt") == 1 and reads.count("r/checkpoints/ckpt-000000002.pt") == 1
    assert store.get_json("checkpoints/latest.json")[0]["step"] == 2


def test_head_of_a_missing_key_is_403_a_fresh_run_uploads_and_a_fresh_machine_resumes(
        default_session_hooks, tiny_data, bucket, s3_endpoint, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="resnet50_recipe")
    for operation in ("HeadObject", "GetObject"):
        default_session_hooks.register(f"after-call.s3.{operation}", missing_key_is_403)
    args = tiny_overlay(tiny_data, **remote_args(bucket, s3_endpoint, "forbidden"),
                        **{"checkpoint.every_steps": 1, "train.steps_per_epoch": 3})
    first = train(load_recipe("smoke", args), tmp_path / "first", quiet=True)
    assert first["global_step"] == 3 and "failed" not in caplog.text
    store = S3Store(f"s3://{bucket}/runs/forbidden", s3_endpoint)
    assert store.get_json("checkpoints/latest.json")[0]["step"] == 3
    second = train(load_recipe("smoke", args + ["train.epochs=2"]), tmp_path / "fresh", quiet=True,
                   allow_recipe_change=True)
    assert "fetched s3://" in caplog.text and second["global_step"] == 6
    assert (tmp_path / "fresh" / "metrics.jsonl").read_text().startswith(
        (tmp_path / "first" / "metrics.jsonl").read_text())  # pulled, then continued


class Storm:
    """A store answering 503 SlowDown to its first `count` requests (every request when count is None)."""

    def __init__(self, count=None):
        self.count, self.seen = count, 0

    def __call__(self, request, **kwargs):
        from botocore.awsrequest import AWSResponse

        self.seen += 1
        if self.count is not None and self.seen > self.count:
            return None
        body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        raw = type("Raw", (), {"stream": lambda self, **kw: iter([body])})()
        return AWSResponse(request.url, 503, {"Content-Type": "application/xml"}, raw)


def test_a_5xx_storm_at_start_up_is_retried_then_exits_75_and_no_such_bucket_exits_2(
        default_session_hooks, tiny_data, bucket, s3_endpoint, tmp_path, capsys):
    def run(out, remote, *extra):
        argv = ["train", "smoke", "--output", str(tmp_path / out), "--remote", remote, "--quiet"]
        for item in tiny_overlay(tiny_data, **{"checkpoint.endpoint_url": s3_endpoint}) + list(extra):
            argv += ["--set", item]
        return main(argv)

    storm = Storm()
    default_session_hooks.register("before-send.s3", storm)
    assert run("down", f"s3://{bucket}/down", "checkpoint.startup_retry_s=1") == EXIT_PREEMPTED
    assert "kept failing for 1 s" in capsys.readouterr().err and storm.seen >= 5  # boto3's retries, then ours
    assert not (tmp_path / "down").exists()
    default_session_hooks.unregister("before-send.s3", storm)

    passing = Storm(count=6)  # more than boto3's 5 attempts of one request: our outer retry carries it
    default_session_hooks.register("before-send.s3", passing)
    assert run("blip", f"s3://{bucket}/blip") == 0
    assert "the store is not answering" in capsys.readouterr().err and passing.seen > 6
    default_session_hooks.unregister("before-send.s3", passing)

    assert run("nobucket", "s3://no-such-bucket-17/x") == 2
    assert "bucket 'no-such-bucket-17' does not exist" in capsys.readouterr().err


def test_fetch_falls_back_past_a_listed_but_deleted_newest_object(default_session_hooks, tiny_data, bucket,
                                                                  s3_endpoint, tmp_path, caplog):
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **remote_args(bucket, s3_endpoint, "gone"),
                                               **{"checkpoint.every_steps": 1, "train.steps_per_epoch": 3}))
    train(recipe, tmp_path / "run", quiet=True)
    for operation in ("HeadObject", "GetObject"):  # as on AWS, under the run role
        default_session_hooks.register(f"after-call.s3.{operation}", missing_key_is_403)
    store = S3Store(f"s3://{bucket}/runs/gone", s3_endpoint)
    pointer, _ = store.get_json("checkpoints/latest.json")
    store.delete(f"checkpoints/{pointer['file']}")
    fresh = tmp_path / "fresh" / "checkpoints"
    assert fetch_latest(store, fresh, newer_than=-1, keep_last=2)
    assert f"checkpoints/{pointer['file']} is listed but gone" in caplog.text
    assert find_latest(fresh)[1]["global_step"] == pointer["checkpoints"][-2]["step"]


def test_with_the_remote_pointer_deleted_a_fresh_machine_resumes_from_the_newest_verified_checkpoint(
        tiny_data, bucket, s3_endpoint, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="resnet50_recipe")
    args = tiny_overlay(tiny_data, **remote_args(bucket, s3_endpoint, "lost"),
                        **{"checkpoint.every_steps": 1, "train.steps_per_epoch": 3, "checkpoint.keep_last": 2})
    train(load_recipe("smoke", args), tmp_path / "run", quiet=True)
    store = S3Store(f"s3://{bucket}/runs/lost", s3_endpoint)
    pointer, _ = store.get_json("checkpoints/latest.json")
    assert [e["step"] for e in pointer["checkpoints"]] == [2, 3]
    store.delete("checkpoints/latest.json")
    key = store.key(f"checkpoints/{pointer['file']}")  # and the newest checkpoint is damaged too
    body = bytearray(store.client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[100] ^= 0xFF
    store.client.put_object(Bucket=bucket, Key=key, Body=bytes(body))

    summary = train(load_recipe("smoke", args + ["train.epochs=2"]), tmp_path / "fresh", quiet=True,
                   allow_recipe_change=True)
    assert "latest.json is gone, but 2 checkpoint(s)" in caplog.text
    assert "ckpt-000000003.pt is corrupt" in caplog.text
    assert "checkpoints/ckpt-000000002.pt (step 2)" in caplog.text  # fetched: resumed there, not from step 0
    assert summary["global_step"] == 6
    assert store.get_json("checkpoints/latest.json")[0]["step"] == 6  # the pointer is back


def test_a_stale_multipart_upload_is_aborted_at_start(bucket, s3_endpoint, tmp_path, caplog):
    """Only what an earlier process of the prefix recorded, by upload id: not another run's, nor an upload that no
    process of the run started. A completed upload leaves no record behind."""
    import logging

    from boto3.s3.transfer import TransferConfig

    caplog.set_level(logging.INFO, logger="resnet50_recipe")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_multipart_upload(Bucket=bucket, Key="runs/mine/by-hand.bin")
    S3Store(f"s3://{bucket}/runs/other", s3_endpoint).client.create_multipart_upload(
        Bucket=bucket, Key="runs/other/checkpoints/ckpt-000000004.pt")
    killed = S3Store(f"s3://{bucket}/runs/mine", s3_endpoint)  # its process died in the middle of the upload
    killed.client.create_multipart_upload(Bucket=bucket, Key="runs/mine/checkpoints/ckpt-000000004.pt")
    store = S3Store(f"s3://{bucket}/runs/mine", s3_endpoint)
    store.preflight()
    left = sorted(u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))
    assert left == ["runs/mine/by-hand.bin", "runs/other/checkpoints/ckpt-000000004.pt"]
    assert "aborted 1 multipart upload(s)" in caplog.text and store.list(".multipart/") == []
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 2**20))
    store.transfer = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    store.upload_file(big, "checkpoints/big.bin")  # multipart: recorded while it ran, forgotten once complete
    assert store.list(".multipart/") == [] and store.abort_stale_uploads() == 0


def test_a_bucket_root_remote_is_refused_in_one_line_and_touches_nothing(bucket, s3_endpoint):
    """At the bucket's root the run's files and its start-up clean-up would reach every object in the bucket: another
    tool's unfinished upload there must survive the refusal."""
    from resnet50_recipe.store.s3 import RemoteRefused

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_multipart_upload(Bucket=bucket, Key="backups/db.dump")  # another tool's, in progress
    for remote in (f"s3://{bucket}", f"s3://{bucket}/"):
        with pytest.raises(RemoteRefused, match=rf"^s3://{bucket}: a run needs a prefix of its own, s3://{bucket}/NAME"):
            S3Store(remote, s3_endpoint).preflight()
    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == ["backups/db.dump"]
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)


def test_a_second_writer_on_one_prefix_is_stopped(bucket, s3_endpoint, tmp_path, caplog):
    from resnet50_recipe.store.checkpoints import new_lineage
    from resnet50_recipe.store.uploader import Uploader

    lineage = new_lineage()  # two machines resuming the same run onto one prefix
    store = S3Store(f"s3://{bucket}/r", s3_endpoint)
    a = Uploader(store, tmp_path / "a", keep_last=2, lineage=lineage)
    b = Uploader(store, tmp_path / "b", keep_last=2, lineage=lineage)
    a.submit(local_checkpoint(tmp_path / "a", 1, 500, lineage))
    assert a.drain(60)
    b.submit(local_checkpoint(tmp_path / "b", 2, 500, lineage))
    assert b.drain(60)
    a.submit(local_checkpoint(tmp_path / "a", 3, 500, lineage))
    assert a.drain(60)
    assert a.superseded and "rewritten by another writer" in a.superseded
    assert "ckpt-000000003.pt" in a.failed and caplog.text.count("another writer") == 1  # no retry loop
    pointer, _ = store.get_json("checkpoints/latest.json")
    assert pointer["step"] == 2 and pointer["writer"]["id"] == b.writer["id"]
    b.close()


def test_runs_pull_refuses_keys_outside_the_destination(bucket, s3_endpoint, tmp_path, capsys):
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for key in ("runs/p/metrics.jsonl", "runs/p/../../escaped", "runs/p//abs/escaped", "runs/p/a\\..\\..\\x",
                "runs/p/sub//escaped", "runs/p/./dot"):
        client.put_object(Bucket=bucket, Key=key, Body=b"data")
    dest = tmp_path / "deep" / "dest"
    assert main(["runs", "pull", f"s3://{bucket}/runs/p", str(dest), "--endpoint-url", s3_endpoint]) == 2
    assert "refused 5 object(s)" in capsys.readouterr().err
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["deep/dest/metrics.jsonl"]


def test_a_fresh_machine_fetches_the_best_checkpoint_too(bucket, s3_endpoint, tmp_path):
    from resnet50_recipe.store.checkpoints import commit, new_lineage, verify_checkpoint
    from resnet50_recipe.store.uploader import Uploader

    lineage = new_lineage()
    run = tmp_path / "run"
    first = local_checkpoint(run, 1, 700, lineage)
    second = local_checkpoint(run, 2, 900, lineage)
    manifest = commit(run / "checkpoints", {k: second[k] for k in ("file", "step", "epoch", "sha256", "size")},
                           {"file": first["file"], "top1": 0.9}, keep_last=1, lineage=lineage)
    store = S3Store(f"s3://{bucket}/r", s3_endpoint)
    uploader = Uploader(store, run, keep_last=1, lineage=lineage)
    uploader.submit(manifest)
    assert uploader.drain(60) and not uploader.failed
    uploader.close()
    fresh = tmp_path / "fresh" / "checkpoints"
    assert fetch_latest(store, fresh, newer_than=-1, keep_last=1)
    local = read_manifest(fresh)
    assert local["step"] == 2 and local["best"]["file"] == first["file"]
    assert verify_checkpoint(fresh / first["file"], first["checkpoints"][0]) is None  # the best, fetched and checked


def test_retention_deletes_only_the_lineages_own_files_after_the_pointer_moved(bucket, s3_endpoint, tmp_path):
    from resnet50_recipe.store.checkpoints import new_lineage
    from resnet50_recipe.store.uploader import Uploader

    lineage = new_lineage()
    store = S3Store(f"s3://{bucket}/r", s3_endpoint)
    uploader = Uploader(store, tmp_path, keep_last=1, lineage=lineage)
    uploader.submit(local_checkpoint(tmp_path, 1, 300, lineage))
    assert uploader.drain(60)
    # Another writer's file, listed in the pointer (as a race could leave it): never ours to delete.
    pointer, etag = store.get_json("checkpoints/latest.json")
    store.client.put_object(Bucket=bucket, Key="r/checkpoints/ckpt-000000000.pt", Body=b"theirs")
    pointer["checkpoints"].insert(0, {"file": "ckpt-000000000.pt", "step": 0, "epoch": 0, "sha256": "0" * 64,
                                      "size": 6, "run_id": "someone-else"})
    uploader._etag = store.put_json("checkpoints/latest.json", pointer, etag)  # as if this uploader wrote it
    uploader.submit(local_checkpoint(tmp_path, 2, 300, lineage))
    assert uploader.drain(60) and not uploader.failed
    uploader.close()
    names = set(store.list("checkpoints/"))
    assert "checkpoints/ckpt-000000000.pt" in names  # kept: not this lineage's
    assert "checkpoints/ckpt-000000001.pt" not in names and "checkpoints/ckpt-000000001.pt.json" not in names
    assert {"checkpoints/ckpt-000000002.pt", "checkpoints/ckpt-000000002.pt.json"} <= names


def test_a_lost_answer_to_a_pointer_write_is_recognised_and_the_uploads_go_on(tiny_data, bucket, s3_endpoint,
                                                                              tmp_path, caplog):
    """The store applies a pointer write, its answer is lost, botocore sends the same conditional PUT again, and
    the store refuses it (412): the pointer has moved, by this very write. The uploader reads the pointer, finds
    itself and its entry there, and goes on; it is no second writer."""
    from helpers import FaultProxy

    dropped = []

    def lose_one_answer(method, path, headers):
        # The uploader's first write of the pointer (If-Match: over the lineage's claim), and only that one.
        if method == "PUT" and "checkpoints/latest.json" in path and headers.get("If-Match") and not dropped:
            dropped.append(path)
            return "drop-answer"
        return None

    with FaultProxy(s3_endpoint, lose_one_answer) as proxy:
        recipe = load_recipe("smoke", tiny_overlay(tiny_data, **remote_args(bucket, proxy.endpoint, "lost"), **{
            "checkpoint.every_steps": 1, "train.steps_per_epoch": 4, "checkpoint.upload_timeout_s": 10}))
        summary = train(recipe, tmp_path / "run", quiet=True)
    writes = [action for method, path, action in proxy.requests if method == "PUT" and path == dropped[0]]
    # After it: botocore's resend (answered 412) when botocore resends it, and the later checkpoints' writes
    # (the pointer it moved itself has an ETag it never saw: its writer id says whose it is).
    assert len(writes[writes.index("drop-answer") + 1:]) >= 1
    assert "another writer" not in caplog.text
    assert summary["exit_status"] == 0 and summary["unfinished"] == []  # (failed_uploads: those superseded)
    store = S3Store(f"s3://{bucket}/runs/lost", s3_endpoint)
    pointer, _ = store.get_json("checkpoints/latest.json")
    assert pointer["step"] == 4 == summary["global_step"]
    assert store.sha256(f"checkpoints/{pointer['file']}") == pointer["sha256"]


def test_an_unreachable_store_at_start_says_so_at_once_and_ctrl_c_stops_the_wait(tiny_data, s3_endpoint, tmp_path):
    """A laptop, a remote whose endpoint refuses connections: one line at once says what failed, where, for how
    long it is retried and how to stop; the first Ctrl-C (a stop) ends the wait with exit 75."""
    import queue

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    command = [sys.executable, "-m", "resnet50_recipe", "train", "smoke", "--output", str(tmp_path / "run"),
               "--remote", "s3://my-bucket/runs/x"]
    for item in tiny_overlay(tiny_data):
        command += ["--set", item]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "AWS_ENDPOINT_URL_S3": closed})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    seen, said = [], None
    try:
        deadline = time.monotonic() + 60  # a few seconds of imports and data checks, then the line at once
        while said is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(line)
            if "Ctrl-C" in line:
                said = line
        assert said is not None, f"no line saying what is waited for: {seen}"
        assert closed in said and "s3://my-bucket/runs/x" in said and "300 s" in said, said
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == EXIT_PREEMPTED
    finally:
        process.kill()
        process.wait()
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# The remote and the local directory disagree: another run took the prefix over; the remote is ahead of a stale
# local directory; every local checkpoint is damaged


def test_a_run_whose_prefix_another_run_took_over_stops_at_once_and_exits_2_never_0(tiny_data, bucket, s3_endpoint,
                                                                                    tmp_path, caplog):
    """Another run starts afresh on this run's prefix (a second launch of the same name): its newer lineage owns
    the remote now. This run keeps its work on its own disk (a checkpoint where it stopped), but it must not
    go on billing for nothing, nor end 0 ("finished and synced") when its results never reached S3: the unit
    would then release the instance and its disk. Two runs on one prefix is bad input: exit 2."""
    from resnet50_recipe.errors import EXIT_BAD_INPUT

    store = S3Store(f"s3://{bucket}/runs/taken", s3_endpoint)

    def take_over():  # once this run's first checkpoint is up: a newer lineage's pointer, as a fresh start writes
        while True:
            pointer, etag = store.get_json("checkpoints/latest.json")
            if pointer and pointer.get("file"):
                newer = {"run_id": "other-run", "started": time.time() + 3600, "parent": None}
                store.put_json("checkpoints/latest.json", {"lineage": newer, "run_id": "other-run", "best": None,
                                                           "checkpoints": [], "lineages": []}, etag)
                return
            time.sleep(0.02)

    threading.Thread(target=take_over, daemon=True).start()
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **remote_args(bucket, s3_endpoint, "taken"), **{
        "checkpoint.every_steps": 1, "train.steps_per_epoch": 5, "train.epochs": 6, "export.enabled": "false"}))
    summary = train(recipe, tmp_path / "run", quiet=True)
    assert summary["exit_status"] == EXIT_BAD_INPUT and "other-run" in summary["superseded"], summary
    assert summary["global_step"] < 30  # it stopped, instead of training on for nothing
    local = read_manifest(tmp_path / "run/checkpoints")
    assert local["step"] == summary["global_step"]  # what it did is on its own disk
    assert store.get_json("checkpoints/latest.json")[0]["run_id"] == "other-run"  # and the other run's remote is intact
    assert "other-run" in caplog.text


def test_a_resume_from_a_newer_remote_checkpoint_takes_the_remotes_metrics_over_a_stale_directorys(
        tiny_data, bucket, s3_endpoint, tmp_path):
    """Machine A trains to step 3 and is lost; machine B resumes from S3, trains to step 6, and is lost too. A
    resume in A's old directory stages step 6 from S3: the run's records must be B's (steps 1-6), not A's stale
    file, which the next sync would otherwise write over the only complete copy (and the spend it records)."""
    extra = {"checkpoint.every_steps": 1, "train.steps_per_epoch": 3, "export.enabled": "false"}

    def recipe(epochs):
        return load_recipe("smoke", tiny_overlay(tiny_data, **remote_args(bucket, s3_endpoint, "stale"),
                                                 **{**extra, "train.epochs": epochs}))
    assert train(recipe(1), tmp_path / "a", quiet=True)["exit_status"] == 0
    shutil.copytree(tmp_path / "a", tmp_path / "stale")  # machine A's disk, as it was at step 3
    assert train(recipe(2), tmp_path / "b", quiet=True, allow_recipe_change=True)["global_step"] == 6  # machine B
    summary = train(recipe(3), tmp_path / "stale", quiet=True, allow_recipe_change=True)
    assert summary["exit_status"] == 0 and summary["global_step"] == 9
    store = S3Store(f"s3://{bucket}/runs/stale", s3_endpoint)
    body = store.client.get_object(Bucket=bucket, Key="runs/stale/metrics.jsonl")["Body"].read().decode()
    steps = [r["global_step"] for r in map(json.loads, body.splitlines()) if r["kind"] == "step"]
    assert steps == list(range(1, 10)), steps


def test_with_every_local_checkpoint_damaged_the_run_resumes_from_s3_instead_of_exit_2(tiny_data, bucket,
                                                                                         s3_endpoint, tmp_path):
    """Every checkpoint the local manifest lists fails its size and hash check, and S3 holds good copies of the
    same lineage: the run resumes from S3. Exit 2 would be final, and the unit would release the instance."""
    extra = {"checkpoint.every_steps": 1, "train.steps_per_epoch": 3, "export.enabled": "false"}
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **remote_args(bucket, s3_endpoint, "damaged"), **extra))
    assert train(recipe, tmp_path / "run", quiet=True)["exit_status"] == 0
    folder = tmp_path / "run" / "checkpoints"
    for entry in read_manifest(folder)["checkpoints"]:
        damaged = bytearray((folder / entry["file"]).read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        (folder / entry["file"]).write_bytes(bytes(damaged))
    longer = load_recipe("smoke", tiny_overlay(tiny_data, **remote_args(bucket, s3_endpoint, "damaged"),
                                               **{**extra, "train.epochs": 2}))
    summary = train(longer, tmp_path / "run", quiet=True, allow_recipe_change=True)
    assert summary["exit_status"] == 0 and summary["global_step"] == 6, summary
    assert read_manifest(folder)["step"] == 6


def test_a_fresh_machine_whose_remote_checkpoints_all_fail_their_check_refuses_and_changes_nothing(
        tiny_data, bucket, s3_endpoint, tmp_path):
    """As with a local directory whose every checkpoint fails its check: a start from step 0 in the same lineage
    would write its own pointer over the run's and retention would delete what it listed. Refused in one line
    (exit 2), the remote as it was."""
    from resnet50_recipe.errors import UserError

    extra = {"checkpoint.every_steps": 1, "train.steps_per_epoch": 3, "export.enabled": "false"}
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **remote_args(bucket, s3_endpoint, "allbad"), **extra))
    assert train(recipe, tmp_path / "a", quiet=True)["exit_status"] == 0
    store = S3Store(f"s3://{bucket}/runs/allbad", s3_endpoint)
    pointer, _ = store.get_json("checkpoints/latest.json")
    for entry in pointer["checkpoints"]:
        store.client.put_object(Bucket=bucket, Key=f"runs/allbad/checkpoints/{entry['file']}", Body=b"damaged")
    before = sorted(store.list())
    with pytest.raises(UserError, match="none passes its sha256 check"):
        train(recipe, tmp_path / "fresh", quiet=True)
    assert store.get_json("checkpoints/latest.json")[0] == pointer and sorted(store.list()) == before
