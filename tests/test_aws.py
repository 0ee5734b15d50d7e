"""AWS launch, watch and stop against moto: EC2, IAM, SSM and Service Quotas in-process (mock_aws), S3 over the
moto server on 127.0.0.1 (which shares the in-process state). Never AWS."""
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
import yaml
from botocore.stub import Stubber
from helpers import FakeCost, FaultProxy, MetadataStandIn, free_port, tiny_overlay
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID

from resnet50_recipe import ec2 as ec2_facts
from resnet50_recipe import load_recipe, train
from resnet50_recipe.cli import main
from resnet50_recipe.cloud import api as cloud_api
from resnet50_recipe.cloud import cost as estimates
from resnet50_recipe.cloud import instances, ship
from resnet50_recipe.cloud import launch as launcher
from resnet50_recipe.trainer.budget import InstanceCost
from resnet50_recipe.trainer.runlog import read_metrics

REGION = "us-east-1"


@pytest.fixture
def cloud(s3_endpoint, bucket, monkeypatch):
    """mock_aws for EC2/IAM/SSM/Service Quotas; S3 calls go to the moto server through AWS_ENDPOINT_URL_S3."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")  # moto's 1,300 stock AMIs take 2 s to load
    with mock_aws():
        boto3.client("s3", region_name=REGION).create_bucket(Bucket=bucket)  # mock_aws started with a clean slate
        ec2 = boto3.client("ec2", region_name=REGION)
        ami = register_ami(ec2)
        yield {"ec2": ec2, "iam": boto3.client("iam", region_name=REGION), "ami": ami, "bucket": bucket,
               "s3": boto3.client("s3", region_name=REGION, endpoint_url=s3_endpoint)}


def register_ami(ec2) -> str:
    return ec2.register_image(Name="dlami-stand-in", RootDeviceName="/dev/sda1", Architecture="x86_64",
                              BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 8}}])["ImageId"]


# The release the instance installs from PyPI: tests that are not about the package skip building a wheel.
RELEASE = "resnet50-recipe[aws]==0.1.0"


def launch(cloud, name="r1", **kwargs):
    kwargs = {"ami": cloud["ami"], "region": REGION, "out": lambda *a: None, "package": RELEASE, **kwargs}
    return launcher.launch("smoke", f"s3://{cloud['bucket']}/runs", name=name, **kwargs)


def put_dataset(cloud, prefix: str) -> str:
    """One object under PREFIX/train/ and PREFIX/val/, what a launch checks before it sends the instance to copy the
    folder; its s3:// URL."""
    for split in ("train", "val"):
        cloud["s3"].put_object(Bucket=cloud["bucket"], Key=f"{prefix}/{split}/c0/0.jpg", Body=b"x")
    return f"s3://{cloud['bucket']}/{prefix}/"


def live_instances(ec2):
    return [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
            if i["State"]["Name"] != "terminated"]


def test_launch_creates_the_role_policy_profile_and_a_tagged_persistent_spot_instance(cloud, caplog):
    result = launch(cloud, instance_type="g4dn.2xlarge")
    iam, ec2 = cloud["iam"], cloud["ec2"]
    roles = [r for r in iam.list_roles()["Roles"] if r["RoleName"].startswith("resnet50-recipe")]
    assert [r["RoleName"] for r in roles] == ["resnet50-recipe-r1"]
    assert roles[0]["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    assert iam.list_attached_role_policies(RoleName="resnet50-recipe-r1")["AttachedPolicies"] == []  # no S3FullAccess
    assert iam.list_role_policies(RoleName="resnet50-recipe-r1")["PolicyNames"] == ["resnet50-recipe-run"]
    policy = iam.get_role_policy(RoleName="resnet50-recipe-r1", PolicyName="resnet50-recipe-run")["PolicyDocument"]
    objects = [s for s in policy["Statement"] if "s3:PutObject" in s["Action"]]
    assert objects == [{"Sid": "RunPrefixObjects", "Effect": "Allow",
                        "Resource": f"arn:aws:s3:::{cloud['bucket']}/runs/r1/*",
                        "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]}]
    listing = next(s for s in policy["Statement"] if s["Action"] == "s3:ListBucket")
    assert listing["Condition"] == {"StringLike": {"s3:prefix": ["runs/r1", "runs/r1/*"]}}
    assert {a for s in policy["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])} \
        == {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
            "ec2:DescribeSpotPriceHistory", "ec2:CancelSpotInstanceRequests", "ec2:TerminateInstances"}
    profiles = iam.list_instance_profiles()["InstanceProfiles"]
    assert [(p["InstanceProfileName"], [r["RoleName"] for r in p["Roles"]]) for p in profiles] == \
        [("resnet50-recipe-r1", ["resnet50-recipe-r1"])]

    [instance] = live_instances(ec2)
    assert instance["InstanceId"] == result["instance_id"]
    assert instance["InstanceType"] == "g4dn.2xlarge" and instance["ImageId"] == cloud["ami"]
    assert instance["InstanceLifecycle"] == "spot"
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert instance["IamInstanceProfile"]["Arn"].endswith("/resnet50-recipe-r1")
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags[launcher.TAG_RUN] == "r1" and tags[launcher.TAG_REMOTE] == f"s3://{cloud['bucket']}/runs/r1"
    cheapest = next(iter(ec2_facts.spot_prices(cloud_api.Api(REGION), "g4dn.2xlarge")))
    assert instance["Placement"]["AvailabilityZone"] == cheapest
    # The quota could not be read (moto has no EC2 quotas): warned, and the launch went on.
    assert "could not read the spot vCPU quota L-3819A6DF" in caplog.text
    recipe = cloud["s3"].get_object(Bucket=cloud["bucket"], Key="runs/r1/launch/recipe.yaml")["Body"].read()
    assert b"name: smoke" in recipe


def test_launch_offers_then_sets_the_rule_for_cut_off_multipart_uploads_keeping_the_buckets_rules(cloud, tmp_path):
    s3, name = cloud["s3"], cloud["bucket"]
    wheel = tmp_path / "resnet50_recipe-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK wheel bytes")
    said = []
    launch(cloud, package=str(wheel), out=said.append)
    assert any("no AbortIncompleteMultipartUpload lifecycle rule over runs/r1/" in line and
               "--abort-incomplete-uploads" in line for line in said), said
    with pytest.raises(s3.exceptions.ClientError):  # offered, not set
        s3.get_bucket_lifecycle_configuration(Bucket=name)
    logs = {"ID": "expire-logs", "Status": "Enabled", "Filter": {"Prefix": "logs/"}, "Expiration": {"Days": 30}}
    s3.put_bucket_lifecycle_configuration(Bucket=name, LifecycleConfiguration={"Rules": [logs]})
    said.clear()
    launch(cloud, name="r2", package=str(wheel), abort_incomplete_uploads=True, out=said.append)
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=name)["Rules"]}
    assert rules["expire-logs"]["Expiration"]["Days"] == 30  # the bucket's own rule is kept
    added = rules[launcher.UPLOAD_RULE_ID]
    assert added["Filter"]["Prefix"] == "runs/" and added["AbortIncompleteMultipartUpload"] == {
        "DaysAfterInitiation": 1}  # every run under --bucket s3://BUCKET/runs
    assert not any("AbortIncompleteMultipartUpload" in line for line in said)
    launch(cloud, name="r3", package=str(wheel), out=said.append)  # covered now: nothing to offer
    assert not any("AbortIncompleteMultipartUpload" in line for line in said), said


def test_the_upload_rule_is_refused_over_a_whole_bucket_and_the_rewrite_keeps_the_buckets_settings(cloud):
    """--bucket s3://BUCKET (no prefix) would put the rule over every object of the bucket: refused before any AWS
    call. A rewrite keeps what it did not mean to change, TransitionDefaultMinimumObjectSize included (moto always
    answers all_storage_classes_128K and ignores the put's value, so the answer is set and the put read in hooks)."""
    s3, name = cloud["s3"], cloud["bucket"]
    with pytest.raises(launcher.UserError, match=rf"^--abort-incomplete-uploads: --bucket s3://{name} has no prefix"):
        launcher.launch("smoke", f"s3://{name}", name="r1", ami=cloud["ami"], region=REGION, package=RELEASE,
                        abort_incomplete_uploads=True, out=lambda *a: None)
    with pytest.raises(s3.exceptions.ClientError):  # nothing written
        s3.get_bucket_lifecycle_configuration(Bucket=name)
    assert live_instances(cloud["ec2"]) == []
    api, sent = cloud_api.Api(REGION), []

    def bucket_setting(parsed, **kwargs):
        parsed["TransitionDefaultMinimumObjectSize"] = "varies_by_storage_class"

    api.client("s3").meta.events.register("after-call.s3.GetBucketLifecycleConfiguration", bucket_setting)
    api.client("s3").meta.events.register("provide-client-params.s3.PutBucketLifecycleConfiguration",
                                          lambda params, **kw: sent.append(params))
    logs = {"ID": "expire-logs", "Status": "Enabled", "Filter": {"Prefix": "logs/"}, "Expiration": {"Days": 30}}
    s3.put_bucket_lifecycle_configuration(Bucket=name, LifecycleConfiguration={"Rules": [logs]})
    launch(cloud, api=api, abort_incomplete_uploads=True)
    [put] = sent
    assert put["TransitionDefaultMinimumObjectSize"] == "varies_by_storage_class"
    assert [r["ID"] for r in put["LifecycleConfiguration"]["Rules"]] == ["expire-logs", launcher.UPLOAD_RULE_ID]


def test_the_spot_options_are_what_run_instances_is_given(cloud, tmp_path):
    """moto keeps the lifecycle but not the spot options themselves: read them off the request that was sent."""
    sent = []
    api = cloud_api.Api(REGION)
    api.client("ec2").meta.events.register("provide-client-params.ec2.RunInstances",
                                           lambda params, **kw: sent.append(params))
    wheel = tmp_path / "resnet50_recipe-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK wheel bytes")
    launch(cloud, api=api, package=str(wheel))
    key = f"runs/r1/launch/{wheel.name}"  # a local wheel travels through the run's prefix
    assert cloud["s3"].get_object(Bucket=cloud["bucket"], Key=key)["Body"].read() == b"PK wheel bytes"
    assert sent[0]["InstanceMarketOptions"] == {"MarketType": "spot", "SpotOptions": {
        "SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"}}
    user_data = base64.b64decode(sent[0]["UserData"]).decode()  # botocore encodes it in place, after this hook
    assert "RUN=r1\n" in user_data and f"REMOTE=s3://{cloud['bucket']}/runs/r1\n" in user_data
    assert "--resume auto" in user_data and "RestartForceExitStatus=74 75" in user_data
    assert f"PACKAGE=s3://{cloud['bucket']}/{key}\n" in user_data


def test_a_second_launch_reuses_the_role_and_profile_and_moves_the_policy(cloud):
    launch(cloud)
    iam = cloud["iam"]
    role_id = iam.get_role(RoleName="resnet50-recipe-r1")["Role"]["RoleId"]
    profile_id = iam.get_instance_profile(InstanceProfileName="resnet50-recipe-r1")["InstanceProfile"][
        "InstanceProfileId"]
    with pytest.raises(cloud_api.AwsError, match="already has instance"):
        launch(cloud)  # one live instance per run
    instances.stop("r1", REGION, out=lambda *a: None)
    launch(cloud, data=put_dataset(cloud, "datasets/imagenette"))
    assert iam.get_role(RoleName="resnet50-recipe-r1")["Role"]["RoleId"] == role_id
    profile = iam.get_instance_profile(InstanceProfileName="resnet50-recipe-r1")["InstanceProfile"]
    assert profile["InstanceProfileId"] == profile_id and len(profile["Roles"]) == 1
    assert len([r for r in iam.list_roles()["Roles"] if r["RoleName"].startswith("resnet50-recipe")]) == 1
    policy = iam.get_role_policy(RoleName="resnet50-recipe-r1", PolicyName="resnet50-recipe-run")["PolicyDocument"]
    reads = [s for s in policy["Statement"] if s["Sid"].startswith("Read")]
    assert [s["Action"] for s in reads] == ["s3:ListBucket", "s3:GetObject"]  # read-only on the data
    assert reads[1]["Resource"][1] == f"arn:aws:s3:::{cloud['bucket']}/datasets/imagenette/*"
    assert len(live_instances(cloud["ec2"])) == 1


def test_data_missing_from_s3_is_refused_before_anything_is_created(cloud, monkeypatch):
    """On the instance `aws s3 sync` of a missing prefix copies nothing and exits 0 (the trainer then exits 2 after
    the whole set-up), and `aws s3 cp` of a missing archive fails every setup: the launch reads the data first."""
    monkeypatch.setenv("HF_TOKEN", "hf_own-token")
    s3, bucket = cloud["s3"], cloud["bucket"]
    s3.put_object(Bucket=bucket, Key="datasets/imagenette/train/c0/0.jpg", Body=b"x")  # no val/ yet
    for data, refusal in ((f"s3://{bucket}/datasets/imagenete/", "datasets/imagenete/: no train/ under it"),
                          (f"s3://{bucket}/datasets/imagenette", "datasets/imagenette: no val/ under it"),
                          (f"s3://{bucket}/datasets/imagenette.tar", "datasets/imagenette.tar: no such object")):
        with pytest.raises(launcher.UserError, match=f"^s3://{bucket}/{refusal}; --data takes"):
            launch(cloud, data=data, push="me/m")
    assert [r for r in cloud["iam"].list_roles()["Roles"] if r["RoleName"].startswith("resnet50-recipe")] == []
    assert boto3.client("ssm", region_name=REGION).describe_parameters()["Parameters"] == []
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["datasets/imagenette/train/c0/0.jpg"]
    assert live_instances(cloud["ec2"]) == []
    s3.put_object(Bucket=bucket, Key="datasets/imagenette/val/c0/0.jpg", Body=b"x")
    s3.put_object(Bucket=bucket, Key="datasets/imagenette.tar", Body=b"x")
    launch(cloud, data=f"s3://{bucket}/datasets/imagenette")
    instances.stop("r1", REGION, out=lambda *a: None)
    launch(cloud, data=f"s3://{bucket}/datasets/imagenette.tar")


def test_an_exceeded_quota_refuses_clearly_and_creates_nothing(cloud):
    """moto has no EC2 quotas, so this one client answers through botocore's Stubber: a spot quota of 8
    vCPUs (one g4dn.2xlarge), with a 4-vCPU spot instance already running."""
    ec2 = cloud["ec2"]
    ec2.run_instances(ImageId=cloud["ami"], InstanceType="g4dn.xlarge", MinCount=1, MaxCount=1,
                      InstanceMarketOptions={"MarketType": "spot"})
    api = cloud_api.Api(REGION)
    stub = Stubber(api.client("service-quotas"))
    stub.add_response("get_service_quota", {"Quota": {"QuotaCode": "L-3819A6DF", "Value": 8.0, "ServiceCode": "ec2",
                                                      "QuotaName": "All G and VT Spot Instance Requests"}},
                      {"ServiceCode": "ec2", "QuotaCode": "L-3819A6DF"})
    with stub, pytest.raises(cloud_api.AwsError) as refused:
        launch(cloud, instance_type="g4dn.2xlarge", api=api)
    assert "g4dn.2xlarge needs 8 vCPUs and 4 are in use by running spot instances, but the account's quota " \
           "L-3819A6DF (All G and VT Spot Instance Requests) in us-east-1 is 8 vCPUs" in str(refused.value)
    assert [r for r in cloud["iam"].list_roles()["Roles"] if r["RoleName"].startswith("resnet50-recipe")] == []
    assert cloud["iam"].list_instance_profiles()["InstanceProfiles"] == []
    assert len(live_instances(ec2)) == 1  # only the one that was already running
    assert "Contents" not in cloud["s3"].list_objects_v2(Bucket=cloud["bucket"])


def test_no_capacity_in_the_cheapest_az_moves_to_the_next(cloud):
    """EC2's InsufficientInstanceCapacity cannot be provoked in moto; it is raised for one AZ at the API
    boundary (a botocore before-call hook), and the launch must land in the next AZ."""
    api = cloud_api.Api(REGION)
    zones = list(ec2_facts.spot_prices(api, "g4dn.2xlarge"))
    api.client("ec2").meta.events.register("before-call.ec2.RunInstances", lambda params, **kw: (
        _raise_capacity() if params["body"].get("Placement.AvailabilityZone") == zones[0] else None))
    result = launch(cloud, api=api)
    assert result["az"] == zones[1]


def _raise_capacity():
    from botocore.exceptions import ClientError
    raise ClientError({"Error": {"Code": "InsufficientInstanceCapacity", "Message": "no capacity"}}, "RunInstances")


def test_stop_cancels_the_request_then_terminates_and_leaves_s3(cloud):
    launch(cloud)
    ec2 = cloud["ec2"]
    # EC2 creates a persistent spot request for run_instances, tagged from TagSpecifications; moto does not, so
    # the test creates it the way EC2 would (moto starts an instance for it, as EC2 does).
    request = ec2.request_spot_instances(
        Type="persistent", InstanceInterruptionBehavior="stop",
        LaunchSpecification={"ImageId": cloud["ami"], "InstanceType": "g4dn.xlarge"},
        TagSpecifications=[{"ResourceType": "spot-instances-request",
                            "Tags": [{"Key": launcher.TAG_RUN, "Value": "r1"}]}])["SpotInstanceRequests"][0]
    before = {o["Key"] for o in cloud["s3"].list_objects_v2(Bucket=cloud["bucket"])["Contents"]}
    result = instances.stop("r1", REGION, out=lambda *a: None)
    assert result["cancelled"] == [request["SpotInstanceRequestId"]]
    requests = ec2.describe_spot_instance_requests()["SpotInstanceRequests"]  # moto drops cancelled ones
    assert [r for r in requests if r["State"] != "cancelled"] == []
    assert live_instances(ec2) == [] and len(result["terminated"]) == 2
    assert {o["Key"] for o in cloud["s3"].list_objects_v2(Bucket=cloud["bucket"])["Contents"]} == before
    with pytest.raises(cloud_api.AwsError, match="no live instance"):
        instances.stop("r1", REGION, out=lambda *a: None)


def test_status_reads_the_runs_state_from_s3(cloud, tiny_data, s3_endpoint, tmp_path):
    launch(cloud)
    remote = f"s3://{cloud['bucket']}/runs/r1"
    recipe = load_recipe("smoke", tiny_overlay(tiny_data, **{
        "checkpoint.every_epochs": 1, "checkpoint.remote": remote, "export.enabled": "false"}))
    train(recipe, tmp_path / "run", quiet=True)  # a real run syncs its checkpoints and metrics to the prefix
    status = instances.run_status("r1", REGION)
    assert status["state"] == "running" and status["remote"] == remote
    assert status["checkpoint"]["epoch"] == 1 and status["checkpoint"]["step"] == 2
    assert datetime.fromisoformat(status["checkpoint"]["time"]) > datetime.now(timezone.utc) - timedelta(minutes=5)
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert status["last_epoch"]["top1"] == [r for r in last if r["kind"] == "epoch"][-1]["top1"]
    assert status["epochs"] == 1 and status["finished"] and not status["released"]
    assert status["cost_usd_upper_bound"] >= 0 and status["hours_since_launch"] < 0.1
    lines = []
    instances.print_status(status, out=lines.append)
    assert "last checkpoint: epoch 1, step 2" in "\n".join(lines) and "finished" in "\n".join(lines)

    # The same files as a run 1 epoch into 5 would leave them: no summary yet, an ETA from the epoch time.
    s3 = cloud["s3"]
    s3.delete_object(Bucket=cloud["bucket"], Key="runs/r1/summary.json")
    resolved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    resolved["train"]["epochs"] = 5
    s3.put_object(Bucket=cloud["bucket"], Key="runs/r1/recipe.yaml", Body=yaml.safe_dump(resolved))
    resolved["train"]["budget_usd"] = 2.5
    s3.put_object(Bucket=cloud["bucket"], Key="runs/r1/recipe.yaml", Body=yaml.safe_dump(resolved))
    status = instances.run_status("r1", REGION)
    epoch_time = [r for r in last if r["kind"] == "epoch"][-1]["epoch_time_s"]
    assert not status["finished"] and status["eta_hours"] == pytest.approx(4 * epoch_time / 3600)
    lines = []
    instances.print_status({**status, "cost_usd_recorded": 1.0, "price_usd_per_h": 0.25}, out=lines.append)
    projected = 1.0 + 0.25 * status["eta_hours"]
    assert f"  spent ~$1.00, ~${projected:.2f} projected at the end ($0.2500/h now); budget $2.50: $1.50 left" in lines

    # Finished and released (what the end of the run does on EC2): nothing left billing.
    s3.put_object(Bucket=cloud["bucket"], Key="runs/r1/summary.json", Body=json.dumps({"stopped": False}))
    instances.stop("r1", REGION, out=lambda *a: None)
    lines = []
    instances.print_status(instances.run_status("r1", REGION), out=lines.append)
    assert "  finished, nothing running, nothing billing except S3 (the instance and its spot request are gone)" \
        in lines


def test_cost_integrates_the_price_history_and_the_cheapest_az_comes_first():
    t = datetime(2026, 11, 26, tzinfo=timezone.utc)
    history = [{"Timestamp": t - timedelta(hours=5), "SpotPrice": "0.20"},
               {"Timestamp": t + timedelta(hours=1), "SpotPrice": "0.30"}]
    assert estimates.integrate_cost(history, t, t + timedelta(hours=3)) == pytest.approx(0.20 + 2 * 0.30)


def test_price_shows_spot_per_az_on_demand_and_an_estimate(cloud):
    lines = []
    rows = estimates.price(["g4dn.xlarge", "p3.2xlarge"], REGION, load_recipe("imagenet-100ep"), out=lines.append)
    assert rows[0]["on_demand"] == 0.526 and len(rows[0]["spot"]) >= 2 and rows[0]["gpu"] == "T4"
    t4, v100 = estimates.THROUGHPUT_224["T4"].img_per_s, estimates.THROUGHPUT_224["V100"].img_per_s
    # 160 px: the T4's 224 px figure scaled by pixels, and no faster than g4dn.xlarge's 3 spare vCPUs decode
    per_s = min(t4 * (224 / 160) ** 2, 3 * estimates.LOADER_IMG_PER_S_PER_VCPU["randaugment"])
    assert rows[0]["estimate"]["hours"] == pytest.approx(1_281_167 * 100 / per_s / 3600)
    loader = 7 * estimates.LOADER_IMG_PER_S_PER_VCPU["randaugment"]  # p3.2xlarge: 8 vCPUs feed less than a V100 takes
    assert rows[1]["estimate"]["hours"] == pytest.approx(1_281_167 * 100 / min(v100 * (224 / 160) ** 2, loader) / 3600)
    assert "Estimates, not quotes" in lines[-1]


def test_dry_run_prints_every_call_and_makes_none(tmp_path, capsys, monkeypatch):
    # Any request would fail: nothing listens there, and there are no credentials.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    assert main(["aws", "launch", "imagenet-100ep", "--bucket", "s3://my-bucket/runs", "--data",
                 "s3://my-bucket/imagenet/", "--dry-run", "--region", REGION]) == 0
    out = capsys.readouterr().out
    listed = out.split("\n# <")[0].splitlines()  # the calls, before the long arguments printed after them
    calls = [line.split("(")[0] for line in listed if line[:1].isalpha()]
    assert calls == ["service-quotas.get_service_quota", "ec2.describe_instances", "ec2.describe_spot_price_history",
                     "ec2.describe_instances", "ssm.get_parameter", "ec2.describe_images", "s3.list_objects_v2",
                     "s3.list_objects_v2", "iam.get_role",
                     "iam.create_role", "iam.put_role_policy", "iam.get_instance_profile",
                     "iam.create_instance_profile", "iam.add_role_to_instance_profile", "s3.put_object",
                     "s3.upload_file", "s3.get_bucket_lifecycle_configuration", "s3.delete_object", "ec2.run_instances",
                     "s3.put_object"]
    assert "# s3://my-bucket has no AbortIncompleteMultipartUpload lifecycle rule over runs/imagenet-100ep/" in out
    # This checkout is an editable install: the plan says so, and a wheel of it goes through the run's prefix.
    assert "# package: resnet50-recipe 0.1.0 runs from a checkout (an editable install" in out
    assert "PACKAGE=s3://my-bucket/runs/imagenet-100ep/launch/resnet50_recipe-0.1.0-py3-none-any.whl" in out
    assert launcher.DLAMI_PARAMETER in out and '"InstanceInterruptionBehavior": "stop"' in out
    assert "DATA=s3://my-bucket/imagenet/" in out


def test_the_dry_run_in_the_readmes_is_what_the_command_prints(capsys, monkeypatch):
    import re
    from pathlib import Path

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")  # the region falls back to us-east-1, as documented
    command = "resnet50-recipe aws launch imagenet-100ep --bucket s3://my-bucket/runs --data s3://my-bucket/imagenet/"
    assert main(command.split()[1:] + ["--dry-run"]) == 0
    printed = capsys.readouterr().out.split("\n# <")[0].rstrip()
    timestamps = re.compile(r"\d{4}-\d\d-\d\d[ T][\d:.]+(\+00:00|Z)")
    root = Path(__file__).parent.parent
    for readme in (root / "docs" / "aws.md",):  # the one page that shows the listing; README.md links to it
        before, rest = readme.read_text().split(f"$ {command} --dry-run\n", 1)
        shown, after = rest.split("\n```", 1)
        if os.environ.get("REGENERATE_README") == "1":  # REGENERATE_README=1 pytest -k readmes rewrites the blocks
            readme.write_text(f"{before}$ {command} --dry-run\n{printed}\n```{after}")
            shown = printed
        assert timestamps.sub("T", shown) == timestamps.sub("T", printed), readme


def test_the_run_roles_policy_in_docs_aws_md_is_what_launch_writes():
    """The JSON block under "The run role's policy" in docs/aws.md, for its example launch, equals the policy that
    launch puts on the role (policy_document of the plan, as `launch` calls it)."""
    import re
    from pathlib import Path

    plan = launcher.plan_launch("imagenet-100ep", "s3://my-bucket/runs", None, [], "g4dn.2xlarge",
                                "s3://my-bucket/imagenet/", None, RELEASE, None, None, "me/resnet50-a3", False, False)
    written = launcher.policy_document(plan.bucket, plan.prefix, plan.reads, region=REGION, run=plan.name,
                                       token=plan.token_parameter, release=not plan.keep_instance)
    page = (Path(__file__).parent.parent / "docs" / "aws.md").read_text()
    section = page.split("## The run role's policy\n", 1)[1]
    assert "--bucket s3://my-bucket/runs --data s3://my-bucket/imagenet/ --push me/resnet50-a3" in \
        section.split("```json", 1)[0]  # the example the block is for
    shown = re.search(r"```json\n(.*?)\n```", section, re.S).group(1)
    assert json.loads(shown) == written, "docs/aws.md's policy drifted from iam-policy.json; paste:\n" + \
        json.dumps(written, indent=2)


def test_without_boto3_the_aws_commands_say_how_to_install_it(monkeypatch, capsys):
    for module in ("boto3", "botocore", "botocore.exceptions"):
        monkeypatch.setitem(sys.modules, module, None)  # what an install without the [aws] extra sees
    for args in (["ls"], ["launch", "smoke", "--bucket", "s3://b/runs", "--dry-run"]):
        assert main(["aws", *args]) == 1
        assert "pip install 'resnet50-recipe[aws]'" in capsys.readouterr().err


def render(**settings):
    values = {"RUN": "in1k", "REMOTE": "s3://b/runs/in1k", "REGION": REGION, "PACKAGE": "resnet50-recipe[aws]==0.1",
              "DATA": "s3://b/imagenet.tar", "VOLUME": "", "EPOCHS_NOTE": "100 epochs", "HUB_TOKEN_PARAMETER": "",
              "KEEP_INSTANCE": ""}
    return launcher.render_user_data({**values, **settings})


def assert_bash_n_and_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is missing; .ci/run installs it from Debian")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("settings", [{}, {"DATA": "", "VOLUME": "yes", "PACKAGE": "s3://b/w/x-0.1-py3-none-any.whl"},
                                      {"RUN": "a b'c", "DATA": "s3://b/dir with space/"},
                                      {"HUB_TOKEN_PARAMETER": "/resnet50-recipe/r/hf-token", "KEEP_INSTANCE": "yes"}])
def test_user_data_passes_bash_n_and_shellcheck(settings, tmp_path):
    script = tmp_path / "user-data.sh"
    script.write_text(render(**settings))
    assert_bash_n_and_shellcheck(script)


def test_the_sky_jobs_run_section_passes_bash_n_and_shellcheck(tmp_path):
    """cloud/sky-run.sh, the `run` of `resnet50-recipe sky`'s job, as SkyPilot runs it: bash."""
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/bash\n" + launcher.asset("sky-run.sh"))
    assert_bash_n_and_shellcheck(script)


def test_the_cli_runs_against_a_moto_server_through_aws_endpoint_url(s3_endpoint, bucket, monkeypatch, capsys):
    """The journey as a user types it, every client pointed at the server by AWS_ENDPOINT_URL alone: launch in
    a fresh process, the rest through main(). The server has no public SSM parameters and no EC2 quotas: --ami
    and the quota fallback cover those."""
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_endpoint}
    ami = register_ami(boto3.client("ec2", endpoint_url=s3_endpoint, region_name=REGION))
    launched = subprocess.run([sys.executable, "-m", "resnet50_recipe", "aws", "launch", "smoke", "--bucket",
                               f"s3://{bucket}/runs", "--name", "cli-run", "--ami", ami, "--region", REGION],
                              env=env, capture_output=True, text=True, timeout=120)
    assert launched.returncode == 0, launched.stderr
    assert "launched i-" in launched.stdout and "could not read the spot vCPU quota" in launched.stderr

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)

    def cli(*args):
        code = main(["aws", *args, "--region", REGION])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    code, out, _ = cli("ls")
    assert code == 0 and "cli-run" in out and "running" in out
    code, out, err = cli("status", "cli-run")
    assert code == 0 and "last checkpoint: none in S3 yet" in out, err
    assert cli("logs", "cli-run")[0] == 0
    code, out, _ = cli("stop", "cli-run")
    assert code == 0 and "terminating i-" in out
    code, _, err = cli("status", "no-such-run")
    assert code == 1 and "no instance tagged resnet50-recipe:run=no-such-run" in err


class InstanceMetadata(MetadataStandIn):
    """IMDSv2 of a g4dn.xlarge spot instance in us-east-1a (no interruption notice)."""
    identity = {"instance-type": "g4dn.xlarge", "placement/availability-zone": "us-east-1a",
                "placement/region": "us-east-1", "instance-life-cycle": "spot"}

    def do_GET(self):
        path = self.path.removeprefix("/latest/meta-data/")
        if path in self.identity and self.headers.get("X-aws-ec2-metadata-token") == self.token:
            return self._send(200, self.identity[path])
        return super().do_GET()


def test_on_ec2_every_metrics_line_records_the_instance_and_its_cost(tiny_data, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # the spot price comes from the moto server
    server = ThreadingHTTPServer(("127.0.0.1", 0), InstanceMetadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        recipe = load_recipe("smoke", tiny_overlay(tiny_data, **{
            "checkpoint.spot_notice": "on", "export.enabled": "false",
            "checkpoint.imds_endpoint": f"http://127.0.0.1:{server.server_port}"}))
        train(recipe, tmp_path / "run", quiet=True)
    finally:
        server.shutdown()
    # Every step and epoch line; the "start" line is written before the metadata has been read.
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] in ("step", "epoch")]
    assert {r["instance_type"] for r in records} == {"g4dn.xlarge"} and {r["market"] for r in records} == {"spot"}
    # moto's spot price, from the line after its read (in a thread of its own) came back; none before it
    priced = [i for i, r in enumerate(records) if r["price_usd_per_h"] is not None]
    assert priced and {r["price_usd_per_h"] for r in records[priced[0]:]} == {0.00001}
    costs = [r["cost_usd"] for r in records[priced[0]:]]
    assert costs == sorted(costs) and costs[-1] > 0


class OnDemandInstance(MetadataStandIn):
    """IMDSv2 of an on-demand g4dn.xlarge: its list price (ec2.py) needs no EC2 API."""
    identity = {"instance-type": "g4dn.xlarge", "placement/availability-zone": "us-east-1a",
                "placement/region": "us-east-1", "instance-life-cycle": "on-demand"}


def test_the_cost_carried_across_a_kill_counts_every_starts_time(tiny_data, tmp_path):
    """SIGKILL after spending past the last checkpoint: the resumed run drops the metrics lines after the
    checkpoint's step, but not the money they recorded."""
    from resnet50_recipe.store.checkpoints import find_latest

    server = ThreadingHTTPServer(("127.0.0.1", 0), OnDemandInstance)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "run"
    settings = {"train.epochs": 2, "train.steps_per_epoch": 12, "train.batch_size": 2, "checkpoint.every_steps": 4,
                "checkpoint.spot_notice": "on", "export.enabled": "false",
                "checkpoint.imds_endpoint": f"http://127.0.0.1:{server.server_port}"}
    command = [sys.executable, "-m", "resnet50_recipe", "train", "smoke", "--output", str(out)]
    for item in tiny_overlay(tiny_data, **settings):
        command += ["--set", item]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def costed() -> list[dict]:
        try:
            return [r for r in read_metrics(out / "metrics.jsonl") if r.get("cost_usd") is not None]
        except (OSError, ValueError):  # not there yet, or a line half written
            return []
    try:
        while True:  # pause the process at a step whose next one is no checkpoint's
            assert process.poll() is None, process.stdout.read()
            if costed() and costed()[-1]["global_step"] >= 5:
                os.kill(process.pid, signal.SIGSTOP)
                paused_at = costed()[-1]["global_step"]
                if (paused_at + 1) % 4:
                    break
                os.kill(process.pid, signal.SIGCONT)
            time.sleep(0.01)
        time.sleep(4)  # a slow step, say: the next line is charged for these seconds
        os.kill(process.pid, signal.SIGCONT)
        while costed()[-1]["global_step"] <= paused_at:
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGSTOP)
        before = costed()[-1]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        resumed_from = find_latest(out / "checkpoints")[1]["global_step"]
        assert resumed_from < paused_at + 1 <= before["global_step"]  # the costly line falls after the checkpoint
        train(load_recipe("smoke", tiny_overlay(tiny_data, **settings)), out, quiet=True)
    finally:
        process.stdout.close()
        server.shutdown()
    records = read_metrics(out / "metrics.jsonl")
    restart = max(i for i, r in enumerate(records) if r["kind"] == "start")
    after = [r["cost_usd"] for r in records[restart + 1:] if r.get("cost_usd") is not None]
    assert after and after[0] >= before["cost_usd"], \
        f"the resumed run carried ${after[0]:.7f} over, less than the ${before['cost_usd']:.7f} spent before the kill"


def test_the_first_budget_check_after_a_mid_epoch_restart_estimates_a_whole_epoch(tmp_path):
    """Resumed mid-epoch 2 (epoch 1 ended at $1.00, $1.60 spent when the process stopped): at the end of epoch 2,
    $2.00 spent, the epoch cost $1.00, not the $0.40 this process saw of it, so a $2.50 budget stops the run."""
    from resnet50_recipe.trainer.budget import Budget
    from resnet50_recipe.trainer.stop import StopControl

    lines = [{"kind": "start", "global_step": 0, "time": 0.0},
             {"kind": "step", "global_step": 5, "cost_usd": 0.5, "price_usd_per_h": 1.0},
             {"kind": "epoch", "epoch": 0, "global_step": 10, "cost_usd": 1.0, "price_usd_per_h": 1.0},
             {"kind": "step", "global_step": 15, "cost_usd": 1.3, "price_usd_per_h": 1.0},
             {"kind": "step", "global_step": 18, "cost_usd": 1.6, "price_usd_per_h": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cost = InstanceCost(None, tmp_path / "metrics.jsonl")
    assert cost.cost == 1.6
    cost.price, cost.cost = 1.0, 2.0  # what the process's own metrics lines bring it to by the end of epoch 2
    control = StopControl()
    epochs, reason = Budget(2.5, cost).check(control, epochs_done=2, epochs=10)
    assert epochs == 10 and reason is not None and control.stop.is_set(), \
        "the next epoch (~$1.00) would pass the $2.50 budget"
    assert "(~$1.00)" in reason


def test_a_run_on_several_machines_costs_the_instances_price_on_each(tmp_path):
    """torchrun's nodes and a SkyPilot job's machines are of one type: the run's cost is rank 0's price times them,
    and the budget (Budget reads this cost) counts every machine."""
    costs = {}
    for machines in (1, 4):
        cost = InstanceCost(None, tmp_path / "metrics.jsonl", machines=machines)
        cost.identity = {"instance_type": "g4dn.xlarge", "az": "us-east-1a", "region": "us-east-1",
                         "market": "on-demand"}  # the list price: no request
        cost.last -= 3600  # an hour since the last line
        costs[machines] = cost()
    assert costs[1]["price_usd_per_h"] == costs[4]["price_usd_per_h"] == ec2_facts.INSTANCE_TYPES["g4dn.xlarge"][3]
    assert costs[1]["cost_usd"] == pytest.approx(costs[1]["price_usd_per_h"], rel=1e-3)
    assert costs[4]["cost_usd"] == pytest.approx(4 * costs[1]["cost_usd"], rel=1e-3)
    assert "machines" not in costs[1] and costs[4]["machines"] == 4


def test_the_run_policy_lets_training_use_its_prefix_and_nothing_else(tmp_path, monkeypatch):
    """moto with IAM enforced (after 4 set-up calls), a user holding exactly the run's policy: the trainer's S3
    preflight and pointer writes work on the run's prefix and are refused next door; of EC2 only the spot price
    history is allowed. (moto does not evaluate the s3:prefix condition on ListBucket, so that part is not shown.)"""
    from resnet50_recipe.store.s3 import RemoteError, S3Store

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    admin = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, **admin, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        setup = dict(endpoint_url=endpoint, region_name=REGION, aws_access_key_id="testing",
                     aws_secret_access_key="testing")
        for _ in range(200):  # wait for the port without a request: each request counts towards the 4
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        boto3.client("s3", **setup).create_bucket(Bucket="runs-bucket")
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="instance")
        iam.put_user_policy(UserName="instance", PolicyName="run", PolicyDocument=json.dumps(
            launcher.policy_document("runs-bucket", "runs/r1", [])))
        key = iam.create_access_key(UserName="instance")["AccessKey"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it caches the credentials an earlier test resolved
        store = S3Store("s3://runs-bucket/runs/r1", endpoint)
        store.preflight()
        etag = store.put_json("checkpoints/latest.json", {"step": 1}, None)
        store.put_json("checkpoints/latest.json", {"step": 2}, etag)
        assert store.get_json("checkpoints/latest.json")[0] == {"step": 2}
        with pytest.raises(RemoteError, match="not allowed to write there"):
            S3Store("s3://runs-bucket/runs/r2", endpoint).preflight()
        ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name=REGION)
        assert ec2.describe_spot_price_history(InstanceTypes=["g4dn.xlarge"])["SpotPriceHistory"]
        with pytest.raises(ec2.exceptions.ClientError, match="not authorized|AccessDenied|UnauthorizedOperation"):
            ec2.describe_instances()
    finally:
        server.terminate()
        server.wait()


def test_the_first_spot_price_read_never_blocks_the_training_thread(s3_endpoint, tmp_path, monkeypatch):
    """In a VPC that reaches S3 but not the EC2 API: the EC2 endpoint accepts connections and never answers. The
    caller's first metrics line comes at once, without a price; the read goes on in a thread of its own."""
    from resnet50_recipe.trainer.stop import SpotWatcher, StopControl

    server = ThreadingHTTPServer(("127.0.0.1", 0), InstanceMetadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with FaultProxy(s3_endpoint, lambda method, path, headers: "hang") as ec2:
        monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", ec2.endpoint)
        try:
            watcher = SpotWatcher(StopControl(), f"http://127.0.0.1:{server.server_port}")
            cost = InstanceCost(watcher, tmp_path / "metrics.jsonl")
            first: dict = {}
            caller = threading.Thread(target=lambda: first.update(cost()), daemon=True)
            caller.start()
            caller.join(30)  # a local metadata read takes milliseconds; botocore's default client waits minutes
            assert not caller.is_alive(), "the first spot-price read blocked the caller"
            assert first["instance_type"] == "g4dn.xlarge" and first["price_usd_per_h"] is None
            assert first["cost_usd"] is None  # not known yet: never a made-up 0
            assert cost.pricing.name == "spot-price" and cost.pricing is not threading.current_thread()
            for _ in range(600):  # the read was sent, from that thread, and hangs there
                if ec2.requests:
                    break
                time.sleep(0.05)
            assert ec2.requests and cost.pricing.is_alive()
        finally:
            server.shutdown()


def test_later_price_refreshes_run_off_the_training_thread(s3_endpoint, tmp_path, monkeypatch):
    from resnet50_recipe.trainer.stop import SpotWatcher, StopControl

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    server = ThreadingHTTPServer(("127.0.0.1", 0), InstanceMetadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        watcher = SpotWatcher(StopControl(), f"http://127.0.0.1:{server.server_port}")
        cost = InstanceCost(watcher, tmp_path / "metrics.jsonl", refresh_s=0.0)
        cost()  # the first read runs in a thread of its own while the caller goes on
        first_read = cost.pricing
        assert first_read is not None and first_read.name == "spot-price"
        first_read.join(30)
        first = cost()  # once the price is known, the lines carry it, and the cost since the start
        assert first["price_usd_per_h"] == 0.00001 and first["cost_usd"] > 0
        assert cost.pricing is not first_read and cost.pricing.name == "spot-price"  # a refresh (refresh_s=0)
        cost.pricing.join(30)
        assert cost()["price_usd_per_h"] == 0.00001
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------------------------------------
# Issue 15: the package, the budget, the ranking, releasing the instance, the Hub token


def test_a_checkout_is_built_into_a_wheel_and_shipped_through_the_runs_prefix(cloud):
    result = launch(cloud, package=None)
    key = "runs/r1/launch/resnet50_recipe-0.1.0-py3-none-any.whl"
    import io
    import zipfile

    wheel = zipfile.ZipFile(io.BytesIO(cloud["s3"].get_object(Bucket=cloud["bucket"], Key=key)["Body"].read()))
    names = wheel.namelist()
    assert "resnet50_recipe/cloud/user-data.sh" in names and "resnet50_recipe/trainer/budget.py" in names
    user_data = instance_user_data(cloud["ec2"], result["instance_id"])
    assert f"PACKAGE=s3://{cloud['bucket']}/{key}\n" in user_data


def instance_user_data(ec2, instance_id) -> str:
    attribute = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(attribute["UserData"]["Value"]).decode()


def test_an_index_release_ships_the_installed_wheel_and_a_wheel_install_ships_its_wheel(tmp_path):
    """The choice as an installed package makes it: from a --find-links index (no direct_url.json, as from PyPI or
    a private index: which one is not recorded) the installed files are packed into a wheel, the same files as the
    release's, so that the instance never asks the public index for a name a private index served; from a wheel
    file (pip records its path) that file. Run in fresh interpreters outside the checkout."""
    import zipfile

    wheel = ship.build_wheel(ship._source(), tmp_path / "dist")
    probe = ("import sys; from resnet50_recipe.cloud import ship; p = ship.choose(None); "
             "print(p.spec, p.wheel, p.wheel_name, p.installed and ship.pack_installed(p.installed, sys.argv[1]), "
             "sep='|')")
    for how in ("index", "file"):
        target = tmp_path / how
        source = ["--no-index", "--find-links", str(wheel.parent), "resnet50-recipe"] if how == "index" \
            else [str(wheel)]
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        *source], check=True)
        chosen = subprocess.run([sys.executable, "-c", probe, str(tmp_path / f"{how}-wheel")], cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True)
        assert chosen.returncode == 0, chosen.stderr
        spec, shipped, name, packed = chosen.stdout.strip().split("|")
        if how == "file":
            assert (spec, shipped, packed) == ("None", str(wheel), "None")
            continue
        assert (spec, shipped, name) == ("None", "None", wheel.name)  # no pip spec for the instance's index
        with zipfile.ZipFile(wheel) as original, zipfile.ZipFile(packed) as rebuilt:
            members = {n for n in original.namelist() if not n.endswith(".dist-info/RECORD")}
            assert {n for n in rebuilt.namelist() if not n.endswith(".dist-info/RECORD")} == members
            assert all(original.read(n) == rebuilt.read(n) for n in members)
        assert Path(packed).name == wheel.name
        check = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                                "--target", str(tmp_path / "again"), packed], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr  # a wheel pip installs, RECORD and all


def test_a_budget_below_the_estimate_refuses_with_the_estimate_and_the_cheaper_choices(cloud):
    """imagenet-100ep on one T4 is ~43 h: its 300 GB disk alone costs ~$1.40 for as long (moto's spot price is
    $0.00001/h). Four or eight GPUs finish sooner: those are the cheaper choices the refusal names, cheapest first."""
    with pytest.raises(cloud_api.AwsError) as refused:
        launcher.launch("imagenet-100ep", f"s3://{cloud['bucket']}/runs", data=f"s3://{cloud['bucket']}/imagenet/",
                        instance_type="g4dn.2xlarge", budget_usd=0.5, ami=cloud["ami"], region=REGION,
                        package=RELEASE, out=lambda *a: None)
    message = str(refused.value)
    assert message.startswith("--budget-usd 0.5: the estimate for imagenet-100ep passes it (g4dn.2xlarge ~$1.40: ")
    plan = launcher.plan_launch("imagenet-100ep", f"s3://{cloud['bucket']}/runs", None, [], "g4dn.2xlarge",
                                f"s3://{cloud['bucket']}/imagenet/", None, RELEASE, None, None, None, False, False)
    api = cloud_api.Api(REGION)
    cheaper = sorted((launcher.cost_to_finish(plan, t, next(iter(p.values()))), t) for t in ec2_facts.INSTANCE_TYPES
                     if t != "g4dn.2xlarge" and (p := ec2_facts.spot_prices(api, t)))
    named = ", ".join(f"{t} ~${c:.2f}" for c, t in cheaper if c <= 0.5)
    assert f"within the budget: {named}. Try" in message and named.startswith("p5.48xlarge ~$0.04, g6e.48xlarge")
    assert live_instances(cloud["ec2"]) == [] and cloud["iam"].list_instance_profiles()["InstanceProfiles"] == []
    # Within the budget, the budget goes into the run's recipe.
    launch(cloud, budget_usd=5)
    recipe = cloud["s3"].get_object(Bucket=cloud["bucket"], Key="runs/r1/launch/recipe.yaml")["Body"].read()
    assert yaml.safe_load(recipe)["train"]["budget_usd"] == 5


def test_auto_ranks_by_cost_to_finish_and_falls_back_to_the_next_type_without_capacity(cloud):
    api = cloud_api.Api(REGION)
    lines = []
    plan = launcher.plan_launch("imagenet-100ep", f"s3://{cloud['bucket']}/runs", "r1", [], "auto",
                                put_dataset(cloud, "imagenet"), None, RELEASE, None, None, None, False, False)
    priced = {t: ec2_facts.spot_prices(api, t) for t, row in ec2_facts.INSTANCE_TYPES.items()
              if row[0] in estimates.THROUGHPUT_224}
    expected = sorted((launcher.cost_to_finish(plan, t, next(iter(p.values()))), t) for t, p in priced.items() if p)
    first, second = expected[0][1], expected[1][1]
    api.client("ec2").meta.events.register("before-call.ec2.RunInstances", lambda params, **kw: (
        _raise_capacity() if params["body"]["InstanceType"] == first else None))  # no capacity in any AZ
    result = launcher.launch("imagenet-100ep", f"s3://{cloud['bucket']}/runs", name="r1", data=plan.data,
                             instance_type="auto", ami=cloud["ami"], package=RELEASE, api=api, out=lines.append)
    assert result["instance_type"] == second
    assert len(result["tried"]) == len(ec2_facts.spot_prices(api, first))  # every AZ of the first, then the second
    ranking = next(line for line in lines if line.startswith("instance types by estimated cost to finish"))
    assert ranking.split(": ", 1)[1].split(", ")[:2] == [f"{t} ~${c:.2f}" for c, t in expected[:2]]


class ReleasingInstance(MetadataStandIn):
    """IMDSv2 of the instance that ends its run: only its id is asked."""
    instance_id = None

    def do_GET(self):
        if self.path == "/latest/meta-data/instance-id" and self.headers.get("X-aws-ec2-metadata-token") == self.token:
            return self._send(200, type(self).instance_id)
        return super().do_GET()


def run_end_of_run(tmp_path, s3_endpoint, status, result: str | None = None, **settings) -> subprocess.CompletedProcess:
    """The rendered user data's end-of-run path (`setup.sh --end STATUS [RESULT]`, what the unit's ExecStopPost
    runs with $EXIT_STATUS and $SERVICE_RESULT) under bash, with the real AWS CLI against the moto server."""
    return run_user_data(tmp_path, s3_endpoint, ["--end", str(status), *([result] if result is not None else [])],
                         **settings)


def run_user_data(tmp_path, s3_endpoint, args: list[str], gpus: int = 0,
                  **settings) -> subprocess.CompletedProcess:
    """The rendered user data under bash, its fixed paths under tmp_path/root (RESNET50_RECIPE_ROOT), with the real
    AWS CLI against the moto server. systemctl is a stand-in that records its arguments in tmp_path/systemctl.calls
    (and answers is-system-running with $SYSTEM_STATE, default running); nvidia-smi is a stand-in that lists `gpus`
    GPUs, or with none fails as it does without a driver."""
    if shutil.which("aws") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the AWS CLI is missing; .ci/run installs it from Debian")
        pytest.skip("the AWS CLI is not installed (apt-get install awscli, or pip install awscli)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_ins = {"systemctl": "#!/bin/sh\nif [ \"$1\" = is-system-running ]; then echo \"${SYSTEM_STATE:-running}\"; "
                              f"exit 0; fi\necho \"$@\" >> {tmp_path}/systemctl.calls\n"}
    stand_ins["nvidia-smi"] = "#!/bin/sh\n" + ("".join(
        f"echo 'GPU {i}: Tesla T4 (UUID: GPU-{i:08d}-0000-0000-0000-000000000000)'\n" for i in range(gpus))
        if gpus else "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9\n")
    for name, text in stand_ins.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "root" / "opt" / "resnet50-recipe").mkdir(parents=True, exist_ok=True)  # where setup.sh lives
    script = tmp_path / "setup.sh"
    script.write_text(render(**settings))
    server = ThreadingHTTPServer(("127.0.0.1", 0), ReleasingInstance)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "AWS_ENDPOINT_URL": s3_endpoint,
               "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
               "RESNET50_RECIPE_ROOT": str(tmp_path / "root")}
        return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()


def spot_run(cloud, name="r1"):
    """A run's persistent spot request and its instance, tagged as EC2 tags them from run_instances' TagSpecifications
    (moto starts no request for run_instances, so the test asks for one), its id recorded as aws launch records it."""
    ec2 = cloud["ec2"]
    tags = [{"Key": launcher.TAG_RUN, "Value": name}]
    request = ec2.request_spot_instances(
        Type="persistent", InstanceInterruptionBehavior="stop",
        LaunchSpecification={"ImageId": cloud["ami"], "InstanceType": "g4dn.xlarge"},
        TagSpecifications=[{"ResourceType": "spot-instances-request", "Tags": tags}])["SpotInstanceRequests"][0]
    request = ec2.describe_spot_instance_requests(SpotInstanceRequestIds=[request["SpotInstanceRequestId"]])[
        "SpotInstanceRequests"][0]
    ec2.create_tags(Resources=[request["InstanceId"]], Tags=tags)
    # What aws launch records from run_instances' answer, for the instance's --end to cancel.
    launcher.record_spot_request(cloud_api.Api(REGION), f"s3://{cloud['bucket']}/runs/{name}",
                                 request["SpotInstanceRequestId"])
    return request["SpotInstanceRequestId"], request["InstanceId"]


def test_a_relaunch_whose_record_fails_leaves_no_earlier_runs_spot_request_id(cloud):
    """Run 1 of the name recorded its request A and was stopped by hand; run 2's run_instances opens request B
    (named in the answer, as EC2 does and moto does not), then the put of B's id fails. A left in S3 would have
    run 2's end cancel A, not B, and terminate an instance B replaces."""
    from botocore.exceptions import ClientError

    request_a, _ = spot_run(cloud)
    instances.stop("r1", REGION, out=lambda *a: None)
    api = cloud_api.Api(REGION)
    api.client("ec2").meta.events.register("after-call.ec2.RunInstances", lambda parsed, **kw: [
        i.update(SpotInstanceRequestId="sir-0b0b0b0b") for i in parsed["Instances"]])

    def record_fails(params, **kw):
        if params["Key"].endswith(launcher.SPOT_REQUEST):
            raise RuntimeError("connection lost")
    api.client("s3").meta.events.register("provide-client-params.s3.PutObject", record_fails)
    with pytest.raises(RuntimeError, match="connection lost"):
        launch(cloud, api=api)
    assert len(live_instances(cloud["ec2"])) == 1  # run 2's, placed before the record failed
    with pytest.raises(ClientError, match="NoSuchKey"):  # its end powers off (no id) instead of cancelling A
        cloud["s3"].get_object(Bucket=cloud["bucket"], Key=f"runs/r1/{launcher.SPOT_REQUEST}")


@pytest.mark.parametrize("status", [0, 2])
def test_the_end_of_run_path_cancels_its_request_and_terminates_its_instance(cloud, s3_endpoint, tmp_path, status):
    request_id, instance_id = spot_run(cloud)
    ReleasingInstance.instance_id = instance_id
    remote = f"s3://{cloud['bucket']}/runs/r1"
    if status == 0:  # a finished run's files are in S3; exit 2 puts the training log there itself
        cloud["s3"].put_object(Bucket=cloud["bucket"], Key="runs/r1/summary.json", Body=b"{}")
    ended = run_end_of_run(tmp_path, s3_endpoint, status, RUN="r1", REMOTE=remote)
    assert ended.returncode == 0, ended.stderr
    assert f"cancelled spot request(s) {request_id}, terminating {instance_id}" in ended.stdout
    ec2 = cloud["ec2"]
    requests = ec2.describe_spot_instance_requests()["SpotInstanceRequests"]
    assert [r for r in requests if r["State"] != "cancelled"] == []
    state = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state in ("shutting-down", "terminated") and not (tmp_path / "systemctl.calls").exists()
    if status == 2:
        assert cloud["s3"].head_object(Bucket=cloud["bucket"], Key="runs/r1/logs/train-exit-2.log")


def test_the_end_of_run_path_keeps_an_unsynced_run_or_a_kept_instance(cloud, s3_endpoint, tmp_path):
    request_id, instance_id = spot_run(cloud)
    ReleasingInstance.instance_id = instance_id
    remote = f"s3://{cloud['bucket']}/runs/r1"
    ended = run_end_of_run(tmp_path, s3_endpoint, 0, RUN="r1", REMOTE=remote)  # no summary.json in S3
    assert ended.returncode == 0 and f"is not in S3: cancelled spot request(s) {request_id} and powering off " \
        "instead of terminating; the disk is kept" in ended.stdout
    cloud["s3"].put_object(Bucket=cloud["bucket"], Key="runs/r1/summary.json", Body=b"{}")
    ended = run_end_of_run(tmp_path, s3_endpoint, 0, RUN="r1", REMOTE=remote, KEEP_INSTANCE="yes")
    assert "(--keep-instance)" in ended.stdout
    assert (tmp_path / "systemctl.calls").read_text() == "poweroff\npoweroff\n"
    assert run_end_of_run(tmp_path, s3_endpoint, 75, RUN="r1", REMOTE=remote).stdout == ""  # a stop: nothing to end
    state = cloud["ec2"].describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] == "running"


def test_the_trainer_checkpoints_and_stops_before_an_epoch_would_pass_the_budget(tiny_data, tmp_path, monkeypatch):
    from resnet50_recipe.errors import EXIT_BUDGET
    from resnet50_recipe.trainer import run

    monkeypatch.setattr(run, "InstanceCost", FakeCost)
    server = ThreadingHTTPServer(("127.0.0.1", 0), MetadataStandIn)  # "on EC2": no notice, the watcher runs
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        recipe = load_recipe("smoke", tiny_overlay(tiny_data, **{
            "train.epochs": 6, "train.budget_usd": 1.0, "checkpoint.spot_notice": "on", "export.enabled": "false",
            "checkpoint.imds_endpoint": f"http://127.0.0.1:{server.server_port}"}))
        summary = train(recipe, tmp_path / "run", quiet=True)
    finally:
        server.shutdown()
    assert summary["exit_status"] == EXIT_BUDGET and summary["over_budget"] and summary["stopped"]
    assert summary["stop_reason"].startswith("train.budget_usd: $")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    epochs = [r for r in records if r["kind"] == "epoch"]
    spent, before = epochs[-1]["cost_usd"], (epochs[-2]["cost_usd"] if len(epochs) > 1 else 0.0)
    assert 1 <= len(epochs) < 6 and spent <= 1.0 < spent + (spent - before)  # stopped right before passing it
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    assert manifest["epoch"] == len(epochs)  # a checkpoint at the epoch it stopped after: a resume continues there


# ---------------------------------------------------------------------------------------------------------
# train.budget_mode: fit (issue 25, item 6): a budget that ends in a finished model


def test_a_fit_budget_shortens_the_plan_to_what_fits_and_stops_only_when_not_one_more_epoch_does():
    from resnet50_recipe.trainer.budget import Budget
    from resnet50_recipe.trainer.stop import StopControl

    class Spent:  # InstanceCost's fields the budget reads: $1.00 after the first epoch of 10
        price, cost, cost_at_epoch_start = 1.0, 1.0, 0.0

    control = StopControl()
    assert Budget(4.5, Spent(), "fit").check(control, 1, 10)[0] == 4  # 3 more at ~$1.00 fit the $3.50 left
    assert Budget(20.0, Spent(), "fit").check(control, 1, 10) == (10, None)  # all 9 fit: nothing changes
    assert Budget(2.5, Spent(), "stop").check(control, 1, 10) == (10, None)  # stop: one more fits, it goes on
    assert not control.stop.is_set()
    epochs, line = Budget(2.5, Spent(), "fit").check(control, 1, 10)  # the shortest plan: the next epoch alone
    assert epochs == 2 and "ends at epoch 2 instead of 10" in line and not control.stop.is_set()
    epochs, reason = Budget(1.5, Spent(), "fit").check(control, 1, 10)  # not even that: a stop, as in "stop"
    assert epochs == 10 and control.stop.is_set() and reason.startswith("train.budget_usd: $1.00 spent of $1.50")


def test_fitted_compresses_the_ramp_and_timms_schedule_ends_at_the_new_last_epoch():
    import torch

    from resnet50_recipe.data.pipeline import train_size_at
    from resnet50_recipe.trainer.budget import fitted
    from resnet50_recipe.trainer.components import build_scheduler

    recipe = load_recipe("imagenet-fast-88")
    aug, sched = fitted(recipe, 44)
    p, q = recipe.augment.progressive, aug.progressive
    assert (q.start_epoch, q.end_epoch) == (p.start_epoch / 2, p.end_epoch / 2)
    assert [train_size_at(aug, e) for e in range(44)] == [train_size_at(recipe.augment, 2 * e) for e in range(44)]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(sched, optimizer, 44, updates_per_epoch=10)
    scheduler.step_update(num_updates=43 * 10)
    assert optimizer.param_groups[0]["lr"] > recipe.sched.min_lr  # the last epoch still decays...
    scheduler.step_update(num_updates=44 * 10)
    assert optimizer.param_groups[0]["lr"] == recipe.sched.min_lr  # ...to the end value at its end
    assert fitted(recipe, 88) == (recipe.augment, recipe.sched)


# 8 epochs of 4 steps, a line a step: $0.50 an epoch at the stand-in price, so $2.40 covers about half of them.
# After epoch 1 ($0.50 spent, 7 more at ~$0.50 would make $4.00) the plan becomes 4 epochs; the ramp from 16 to
# 32 px over epochs 3-6 (1-based) then runs over epochs 2-3.
FIT = {"train.epochs": 8, "train.steps_per_epoch": 4, "train.budget_usd": 2.4, "train.budget_mode": "fit",
       "train.deterministic": "true", "model.drop_path": 0.1, "augment.re_prob": 0.25,
       "augment.progressive": "{min_size: 16, start_epoch: 2, end_epoch: 6, multiple: 8}",
       "checkpoint.spot_notice": "on", "export.enabled": "false"}


def train_priced(data, out, signal_at_step=None):
    """A FIT run on "EC2" (the metadata stand-in, no notice) at the stand-in price; with `signal_at_step`, this
    process sends itself SIGTERM once that step is logged. The summary and what the run printed."""
    import contextlib
    import io

    from resnet50_recipe.trainer import run
    from resnet50_recipe.trainer.runlog import RunLog

    server = ThreadingHTTPServer(("127.0.0.1", 0), MetadataStandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log = RunLog.log

    def log_then_signal(self, record):
        log(self, record)
        if record["kind"] == "step" and record["global_step"] == signal_at_step:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler train() installed turns it into a stop
    printed = io.StringIO()
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
            patch.setattr(run, "InstanceCost", FakeCost)
            patch.setattr(RunLog, "log", log_then_signal)
            recipe = load_recipe("smoke", tiny_overlay(data, **FIT, **{
                "checkpoint.imds_endpoint": f"http://127.0.0.1:{server.server_port}"}))
            summary = train(recipe, out, quiet=False)
    finally:
        server.shutdown()
    return summary, printed.getvalue()


@pytest.fixture(scope="module")
def fit_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "run"
    return out, *train_priced(tiny_data, out)


def test_a_fit_budget_ends_in_a_finished_model_with_a_shortened_plan(fit_run, capsys, tmp_path):
    from resnet50_recipe.trainer.budget import planned_epochs

    out, summary, printed = fit_run
    assert summary["exit_status"] == 0 and not summary["stopped"] and "over_budget" not in summary
    assert summary["replan"] == {"planned_epochs": 8, "epochs": 4, "after_epoch": 1} and summary["epochs"] == 4
    said = [line for line in printed.splitlines() if "the schedule now ends" in line]
    assert said == ["train.budget_usd: $0.50 spent of $2.40 after epoch 1, and 7 more epochs (~$0.50 each) would "
                    "pass it: the schedule now ends at epoch 4 instead of 8, its learning-rate decay and resolution "
                    "ramp compressed to fit (train.budget_mode: fit)"]
    records = read_metrics(out / "metrics.jsonl")
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["train_size"] for r in epochs] == [16, 16, 24, 32]  # the ramp, compressed to end with the run
    assert epochs[-1]["lr"] == 0.0 == load_recipe("smoke").sched.min_lr  # the decay's end value, at the end
    last = [r["lr"] for r in records if r["kind"] == "step" and r["epoch"] == 3]
    # (a step line's lr is the next step's) the last epoch still decays, and reaches the end value with its end
    assert len(last) == 4 and last == sorted(last, reverse=True) and last[0] > 0.0 == last[-1]
    assert epochs[-1]["cost_usd"] <= 2.4
    assert planned_epochs(records) == (4, 8)  # what `watch` and `aws status` count the ETA to
    assert main(["watch", str(out), "--once"]) == 0
    text = capsys.readouterr().out
    assert "epoch 4/4 (planned 8, shortened to fit train.budget_usd)  step 4/4  global step 16/16 (100%)" in text
    running = tmp_path / "running"  # the same run as it stood at step 10: its ETA counts to the new end
    running.mkdir()
    (running / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r["global_step"] <= 10))
    assert main(["watch", str(running), "--once"]) == 0
    text = capsys.readouterr().out
    assert "running" in text and "(planned 8, shortened to fit train.budget_usd)" in text
    assert "global step 10/16 (62%)" in text and "ETA " in text
    assert main(["export", str(out), str(tmp_path / "export")]) == 0  # the model card says so too
    assert "- Epochs: 4 of 4 (the recipe's 8, shortened after epoch 1 to fit train.budget_usd: decay and resolution " \
        "ramp compressed); 16 optimizer steps" in (tmp_path / "export" / "README.md").read_text()


def test_a_run_stopped_after_its_fit_replan_resumes_it_bitwise(fit_run, tiny_data, tmp_path):
    from helpers import assert_same_tree, final_state, without_timing

    from resnet50_recipe.errors import EXIT_PREEMPTED

    reference, _, _ = fit_run
    out = tmp_path / "run"
    stopped, _ = train_priced(tiny_data, out, signal_at_step=6)  # epoch 2, after the re-plan
    assert stopped["exit_status"] == EXIT_PREEMPTED and stopped["global_step"] == 6
    assert stopped["replan"]["epochs"] == 4
    # The resumed process starts its stand-in cost at $0: had the plan not come from the checkpoint, it would
    # train all 8 epochs of the recipe's schedule.
    summary, printed = train_priced(tiny_data, out)
    assert "resuming from" in printed and summary["exit_status"] == 0 and summary["global_step"] == 16
    a, b = final_state(reference), final_state(out)
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "loop", "rng", "best", "global_step", "replan"):
        assert_same_tree(a[key], b[key], key)
    assert without_timing(a["metrics"]) == without_timing(b["metrics"])


@pytest.fixture
def enforced_iam(monkeypatch):
    """moto's own IAM evaluation for every call after `enforce()`, with what moto leaves out for EC2 and SSM filled
    in: the ARN of the resource a call acts on (moto checks "*" for both), and for EC2 that resource's tags as
    aws:ResourceTag/* condition keys (moto evaluates StringEquals, but computes no keys besides sts:ExternalId)."""
    from moto import settings
    from moto.ec2.models import ec2_backends
    from moto.iam.access_control import IAMPolicy, IAMRequest, PermissionResult

    def acted_on(request) -> tuple[str, dict]:
        account, region, data = request.account_id, request._region, request._data
        for kind, key in (("instance", "InstanceId.1"), ("spot-instances-request", "SpotInstanceRequestId.1")):
            if key in data:
                rid = data[key][0] if isinstance(data[key], list) else data[key]
                tags = ec2_backends[account][region].describe_tags(filters={"resource-id": [rid]})
                return (f"arn:aws:ec2:{region}:{account}:{kind}/{rid}",
                        {f"aws:ResourceTag/{t['key']}": t["value"] for t in tags})
        if request._action.startswith("ssm:") and request._body:
            name = json.loads(request._body).get("Name", "")
            return f"arn:aws:ssm:{region}:{account}:parameter/{name.lstrip('/')}", {}
        return "*", {}

    def check_action_permitted(self, resource):
        resource, values = acted_on(self)
        results = [IAMPolicy(p).is_action_permitted(self._action, resource, None, values)
                   for p in self._access_key.collect_policies()]
        if PermissionResult.DENIED in results or PermissionResult.PERMITTED not in results:
            self._raise_access_denied()

    def enforce():
        monkeypatch.setattr(IAMRequest, "check_action_permitted", check_action_permitted)
        monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    return enforce


def instance_session(cloud, name="r1") -> boto3.Session:
    """A session holding exactly the run role's policy (as a user's: moto has no instance roles)."""
    iam = cloud["iam"]
    policy = iam.get_role_policy(RoleName=f"resnet50-recipe-{name}", PolicyName="resnet50-recipe-run")["PolicyDocument"]
    iam.create_user(UserName="instance")
    iam.put_user_policy(UserName="instance", PolicyName="run", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="instance")["AccessKey"]
    return boto3.Session(aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"],
                         region_name=REGION)


def instance_clients(cloud, name="r1"):
    """EC2 and SSM clients holding exactly the run role's policy."""
    session = instance_session(cloud, name)
    return session.client("ec2"), session.client("ssm")


def as_the_instance(session: boto3.Session, monkeypatch) -> None:
    """The session's credentials in the environment, for boto3's default chain and the AWS CLI."""
    credentials = session.get_credentials()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", credentials.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", credentials.secret_key)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it caches the credentials an earlier test resolved


def denied(call, **kwargs) -> bool:
    from botocore.exceptions import ClientError

    try:
        call(**kwargs)
    except ClientError as e:
        # moto answers SSM's JSON protocol with an XML error, which botocore reads as code "403"
        return cloud_api.error_code(e) in ("AccessDenied", "UnauthorizedOperation") or \
            e.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    return False


def test_the_run_role_may_release_only_its_own_instance_and_request(cloud, enforced_iam):
    launch(cloud)
    own_request, own_instance = spot_run(cloud, "r1")
    other_request, other_instance = spot_run(cloud, "r2")
    ec2, _ = instance_clients(cloud)
    enforced_iam()
    assert denied(ec2.terminate_instances, InstanceIds=[other_instance])
    assert denied(ec2.cancel_spot_instance_requests, SpotInstanceRequestIds=[other_request])
    assert denied(ec2.run_instances, ImageId=cloud["ami"], InstanceType="g4dn.xlarge", MinCount=1, MaxCount=1)
    assert denied(ec2.stop_instances, InstanceIds=[own_instance])
    assert denied(ec2.describe_spot_instance_requests,  # every request's user data: the role reads none
                  Filters=[{"Name": f"tag:{launcher.TAG_RUN}", "Values": ["r1"]}])
    ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=[own_request])
    ec2.terminate_instances(InstanceIds=[own_instance])
    # With --keep-instance the role gets no release permission at all.
    assert not [s for s in launcher.policy_document("b", "runs/r1", [], run="r1", release=False)["Statement"]
                if s["Sid"].startswith("Release")]


def test_the_run_role_reads_no_spot_request_and_the_end_of_run_path_still_releases_its_own(cloud, enforced_iam,
                                                                                            s3_endpoint, tmp_path,
                                                                                            monkeypatch):
    """describe_spot_instance_requests has no resource-level permission: on "*" it shows every request's
    LaunchSpecification.UserData, other workloads' included. The role gets none; `--end` (the real AWS CLI, with the
    role's credentials) cancels the request that aws launch recorded under the run's prefix."""
    from moto.ec2.models import ec2_backends

    launch(cloud)
    own_request, own_instance = spot_run(cloud, "r1")
    other_request, _ = spot_run(cloud, "r2")
    ReleasingInstance.instance_id = own_instance
    cloud["s3"].put_object(Bucket=cloud["bucket"], Key="runs/r1/summary.json", Body=b"{}")  # a finished run
    session = instance_session(cloud)
    ec2 = session.client("ec2")
    enforced_iam()
    assert denied(ec2.describe_spot_instance_requests)
    assert denied(ec2.describe_spot_instance_requests, SpotInstanceRequestIds=[other_request])
    as_the_instance(session, monkeypatch)
    ended = run_end_of_run(tmp_path, s3_endpoint, 0, RUN="r1", REMOTE=f"s3://{cloud['bucket']}/runs/r1")
    assert ended.returncode == 0, ended.stdout + ended.stderr
    assert f"cancelled spot request(s) {own_request}, terminating {own_instance}" in ended.stdout, ended.stdout
    backend = ec2_backends[DEFAULT_ACCOUNT_ID][REGION]  # the admin's key is refused now: read moto's state
    assert own_request not in backend.spot_instance_requests  # moto forgets a cancelled request
    assert backend.spot_instance_requests[other_request].state != "cancelled"
    assert backend.get_instance(own_instance).state in ("shutting-down", "terminated")


def test_the_run_role_cannot_list_the_buckets_uploads_and_aborts_only_its_own_by_stored_id(cloud, enforced_iam,
                                                                                           s3_endpoint, monkeypatch,
                                                                                           caplog):
    """Listing a bucket's unfinished uploads cannot be scoped to a prefix in AWS: the role gets none, and the
    preflight aborts what an earlier process of the run recorded under its prefix, by upload id, and nothing else."""
    import logging

    from moto.s3.models import s3_backends

    from resnet50_recipe.store.s3 import S3Store

    caplog.set_level(logging.INFO, logger="resnet50_recipe")
    launch(cloud)
    s3, bucket, remote = cloud["s3"], cloud["bucket"], f"s3://{cloud['bucket']}/runs/r1"
    for key in ("backups/db.dump", "runs/r2/checkpoints/ckpt-000000004.pt", "runs/r1/by-hand.bin"):
        s3.create_multipart_upload(Bucket=bucket, Key=key)  # another tool's, another run's, one by hand
    session = instance_session(cloud)
    enforced_iam()
    assert denied(session.client("s3", endpoint_url=s3_endpoint).list_multipart_uploads, Bucket=bucket)
    as_the_instance(session, monkeypatch)
    earlier = S3Store(remote, s3_endpoint)  # an earlier process of the run, killed in the middle of an upload
    upload = earlier.client.create_multipart_upload(Bucket=bucket, Key="runs/r1/checkpoints/ckpt-000000004.pt")
    earlier.client.upload_part(Bucket=bucket, Key="runs/r1/checkpoints/ckpt-000000004.pt", PartNumber=1,
                               UploadId=upload["UploadId"], Body=b"part")
    store = S3Store(remote, s3_endpoint)
    store.preflight()
    assert "aborted 1 multipart upload(s)" in caplog.text
    left = sorted(u.key_name for u in s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets[bucket].multiparts.values())
    assert left == ["backups/db.dump", "runs/r1/by-hand.bin", "runs/r2/checkpoints/ckpt-000000004.pt"]
    assert store.list(".multipart/") == []  # its record went with it
    assert store.abort_stale_uploads() == 0


def test_the_hub_token_goes_to_ssm_and_the_role_may_read_only_that_parameter(cloud, enforced_iam, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_own-token")
    launch(cloud, push="me/resnet50-a3", private=True)
    admin_ssm = boto3.client("ssm", region_name=REGION)
    stored = admin_ssm.get_parameter(Name="/resnet50-recipe/r1/hf-token", WithDecryption=True)["Parameter"]
    assert stored["Type"] == "SecureString" and stored["Value"] == "hf_own-token"
    admin_ssm.put_parameter(Name="/resnet50-recipe/r2/hf-token", Type="SecureString", Value="hf_other")
    recipe = yaml.safe_load(cloud["s3"].get_object(Bucket=cloud["bucket"], Key="runs/r1/launch/recipe.yaml")["Body"]
                            .read())
    assert recipe["export"]["repo_id"] == "me/resnet50-a3" and recipe["export"]["private"] is True
    _, ssm = instance_clients(cloud)
    enforced_iam()
    read = ssm.get_parameter(Name="/resnet50-recipe/r1/hf-token", WithDecryption=True)["Parameter"]["Value"]
    assert read == "hf_own-token"
    assert denied(ssm.get_parameter, Name="/resnet50-recipe/r2/hf-token", WithDecryption=True)
    assert denied(ssm.put_parameter, Name="/resnet50-recipe/r1/hf-token", Value="x", Type="String", Overwrite=True)
    assert denied(ssm.get_parameters_by_path, Path="/resnet50-recipe/")


def test_a_launch_that_places_no_instance_leaves_no_hub_token(cloud, monkeypatch):
    """A launch files' upload that fails, then no capacity in any AZ (both raised at the API boundary, the second
    as moto cannot): `aws stop` then has no instance to act on, so the launch itself must not leave the token in
    SSM."""
    def upload_fails(**kw):
        raise RuntimeError("connection lost")
    monkeypatch.setenv("HF_TOKEN", "hf_own-token")
    ssm = boto3.client("ssm", region_name=REGION)
    api = cloud_api.Api(REGION)
    api.client("s3").meta.events.register("before-call.s3.PutObject", upload_fails)
    with pytest.raises(RuntimeError, match="connection lost"):
        launch(cloud, api=api, push="me/resnet50-a3")
    assert ssm.describe_parameters()["Parameters"] == []
    api = cloud_api.Api(REGION)
    api.client("ec2").meta.events.register("before-call.ec2.RunInstances", lambda **kw: _raise_capacity())
    with pytest.raises(cloud_api.AwsError, match="no spot capacity"):
        launch(cloud, api=api, push="me/resnet50-a3")
    assert ssm.describe_parameters()["Parameters"] == []


def test_the_token_is_in_no_artefact_of_the_launch(cloud, monkeypatch, tmp_path, capsys, caplog):
    """Every file the launch writes (the wheel build goes to a temporary folder, here under tmp_path), every S3
    object, the instance's user data and tags, the role's policy, the dry run and the log: no token."""
    import tempfile

    token = "hf_TOKEN-that-must-not-leak-5f3a"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = launch(cloud, package=None, push="me/resnet50-a3", out=print)
    assert main(["aws", "launch", "smoke", "--bucket", f"s3://{cloud['bucket']}/runs", "--push", "me/x", "--dry-run",
                 "--region", REGION]) == 0
    seen = capsys.readouterr().out
    assert cloud_api.SECRET in seen  # the dry run shows where the token goes, not the token
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".whl" for p in files)
    texts = [seen, caplog.text, instance_user_data(cloud["ec2"], result["instance_id"]),
             json.dumps(cloud["ec2"].describe_instances()["Reservations"], default=str),
             json.dumps(cloud["iam"].get_role_policy(RoleName="resnet50-recipe-r1", PolicyName="resnet50-recipe-run"))]
    blobs = [p.read_bytes() for p in files]
    for o in cloud["s3"].list_objects_v2(Bucket=cloud["bucket"])["Contents"]:
        blobs.append(cloud["s3"].get_object(Bucket=cloud["bucket"], Key=o["Key"])["Body"].read())
    assert len(blobs) >= 3 and all(token.encode() not in b for b in blobs + [t.encode() for t in texts])
    # The wheel is a zip: its members are compressed, so look inside too.
    import zipfile

    for wheel in (p for p in files if p.suffix == ".whl"):
        with zipfile.ZipFile(wheel) as z:
            assert all(token.encode() not in z.read(n) for n in z.namelist())


def test_follow_redraws_the_status_until_the_run_ends_then_says_where_the_weights_are(cloud):
    import io

    launch(cloud)
    s3, drawn, said = cloud["s3"], io.StringIO(), []

    def finish_the_run(seconds):  # what the instance does between two redraws
        s3.put_object(Bucket=cloud["bucket"], Key="runs/r1/summary.json", Body=json.dumps(
            {"stopped": False, "exit_status": 0, "pushed": "me/resnet50-a3"}))
    status = instances.follow("r1", REGION, interval=30, out=said.append, stream=drawn, sleep=finish_the_run)
    assert drawn.getvalue().count("run r1: instance") == 2 and status["finished"]
    assert said == [f"weights: s3://{cloud['bucket']}/runs/r1/export/ (timm format; resnet50-recipe runs pull "
                    f"s3://{cloud['bucket']}/runs/r1 DIR) and https://huggingface.co/me/resnet50-a3"]


def test_follow_of_a_relaunch_reads_no_summary_of_the_runs_earlier_instance(cloud):
    import io

    launch(cloud)
    s3 = cloud["s3"]
    s3.put_object(Bucket=cloud["bucket"], Key="runs/r1/summary.json", Body=json.dumps(
        {"stopped": True, "exit_status": 4, "over_budget": True}))  # the first instance stopped at its budget
    instances.stop("r1", REGION, out=lambda *a: None)
    time.sleep(1.1)  # EC2's LaunchTime and S3's Last-Modified count whole seconds: the relaunch comes a second later
    launch(cloud, budget_usd=50)  # the documented resume: a larger budget
    slept, said = [], []

    def finish_the_run(seconds):  # what the new instance does between two redraws
        slept.append(seconds)
        s3.put_object(Bucket=cloud["bucket"], Key="runs/r1/summary.json", Body=json.dumps(
            {"stopped": False, "exit_status": 0}))
    status = instances.follow("r1", REGION, interval=30, out=said.append, stream=io.StringIO(), sleep=finish_the_run)
    assert slept == [30] and status["finished"] and said[0].startswith("weights: "), said


def test_follow_ends_when_the_instance_powered_off_at_the_end_of_its_run(cloud):
    import io

    launch(cloud)
    instance_id = live_instances(cloud["ec2"])[0]["InstanceId"]
    # The end of a run whose newest checkpoint is not in S3 (user-data.sh --end): end.json, the request cancelled
    # (moto made none), the instance powered off. No summary.json.
    cloud["s3"].put_object(Bucket=cloud["bucket"], Key="runs/r1/logs/end.json", Body=json.dumps(
        {"state": "powered-off", "reason": "not-in-s3", "exit_status": "2", "crashes": 0, "max_crashes": 5,
         "checkpoint": "ckpt-000000200.pt"}))
    cloud["ec2"].stop_instances(InstanceIds=[instance_id])
    drawn, slept, said = io.StringIO(), [], []

    def wait(seconds):
        slept.append(seconds)
        if len(slept) > 2:
            raise AssertionError(f"still redrawing a run that has ended:\n{drawn.getvalue()}")
    status = instances.follow("r1", REGION, interval=30, out=said.append, stream=drawn, sleep=wait)
    assert slept == [] and status["powered_off"]
    assert said == [f"run r1 ended without weights (exit 2); its files are in s3://{cloud['bucket']}/runs/r1"]
    assert "its disk bills until `resnet50-recipe aws stop r1` deletes it" in drawn.getvalue()


def test_the_plan_says_how_to_keep_the_global_batch_when_the_batch_does_not_fit_the_gpu(cloud):
    lines = []
    launch(cloud, instance_type="g4dn.2xlarge", overrides=["train.batch_size=512", "augment.train_size=224"],
           out=lines.append)
    assert "g4dn.2xlarge: train.batch_size=512 needs ~27 GiB at 224 px on a T4 (15 GiB, an estimate): " \
           "--set train.batch_size=256 --set train.accum_steps=2 keeps the global batch" in lines
    assert load_recipe("imagenet-100ep").train.batch_size == 128  # the shipped recipes fit: nothing said for them
    assert estimates.batch_advice(load_recipe("imagenet-100ep"), "T4") is None


# ---------------------------------------------------------------------------------------------------------
# Issue 23: one process per GPU, ending a run without losing its newest checkpoint, crash loops, checks that
# the instance would make, the dry run's budget, the Hub token after the run, the unit under systemd-analyze


def unit_command(unit_text: str) -> list[str]:
    """The argv of the unit's ExecStart as systemd builds it (systemd.service(5), "Command lines"; systemd.exec(5),
    EnvironmentFile=): Environment=, then EnvironmentFile= files (a leading "-": optional) overriding them; "${VAR}"
    is replaced by its value, and "$VAR" as a word of its own by its value split at whitespace, zero or more words."""
    import re
    import shlex

    env, command = {}, None
    for line in unit_text.splitlines():
        key, _, value = line.partition("=")
        if key == "Environment":
            env.update(item.split("=", 1) for item in shlex.split(value))
        elif key == "EnvironmentFile":
            path = value.removeprefix("-")
            if os.path.exists(path):
                for assignment in open(path).read().splitlines():
                    name, _, text = assignment.partition("=")
                    env[name] = shlex.split(text)[0] if text.strip() else ""
        elif key == "ExecStart":
            command = value
    argv = []
    for word in shlex.split(command):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            argv.extend(env.get(whole.group(1), "").split())
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return argv


def first_boot_then_setup(cloud, s3_endpoint, tmp_path, gpus: int) -> list[str]:
    """The user data's first boot (the unit written), then `setup.sh --setup` with `gpus` GPUs visible, the package
    already installed (its marker) and no data to fetch; returns the command the unit would run."""
    import hashlib

    settings = {"RUN": "r1", "REMOTE": f"s3://{cloud['bucket']}/runs/r1", "DATA": ""}
    home = tmp_path / "root" / "opt" / "resnet50-recipe"
    home.mkdir(parents=True, exist_ok=True)
    package = "resnet50-recipe[aws]==0.1"
    (home / f".installed-{hashlib.md5((package + chr(10)).encode()).hexdigest()[:12]}").touch()
    cloud["s3"].put_object(Bucket=cloud["bucket"], Key="runs/r1/launch/recipe.yaml", Body=b"name: smoke\n")
    booted = run_user_data(tmp_path, s3_endpoint, [], **settings)
    assert booted.returncode == 0, booted.stderr
    setup = run_user_data(tmp_path, s3_endpoint, ["--setup"], gpus=gpus, **settings)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    unit = tmp_path / "root" / "etc" / "systemd" / "system" / "resnet50-recipe-train.service"
    return unit_command(unit.read_text())


def test_a_sky_jobs_setup_after_its_final_exit_ends_at_once_and_a_new_jobs_goes_on(cloud, s3_endpoint, tmp_path,
                                                                                     monkeypatch):
    """`resnet50-recipe sky`'s setup (this script's --setup with LAUNCH_FILES): once the job's run section noted a
    final exit (2 or 3) in logs/end.json, SkyPilot's retries of that job end before anything is installed or copied;
    another job (another SKYPILOT_TASK_ID) of the same run is set up as usual."""
    import hashlib

    files = tmp_path / "files"
    files.mkdir()
    (files / "recipe.yaml").write_text("name: smoke\n")
    settings = {"RUN": "r1", "REMOTE": f"s3://{cloud['bucket']}/runs/r1", "DATA": "", "LAUNCH_FILES": str(files)}
    home = tmp_path / "root" / "opt" / "resnet50-recipe"
    home.mkdir(parents=True)
    (home / f".installed-{hashlib.md5((RELEASE + chr(10)).encode()).hexdigest()[:12]}").touch()
    cloud["s3"].put_object(Bucket=cloud["bucket"], Key="runs/r1/logs/end.json", Body=json.dumps(
        {"state": "ended", "reason": "exit 2 is final", "exit_status": "2", "job": "sky-managed-7_r1"}).encode())

    monkeypatch.setenv("SKYPILOT_TASK_ID", "sky-managed-7_r1")
    ended = run_user_data(tmp_path, s3_endpoint, ["--setup"], PACKAGE=RELEASE, **settings)
    assert ended.returncode == 2, ended.stdout + ended.stderr
    assert "this job's run has ended for good, not set up again" in ended.stdout
    assert not (home / "recipe.yaml").exists()

    monkeypatch.setenv("SKYPILOT_TASK_ID", "sky-managed-8_r1")
    again = run_user_data(tmp_path, s3_endpoint, ["--setup"], PACKAGE=RELEASE, **settings)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (home / "recipe.yaml").read_text() == "name: smoke\n"


@pytest.mark.parametrize("gpus", [4, 1, 0])
def test_setup_counts_the_gpus_and_the_unit_runs_one_training_process_per_gpu(cloud, s3_endpoint, tmp_path, gpus):
    argv = first_boot_then_setup(cloud, s3_endpoint, tmp_path, gpus)
    root = tmp_path / "root"
    assert argv[:3] == [f"{root}/opt/resnet50-recipe/venv/bin/resnet50-recipe", "train",
                        f"{root}/opt/resnet50-recipe/recipe.yaml"]
    # One GPU or none: one plain process, as before (no torchrun, whose failures all read as exit 1).
    expected = ["--nproc-per-node", "4"] if gpus == 4 else []
    assert argv[3:] == ["--output", f"{root}/data/runs/r1", "--remote", f"s3://{cloud['bucket']}/runs/r1",
                        "--resume", "auto", *expected]


def test_the_plan_says_how_many_processes_train_and_the_estimate_assumes_as_many(cloud):
    lines = []
    launch(cloud, instance_type="g4dn.12xlarge", out=lines.append)
    recipe = load_recipe("smoke")
    batch, accum = recipe.train.batch_size, recipe.train.accum_steps
    assert f"g4dn.12xlarge: 4 GPUs, 4 training processes (one per GPU): a global batch of 4 x {batch} x " \
           f"{accum} = {4 * batch * accum} images per step, the learning rate scaled to it (docs/distributed.md)" \
           in lines, lines
    plan = launcher.plan_launch("imagenet-100ep", f"s3://{cloud['bucket']}/runs", "r1", [], "g4dn.12xlarge",
                                f"s3://{cloud['bucket']}/imagenet/", None, RELEASE, None, None, None, False, False)
    one_gpu = estimates.estimate(plan.recipe, "T4", estimates.recipe_images(plan.recipe))["hours"]
    hours = one_gpu / 4  # four processes, each at one T4's throughput
    assert launcher.cost_to_finish(plan, "g4dn.12xlarge", 1.0) == pytest.approx(
        hours * 1.0 + ec2_facts.ebs_cost(plan.disk_gb, hours))


def write_local_checkpoint(tmp_path, name="r1", file="ckpt-000000200.pt", sha256="b" * 64):
    """The local run directory's latest.json (store/checkpoints.py) naming its newest checkpoint."""
    folder = tmp_path / "root" / "data" / "runs" / name / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "latest.json").write_text(json.dumps({"file": file, "step": 200, "epoch": 2, "sha256": sha256,
                                                    "checkpoints": [{"file": file, "sha256": sha256}]}, indent=2))
    return {"file": file, "sha256": sha256}


def put_remote_pointer(cloud, entry: dict, name="r1"):
    cloud["s3"].put_object(Bucket=cloud["bucket"], Key=f"runs/{name}/checkpoints/latest.json", Body=json.dumps(
        {**entry, "step": 100, "epoch": 1, "checkpoints": [entry]}))


def instance_state(cloud, instance_id) -> str:
    return cloud["ec2"].describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"][
        "Name"]


def live_requests(cloud) -> list:
    return [r for r in cloud["ec2"].describe_spot_instance_requests()["SpotInstanceRequests"]
            if r["State"] != "cancelled"]


@pytest.mark.parametrize("synced", [False, True])
def test_exit_2_after_a_checkpoint_terminates_only_when_that_checkpoint_is_in_s3(cloud, s3_endpoint, tmp_path, synced):
    request_id, instance_id = spot_run(cloud)
    ReleasingInstance.instance_id = instance_id
    local = write_local_checkpoint(tmp_path)
    put_remote_pointer(cloud, local if synced else {"file": "ckpt-000000100.pt", "sha256": "a" * 64})
    ended = run_end_of_run(tmp_path, s3_endpoint, 2, "exit-code", RUN="r1", REMOTE=f"s3://{cloud['bucket']}/runs/r1")
    assert ended.returncode == 0, ended.stderr
    assert live_requests(cloud) == []  # cancelled either way
    assert cloud["s3"].head_object(Bucket=cloud["bucket"], Key="runs/r1/logs/train-exit-2.log")
    if synced:
        assert f"cancelled spot request(s) {request_id}, terminating {instance_id}" in ended.stdout
        assert instance_state(cloud, instance_id) in ("shutting-down", "terminated")
        assert not (tmp_path / "systemctl.calls").exists()
    else:
        assert "exit 2 but the newest checkpoint, ckpt-000000200.pt, is not in S3: cancelled spot request(s) " \
               f"{request_id} and powering off instead of terminating; the disk is kept and bills until " \
               "resnet50-recipe aws stop r1 deletes it" in ended.stdout, ended.stdout
        assert instance_state(cloud, instance_id) == "running"
        assert (tmp_path / "systemctl.calls").read_text() == "poweroff\n"


def end_record(cloud) -> dict:
    return json.loads(cloud["s3"].get_object(Bucket=cloud["bucket"], Key="runs/r1/logs/end.json")["Body"].read())


@pytest.mark.parametrize("synced", [True, False])
def test_a_crash_loop_ends_after_max_crashes_and_74_and_75_never_count(cloud, s3_endpoint, tmp_path, synced):
    import re

    request_id, instance_id = spot_run(cloud)
    ReleasingInstance.instance_id = instance_id
    settings = {"RUN": "r1", "REMOTE": f"s3://{cloud['bucket']}/runs/r1"}
    found = re.search(r"^MAX_CRASHES=(\d+)$", render(), re.M)
    most = int(found.group(1)) if found else 5
    assert 3 <= most <= 10
    home = tmp_path / "root" / "opt" / "resnet50-recipe"
    local = write_local_checkpoint(tmp_path, file="ckpt-000000100.pt")

    def end(status, result):
        ended = run_end_of_run(tmp_path, s3_endpoint, status, result, **settings)
        assert ended.returncode == 0, ended.stderr
        return ended

    # A crash, then a new checkpoint, then crashes: the count starts again after the checkpoint.
    end(1, "exit-code")
    local = write_local_checkpoint(tmp_path, file="ckpt-000000200.pt")
    put_remote_pointer(cloud, local if synced else {"file": "ckpt-000000100.pt", "sha256": "b" * 64})
    # The trainer exiting 1, killed by the OOM killer, the setup failing (EXIT_STATUS unset, or a previous start's
    # 75): crashes. 74 and 75 after a stop with a checkpoint, and a crash during a shutdown: never counted.
    crashes = [(1, "exit-code"), ("KILL", "signal"), ("", "exit-code"), (75, "exit-code"), (1, "exit-code"),
               (1, "exit-code"), (1, "exit-code"), (1, "exit-code")][:most]
    for i, (status, result) in enumerate(crashes[:-1], 1):
        for stop in ((75, "success"), (74, "success"), ("", "success")):
            assert end(*stop).stdout == ""
        ended = end(status, result)
        assert f"crash {i} of {most} in a row without a new checkpoint; the unit restarts it" in ended.stdout
        assert end_record(cloud)["state"] == "crash-looping" and end_record(cloud)["crashes"] == i
        assert instance_state(cloud, instance_id) == "running" and len(live_requests(cloud)) == 1
        assert not (tmp_path / "systemctl.calls").exists() and not (home / "ended").exists()
    os.environ["SYSTEM_STATE"] = "stopping"  # a crash while the machine shuts down is not the run's
    try:
        assert end(1, "exit-code").stdout == ""
    finally:
        del os.environ["SYSTEM_STATE"]
    ended = end(*crashes[-1])
    assert f"{most} crashes in a row without a new checkpoint: ending the run" in ended.stdout
    assert (home / "ended").exists()  # the unit's ConditionPathExists=! starts it no more
    assert cloud["s3"].head_object(Bucket=cloud["bucket"], Key="runs/r1/logs/train-crash-loop.log")
    assert live_requests(cloud) == []
    if synced:
        assert instance_state(cloud, instance_id) in ("shutting-down", "terminated")
        assert end_record(cloud)["state"] == "released"
    else:
        assert instance_state(cloud, instance_id) == "running"
        assert (tmp_path / "systemctl.calls").read_text() == "poweroff\n"
        assert end_record(cloud)["state"] == "powered-off"
        cloud["ec2"].stop_instances(InstanceIds=[instance_id])  # what the poweroff does on EC2
    # `aws status` says which end it was.
    launch_tags = [{"Key": launcher.TAG_REMOTE, "Value": settings["REMOTE"]}]
    cloud["ec2"].create_tags(Resources=[instance_id], Tags=launch_tags)
    status = instances.run_status("r1", REGION)
    lines = []
    instances.print_status(status, out=lines.append)
    text = "\n".join(lines)
    if synced:
        assert f"  ended after {most} crashes in a row: released, nothing running, nothing billing except S3 (the " \
               "instance and its spot request are gone); the log is in " \
               f"{settings['REMOTE']}/logs/train-crash-loop.log" in lines, text
    else:
        assert f"  ended after {most} crashes in a row: powered off with its spot request cancelled, nothing " \
               "running, but its disk bills until `resnet50-recipe aws stop r1` deletes it (it holds " \
               "ckpt-000000200.pt, which is not in S3); the log is in " \
               f"{settings['REMOTE']}/logs/train-crash-loop.log" in lines, text


def test_aws_status_says_a_powered_off_instance_bills_its_disk_until_aws_stop_and_why(cloud, s3_endpoint, tmp_path):
    from moto.ec2.models import ec2_backends

    request_id, instance_id = spot_run(cloud)
    ReleasingInstance.instance_id = instance_id
    remote = f"s3://{cloud['bucket']}/runs/r1"
    cloud["ec2"].create_tags(Resources=[instance_id], Tags=[{"Key": launcher.TAG_REMOTE, "Value": remote}])
    cloud["s3"].put_object(Bucket=cloud["bucket"], Key="runs/r1/summary.json", Body=json.dumps(
        {"stopped": True, "exit_status": 4}))
    ended = run_end_of_run(tmp_path, s3_endpoint, 4, "exit-code", RUN="r1", REMOTE=remote, KEEP_INSTANCE="yes")
    assert ended.returncode == 0 and (tmp_path / "systemctl.calls").read_text() == "poweroff\n", ended.stderr
    cloud["ec2"].stop_instances(InstanceIds=[instance_id])  # what the poweroff does on EC2
    # EC2 disables a persistent request whose instance was stopped by its user or its own shutdown (an interrupted
    # one is opened again); moto leaves it active.
    request = ec2_backends[DEFAULT_ACCOUNT_ID][REGION].spot_instance_requests[request_id]
    request.state, request._status_code = "disabled", "instance-stopped-by-user"

    def said() -> list[str]:
        lines = []
        instances.print_status(instances.run_status("r1", REGION), out=lines.append)
        return lines
    lines = said()
    assert f"  spot request {request_id}: disabled (instance-stopped-by-user)" in lines
    assert "  ended with exit 4 (train.budget_usd): powered off with its spot request disabled, nothing running, " \
           "but its disk bills until `resnet50-recipe aws stop r1` deletes it (--keep-instance)" in lines, lines
    # Powered off by a failure before logs/end.json was written (S3 unreachable, a full disk): still said.
    cloud["s3"].delete_object(Bucket=cloud["bucket"], Key="runs/r1/logs/end.json")
    lines = said()
    assert "  powered off with its spot request disabled, nothing running, but its disk bills until " \
           "`resnet50-recipe aws stop r1` deletes it (no logs/end.json: stopped by hand, or its end-of-run path " \
           "failed before writing it; `resnet50-recipe aws logs r1` shows why)" in lines, lines


def test_a_crash_count_that_cannot_be_written_ends_the_run_and_a_failed_end_still_says_so(cloud, s3_endpoint,
                                                                                          tmp_path):
    request_id, instance_id = spot_run(cloud)
    ReleasingInstance.instance_id = instance_id
    settings = {"RUN": "r1", "REMOTE": f"s3://{cloud['bucket']}/runs/r1"}
    home = tmp_path / "root" / "opt" / "resnet50-recipe"
    home.mkdir(parents=True)
    os.symlink("/dev/full", home / "crashes")  # every write fails with ENOSPC, as on a full root disk
    ended = run_end_of_run(tmp_path, s3_endpoint, 1, "exit-code", **settings)
    assert ended.returncode == 0, ended.stderr
    # Not counted, so never counted to the end: ended at once, as the last crash ends it.
    assert "ending the run" in ended.stdout and live_requests(cloud) == []
    assert end_record(cloud)["state"] == "released" and instance_state(cloud, instance_id) in (
        "shutting-down", "terminated")
    assert cloud["s3"].head_object(Bucket=cloud["bucket"], Key="runs/r1/logs/train-crash-loop.log")

    # A step of the end that fails (here the cancel of a request EC2 does not know) powers off, and says so first.
    cloud["s3"].delete_object(Bucket=cloud["bucket"], Key="runs/r1/logs/end.json")
    cloud["s3"].put_object(Bucket=cloud["bucket"], Key="runs/r1/launch/spot-request", Body=b"sir-0000unknown")
    ended = run_end_of_run(tmp_path, s3_endpoint, 2, "exit-code", **settings)
    assert "ending the run failed at line" in ended.stdout and ended.returncode == 1
    assert (tmp_path / "systemctl.calls").read_text() == "poweroff\n"
    assert end_record(cloud)["state"] == "powered-off" and end_record(cloud)["reason"] == "end-failed"


def test_aws_status_says_when_a_run_is_crash_looping(cloud):
    launch(cloud)
    cloud["s3"].put_object(Bucket=cloud["bucket"], Key="runs/r1/logs/end.json", Body=json.dumps(
        {"state": "crash-looping", "exit_status": "1", "crashes": 2, "max_crashes": 5, "checkpoint": ""}))
    lines = []
    instances.print_status(instances.run_status("r1", REGION), out=lines.append)
    assert "  crash-looping: 2 crashes in a row without a new checkpoint (the last exit 1); the unit restarts it, " \
           "and crash 5 ends the run (released, or powered off if its newest checkpoint is not in S3)" in lines, lines


@pytest.mark.parametrize("overrides, refusal", [
    (["export.enabled=true", "export.repo_id=me/resnet50"], "export.repo_id: 'me/resnet50' without --push: the "
     "instance gets a Hub token only with --push; pass --push me/resnet50, or --set export.repo_id=null and push "
     "later with `resnet50-recipe push`"),
    (["log.wandb=true"], "log.wandb: true: the instance installs resnet50-recipe[aws], without wandb, and has no W&B "
     "login; set log.wandb=false (the metrics go to S3 and `resnet50-recipe aws status`)"),
    (["export.enabled=true", "export.label_names=/home/me/labels.txt"], "export.label_names: '/home/me/labels.txt' "
     "is a file on this machine, which the instance does not have; put it in the dataset and name it by its path "
     "there (/data/dataset/...), or leave it unset"),
])
def test_launch_refuses_what_the_trainer_would_refuse_on_the_instance_before_any_aws_call(cloud, overrides, refusal):
    from resnet50_recipe.errors import UserError

    with pytest.raises(UserError) as refused:
        launch(cloud, overrides=overrides)
    assert str(refused.value) == refusal
    assert cloud["iam"].list_roles()["Roles"] == [] and live_instances(cloud["ec2"]) == []
    # A label file in the dataset the instance copies is fine.
    launch(cloud, overrides=["export.enabled=true", "export.label_names=/data/dataset/labels.txt"])


def test_a_dry_run_checks_the_budget_at_on_demand_list_prices(capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # no call may be made
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    command = ["aws", "launch", "imagenet-100ep", "--bucket", "s3://my-bucket/runs", "--data", "s3://my-bucket/in/",
               "--region", REGION, "--dry-run", "--budget-usd"]
    assert main([*command, "1"]) == 1
    err = capsys.readouterr().err
    assert "--budget-usd 1: the estimate for imagenet-100ep passes it (g4dn.2xlarge ~$" in err
    assert "on-demand list price x hours (a dry run reads no spot prices; spot is usually lower, and the launch " \
           "checks again at the spot price)" in err, err
    assert main([*command, "1000"]) == 0
    out = capsys.readouterr().out
    hours = estimates.estimate(load_recipe("imagenet-100ep"), "T4", 1_281_167)["hours"]
    cost = hours * 0.752 + ec2_facts.ebs_cost(300, hours)
    assert f"# --budget-usd 1000: checked at the on-demand list price (a dry run reads no spot prices): " \
           f"g4dn.2xlarge ~${cost:.2f}" in out, out


def test_the_run_role_may_delete_its_own_hub_token_and_no_other(cloud, enforced_iam, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_own-token")
    launch(cloud, push="me/resnet50-a3")
    admin_ssm = boto3.client("ssm", region_name=REGION)
    admin_ssm.put_parameter(Name="/resnet50-recipe/r2/hf-token", Type="SecureString", Value="hf_other")
    _, ssm = instance_clients(cloud)
    enforced_iam()
    assert denied(ssm.delete_parameter, Name="/resnet50-recipe/r2/hf-token")
    ssm.delete_parameter(Name="/resnet50-recipe/r1/hf-token")


def test_the_hub_token_is_deleted_when_the_run_ends_and_by_aws_stop(cloud, s3_endpoint, tmp_path, monkeypatch):
    admin_ssm = boto3.client("ssm", region_name=REGION)

    def parameters():
        return {p["Name"] for p in admin_ssm.describe_parameters()["Parameters"]}
    request_id, instance_id = spot_run(cloud)
    ReleasingInstance.instance_id = instance_id
    admin_ssm.put_parameter(Name="/resnet50-recipe/r1/hf-token", Type="SecureString", Value="hf_own")
    admin_ssm.put_parameter(Name="/resnet50-recipe/r2/hf-token", Type="SecureString", Value="hf_other")
    cloud["s3"].put_object(Bucket=cloud["bucket"], Key="runs/r1/summary.json", Body=b"{}")
    ended = run_end_of_run(tmp_path, s3_endpoint, 0, "success", RUN="r1", REMOTE=f"s3://{cloud['bucket']}/runs/r1",
                           HUB_TOKEN_PARAMETER="/resnet50-recipe/r1/hf-token")
    assert ended.returncode == 0, ended.stderr
    assert parameters() == {"/resnet50-recipe/r2/hf-token"}
    # `aws stop` deletes it too: a run stopped by hand, or one whose instance could not delete it.
    monkeypatch.setenv("HF_TOKEN", "hf_own-token")
    launch(cloud, name="r3", push="me/resnet50-a3")
    assert "/resnet50-recipe/r3/hf-token" in parameters()
    said = []
    instances.stop("r3", REGION, out=said.append)
    assert parameters() == {"/resnet50-recipe/r2/hf-token"}
    assert "deleted the Hub token /resnet50-recipe/r3/hf-token" in said[0]


def test_aws_stop_deletes_a_hub_token_left_without_an_instance_and_refuses_only_with_nothing_to_do(cloud):
    # What a launch that failed after storing the token leaves, or an instance whose own delete failed.
    ssm = boto3.client("ssm", region_name=REGION)
    ssm.put_parameter(Name="/resnet50-recipe/r1/hf-token", Type="SecureString", Value="hf_left")
    said = []
    result = instances.stop("r1", REGION, out=said.append)
    assert ssm.describe_parameters()["Parameters"] == [] and result["cancelled"] == result["terminated"] == []
    assert "deleted the Hub token /resnet50-recipe/r1/hf-token" in said[0], said
    with pytest.raises(cloud_api.AwsError, match="has no live instance, spot request or Hub token"):
        instances.stop("r1", REGION, out=said.append)


def test_the_unit_the_first_boot_writes_passes_systemd_analyze_verify(tmp_path):
    """The first boot under a temporary root (systemctl a stand-in), then systemd's own check of the unit file:
    its directives, and its commands, which verify wants to exist and be executable (stand-ins where the venv's
    entry point would be)."""
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing; .ci/run installs Debian's systemd package")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    root = tmp_path / "root"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/systemctl.calls\n")
    (bin_dir / "systemctl").chmod(0o755)
    script = tmp_path / "user-data.sh"
    script.write_text(render(HUB_TOKEN_PARAMETER="/resnet50-recipe/in1k/hf-token"))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RESNET50_RECIPE_ROOT": str(root)}
    booted = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert booted.returncode == 0, booted.stderr
    assert (tmp_path / "systemctl.calls").read_text() == \
        "daemon-reload\nenable resnet50-recipe-train.service\nstart --no-block resnet50-recipe-train.service\n"
    entry = root / "opt" / "resnet50-recipe" / "venv" / "bin" / "resnet50-recipe"
    entry.parent.mkdir(parents=True)
    entry.write_text("#!/bin/sh\n")
    entry.chmod(0o755)
    unit = root / "etc" / "systemd" / "system" / "resnet50-recipe-train.service"
    text = unit.read_text()
    assert "StartLimitIntervalSec=0\n" in text and "StartLimitBurst" not in text
    verified = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                              timeout=120)
    assert verified.returncode == 0 and verified.stderr.strip() == "", verified.stdout + verified.stderr
