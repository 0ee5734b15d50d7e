"""AWS spot runs from the command line: price, launch, status, logs, stop, ls; and, on the instance, the cost of
the machine a run is training on.

Every AWS call goes through `Api`, so that `--dry-run` can print each call with its arguments instead of making
it. Clients are plain boto3 clients: credentials and region come from boto3's chain, and boto3 itself honours
AWS_ENDPOINT_URL (and AWS_ENDPOINT_URL_<SERVICE>), so the whole CLI runs against a moto server too.

The files a user may read or edit live in the repository's aws/ folder (shipped as `resnet50_recipe.aws_files`):
the instance's user data and the IAM policy template.
"""
from __future__ import annotations

import importlib.resources
import json
import logging
import re
import shlex
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from . import __version__

log = logging.getLogger(__name__)

TAG_RUN, TAG_REMOTE, TAG_LAUNCHED = "resnet50-recipe:run", "resnet50-recipe:remote", "resnet50-recipe:launched"
PRODUCT = "Linux/UNIX"
# The AWS Deep Learning Base AMI (Ubuntu 22.04, NVIDIA driver, x86_64), through its public SSM parameter, so that a
# launch always gets the current image instead of a hard-coded id that goes stale (the guide's ami-0c02fb55956c7d316).
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
# Spot vCPU quotas per instance family (Service Quotas, service code "ec2"). The guide checked L-34B43A08, the
# quota for *standard* instances; g4dn counts against the G and VT one.
SPOT_QUOTAS = {"g": ("L-3819A6DF", "All G and VT Spot Instance Requests"),
               "vt": ("L-3819A6DF", "All G and VT Spot Instance Requests"),
               "p": ("L-7212CCBC", "All P Spot Instance Requests")}

# GPU kind, GPUs, vCPUs and on-demand price (USD/h, Linux, us-east-1) per instance type. Prices are AWS's list
# prices from https://aws.amazon.com/ec2/pricing/on-demand/ as the guide also quotes them (g4dn.xlarge $0.526,
# g4dn.2xlarge $0.752); they were not re-read on 2026-11-26 and differ by region: check the page. P4d/P5 prices
# were cut in 2025 and are left out rather than guessed. Spot prices always come from the API.
INSTANCE_TYPES = {
    "g4dn.xlarge": ("T4", 1, 4, 0.526), "g4dn.2xlarge": ("T4", 1, 8, 0.752), "g4dn.4xlarge": ("T4", 1, 16, 1.204),
    "g4dn.8xlarge": ("T4", 1, 32, 2.176), "g4dn.12xlarge": ("T4", 4, 48, 3.912),
    "g5.xlarge": ("A10G", 1, 4, 1.006), "g5.2xlarge": ("A10G", 1, 8, 1.212), "g5.4xlarge": ("A10G", 1, 16, 1.624),
    "p3.2xlarge": ("V100", 1, 8, 3.06), "p3.8xlarge": ("V100", 4, 32, 12.24),
    "p4d.24xlarge": ("A100", 8, 96, None), "p5.48xlarge": ("H100", 8, 192, None),
}
DEFAULT_PRICE_TYPES = ("g4dn.xlarge", "g4dn.2xlarge", "g5.xlarge", "g5.2xlarge", "p3.2xlarge")

# ResNet-50 training images/s per GPU at 224 px with AMP. Estimates, not measurements of this trainer: they set
# the order of magnitude of a run's hours, and BENCHMARKS.md replaces them once a GPU has been measured.
THROUGHPUT_224 = {
    "T4": (210, "estimate used by the recipes and README (not measured yet)"),
    "A10G": (420, "estimate: about twice T4 by fp16 tensor-core peak (no published figure found)"),
    "V100": (1200, "NVIDIA DeepLearningExamples RN50 v1.5, V100 16GB, AMP (shared/reference/anchors.md)"),
    "A100": (2470, "NVIDIA DeepLearningExamples RN50 v1.5, A100 80GB, AMP (anchors.md)"),
    "H100": (7000, "MLPerf Training v3.0, 8xH100 at ~56k img/s, MXNet + DALI (anchors.md): an upper bound"),
}
# Train images per epoch for the datasets the shipped recipes name (export.dataset), when not given.
DATASET_IMAGES = {"imagenet-1k": 1_281_167}


class AwsError(RuntimeError):
    """AWS said no, or would: quota exceeded, no capacity anywhere, a run that does not exist."""


def _boto3():
    try:
        import boto3
    except ImportError:
        raise AwsError("the aws commands need boto3: pip install 'resnet50-recipe[aws]'") from None
    return boto3


class Api:
    """One boto3 client per service, created on first use; in a dry run each call is printed and not made."""

    def __init__(self, region: str | None = None, dry_run: bool = False, out=print):
        from botocore.config import Config

        self.session = _boto3().session.Session(region_name=region)
        self.region = region or self.session.region_name or "us-east-1"
        self.dry_run, self.out = dry_run, out
        self.config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30)
        self.clients: dict = {}
        self.texts: list[tuple[str, str]] = []  # long arguments of a dry run's calls, printed at its end

    def client(self, service: str):
        if service not in self.clients:
            self.clients[service] = self.session.client(service, region_name=self.region, config=self.config)
        return self.clients[service]

    def __call__(self, service: str, operation: str, note: str | None = None, **params):
        if self.dry_run:
            self.out(f"{service}.{operation}({self.show(params)})" + (f"  # {note}" if note else ""))
            return None
        return getattr(self.client(service), operation)(**params)

    def show(self, params: dict) -> str:
        """Arguments as JSON; JSON-encoded documents decoded for reading, long texts listed after the calls."""
        shown = {}
        for key, value in params.items():
            if key in ("UserData", "Body"):
                self.texts.append((key, value))
                value = f"<{key} {len(self.texts)}: {len(value.encode())} bytes, printed below>"
            elif isinstance(value, str) and value.startswith("{"):
                value = json.loads(value)
            shown[key] = value
        args = [f"{key}={json.dumps(value, default=str)}" for key, value in shown.items()]
        return ", ".join(args) if sum(map(len, args)) <= 90 else "\n    " + ",\n    ".join(args) + "\n"


def error_code(e: Exception) -> str | None:
    return getattr(e, "response", {}).get("Error", {}).get("Code")


# ---------------------------------------------------------------------------------------------------------
# Prices


def spot_prices(api: Api, instance_type: str, azs: list[str] | None = None) -> dict[str, float]:
    """The current spot price per availability zone (USD/h), cheapest first."""
    params = {"InstanceTypes": [instance_type], "ProductDescriptions": [PRODUCT],
              "StartTime": datetime.now(timezone.utc)}
    if azs:
        params["Filters"] = [{"Name": "availability-zone", "Values": azs}]
    response = api("ec2", "describe_spot_price_history", **params)
    latest: dict[str, tuple] = {}
    for item in (response or {}).get("SpotPriceHistory", []):
        az, when = item["AvailabilityZone"], item["Timestamp"]
        if az not in latest or when > latest[az][0]:
            latest[az] = (when, float(item["SpotPrice"]))
    return dict(sorted(((az, p) for az, (_, p) in latest.items()), key=lambda kv: (kv[1], kv[0])))


def integrate_cost(history: list[dict], start: datetime, end: datetime) -> float:
    """USD for running from `start` to `end` under a spot price history: each price holds from its timestamp
    until the next one (how EC2 bills spot: the price in effect, per second)."""
    points = sorted((h["Timestamp"], float(h["SpotPrice"])) for h in history)
    total = 0.0
    for i, (when, price) in enumerate(points):
        until = points[i + 1][0] if i + 1 < len(points) else end
        lo, hi = max(when, start), min(until, end)
        if hi > lo:
            total += price * (hi - lo).total_seconds() / 3600
    return total


def estimate(recipe, gpu: str | None, images: int | None) -> dict | None:
    """Hours for a recipe on one GPU kind: images x epochs / throughput, the throughput scaled from 224 px by
    pixel count to the recipe's train size. None when the GPU or the dataset size is unknown."""
    if gpu not in THROUGHPUT_224 or not images:
        return None
    per_s, source = THROUGHPUT_224[gpu]
    per_s *= (224 / recipe.augment.train_size) ** 2
    return {"hours": images * recipe.train.epochs / per_s / 3600, "img_per_s": per_s, "source": source}


def recipe_images(recipe) -> int | None:
    synthetic = recipe.data.synthetic
    if synthetic is not None:
        return synthetic.classes * synthetic.per_class
    return DATASET_IMAGES.get(recipe.export.dataset or "")


def price(instance_types: list[str], region: str | None = None, recipe=None, images: int | None = None,
          api: Api | None = None, out=print) -> list[dict]:
    """Print, per instance type, the spot price in each AZ, the on-demand price and, with a recipe, the
    estimated hours and cost; return the rows."""
    unknown = [t for t in instance_types if t not in INSTANCE_TYPES]
    if unknown or not instance_types:
        raise ValueError(f"--instance-types: {', '.join(unknown) or 'none given'}: not an instance type this "
                         f"command knows (its GPU, vCPUs and throughput); known: {', '.join(INSTANCE_TYPES)}")
    api = api or Api(region)
    images = images or (recipe_images(recipe) if recipe is not None else None)
    rows = []
    for itype in instance_types:
        gpu, gpus, vcpus, on_demand = INSTANCE_TYPES.get(itype, (None, None, None, None))
        prices = spot_prices(api, itype)
        cheapest = next(iter(prices.items()), (None, None))
        row = {"instance_type": itype, "gpu": gpu, "gpus": gpus, "vcpus": vcpus, "on_demand": on_demand,
               "spot": prices, "cheapest_az": cheapest[0], "spot_price": cheapest[1]}
        line = f"{itype:<14} {gpu or '?':>5} x{gpus or '?'}  {vcpus or '?':>3} vCPUs  on-demand " + \
            (f"${on_demand:.3f}/h" if on_demand else "   n/a  ")
        if prices:
            line += f"  spot ${cheapest[1]:.4f}/h in {cheapest[0]} (" + ", ".join(
                f"{az} {p:.4f}" for az, p in list(prices.items())[1:]) + ")"
        else:
            line += "  spot: not offered in this region"
        if recipe is not None:
            est = estimate(recipe, gpu, images)
            per_gpu = est and {**est, "hours": est["hours"] / (gpus or 1)}  # assumes DDP over every GPU
            row["estimate"] = per_gpu
            if per_gpu:
                costs = []
                if cheapest[1] is not None:
                    row["estimate"]["spot_cost"] = per_gpu["hours"] * cheapest[1]
                    costs.append(f"~${row['estimate']['spot_cost']:.2f} at that spot price")
                if on_demand:
                    costs.append(f"~${per_gpu['hours'] * on_demand:.2f} on-demand")
                line += f"\n{'':<16}{recipe.name}: ~{per_gpu['hours']:.1f} h, {', '.join(costs)} " \
                    f"({per_gpu['img_per_s'] * (gpus or 1):.0f} img/s assumed)"
            elif not images:
                line += f"\n{'':<16}{recipe.name}: pass --images N (train images per epoch) for an estimate"
            else:
                line += f"\n{'':<16}{recipe.name}: no throughput figure for this instance type's GPU"
        rows.append(row)
        out(line)
    if recipe is not None:
        out(f"\nEstimates, not quotes: ResNet-50 GPU throughput at {recipe.augment.train_size} px scaled by pixels "
            "from 224 px figures (" + "; ".join(f"{k} {v[0]} img/s: {v[1]}" for k, v in THROUGHPUT_224.items())
            + "). A 4-vCPU instance decoding JPEGs may feed the GPU more slowly than that; spot prices change "
            "hourly; storage and data transfer are extra.")
    return rows


# ---------------------------------------------------------------------------------------------------------
# Launch


def run_location(remote_root: str, name: str) -> tuple[str, str, str]:
    """s3://bucket/prefix + run name -> (bucket, key prefix of the run, s3 URL of the run)."""
    from .storage import parse_remote

    bucket, prefix = parse_remote(remote_root)
    if not re.fullmatch(r"[A-Za-z0-9._/-]*", prefix):
        raise ValueError(f"--bucket {remote_root}: use letters, digits and . _ / - in the prefix (it goes into the "
                         "instance's systemd unit)")
    run_prefix = f"{prefix}/{name}" if prefix else name
    return bucket, run_prefix, f"s3://{bucket}/{run_prefix}"


def check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}", name or ""):
        raise ValueError(f"run name {name!r}: use 1-40 letters, digits, '-' or '_' (it names the IAM role, the "
                         "tags and the S3 prefix)")
    return name


def asset(name: str) -> str:
    return (importlib.resources.files("resnet50_recipe.aws_files") / name).read_text()


def policy_document(bucket: str, prefix: str, reads: list[tuple[str, str]]) -> dict:
    """aws/iam-policy.json filled in: read-write on the run's prefix only, plus read-only on each (bucket, key or
    prefix) in `reads` (data, a wheel), plus the spot price history for cost tracking."""
    template = json.loads(asset("iam-policy.json"))
    statements = []
    for statement in template["Statement"]:
        if statement["Sid"].startswith("Read"):
            for i, (read_bucket, read_prefix) in enumerate(reads):
                filled = _fill(statement, read_bucket=read_bucket, read_prefix=read_prefix.strip("/"))
                statements.append({**filled, "Sid": f"{statement['Sid']}{i}"})
        else:
            statements.append(_fill(statement, bucket=bucket, prefix=prefix))
    return {**template, "Statement": statements}


def _fill(value, **names):
    if isinstance(value, str):
        for key, text in names.items():
            value = value.replace("${" + key + "}", text)
        return value
    if isinstance(value, list):
        return [_fill(v, **names) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, **names) for k, v in value.items()}
    return value


ASSUME_ROLE = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


def iam_get(api: Api, method: str, **kwargs):
    """An IAM get_* call's answer, or None when the entity does not exist."""
    from botocore.exceptions import ClientError

    try:
        return api("iam", method, **kwargs)
    except ClientError as e:
        if error_code(e) != "NoSuchEntity":
            raise
        return None


def ensure_instance_profile(api: Api, name: str, policy: dict) -> tuple[str, bool]:
    """The run's role (its policy set to `policy`) and instance profile, created when missing. Returns the
    profile name and whether anything was created (IAM then needs a few seconds before EC2 accepts it)."""
    role = profile = f"resnet50-recipe-{name}"
    created = False
    if iam_get(api, "get_role", RoleName=role) is None:
        api("iam", "create_role", note="when get_role finds none", RoleName=role,
            AssumeRolePolicyDocument=json.dumps(ASSUME_ROLE), Tags=[{"Key": TAG_RUN, "Value": name}],
            Description=f"resnet50-recipe run {name}: S3 access to its own prefix only")
        created = True
    api("iam", "put_role_policy", RoleName=role, PolicyName="resnet50-recipe-run",
        PolicyDocument=json.dumps(policy))
    found = iam_get(api, "get_instance_profile", InstanceProfileName=profile)
    if found is None:
        api("iam", "create_instance_profile", note="when get_instance_profile finds none",
            InstanceProfileName=profile, Tags=[{"Key": TAG_RUN, "Value": name}])
        created = True
    if found is None or not any(r["RoleName"] == role for r in found["InstanceProfile"]["Roles"]):
        api("iam", "add_role_to_instance_profile", note="when the profile lacks the role",
            InstanceProfileName=profile, RoleName=role)
        created = True
    return profile, created


def check_quota(api: Api, instance_type: str, vcpus: int | None) -> None:
    """Refuse when the spot vCPUs in use plus this instance's exceed the account's quota for its family.
    A quota that cannot be read (no permission, or moto) is warned about and skipped."""
    from botocore.exceptions import BotoCoreError, ClientError

    family = re.match(r"[a-z]+", instance_type).group(0)
    family = "vt" if family.startswith("vt") else family[:1]
    if family not in SPOT_QUOTAS:
        return
    code, quota_name = SPOT_QUOTAS[family]
    try:
        response = api("service-quotas", "get_service_quota", ServiceCode="ec2", QuotaCode=code)
    except (ClientError, BotoCoreError) as e:
        log.warning("could not read the spot vCPU quota %s (%s, %s): going on; if the launch fails with "
                    "MaxSpotInstanceCountExceeded, ask for more in the Service Quotas console", code, quota_name, e)
        return
    used = spot_vcpus_in_use(api, family)
    if response is None or vcpus is None:
        return  # dry run
    quota = response["Quota"]["Value"]
    if used + vcpus > quota:
        raise AwsError(f"{instance_type} needs {vcpus} vCPUs and {used} are in use by running spot instances, but "
                       f"the account's quota {code} ({quota_name}) in {api.region} is {quota:g} vCPUs; ask for an "
                       "increase in the Service Quotas console, or pick a smaller instance type (--instance-type)")


def spot_vcpus_in_use(api: Api, family: str) -> int:
    response = api("ec2", "describe_instances", Filters=[
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopping"]}])
    used = 0
    for reservation in (response or {}).get("Reservations", []):
        for inst in reservation["Instances"]:
            itype = inst["InstanceType"]
            if inst.get("InstanceLifecycle") == "spot" and re.match(rf"{family}\d", itype):
                cpu = inst.get("CpuOptions") or {}
                used += cpu.get("CoreCount", 0) * cpu.get("ThreadsPerCore", 1) or INSTANCE_TYPES.get(
                    itype, (0, 0, 0))[2]
    return used


def render_user_data(settings: dict) -> str:
    """aws/user-data.sh with its settings block replaced by these values (shell-quoted)."""
    template = asset("user-data.sh")
    begin, end = "# --- settings: written by `resnet50-recipe aws launch` ---", "# --- end of settings ---"
    head, rest = template.split(begin, 1)
    _, tail = rest.split(end, 1)
    lines = [f"{key}={shlex.quote(str(value))}" for key, value in settings.items()]
    return head + begin + "\n" + "\n".join(lines) + "\n" + end + tail


def launch(recipe_source: str, bucket: str, *, name: str | None = None, overrides: list[str] = (),
           instance_type: str = "g4dn.2xlarge", region: str | None = None, az: str = "auto",
           subnet: str | None = None, key_name: str | None = None, security_groups: list[str] = (),
           data: str | None = None, volume: str | None = None, ami: str | None = None,
           package: str | None = None, disk_gb: int | None = None, dry_run: bool = False, api: Api | None = None,
           out=print) -> dict:
    """Launch a persistent spot instance that trains `recipe_source` and mirrors the run to `bucket`/NAME.

    Order: validate the recipe; check the spot vCPU quota and that the run has no live instance; find the AMI;
    the run's IAM role and profile; upload the resolved recipe (and a local wheel) to the run's prefix;
    run_instances in the cheapest AZ, trying the next one on InsufficientInstanceCapacity. Returns what was
    launched. With `dry_run`, prints each call instead of making it.
    """
    _boto3()  # without boto3, say how to install it before anything else
    from botocore.exceptions import ClientError

    from .recipe import load_recipe, to_yaml
    from .storage import parse_remote

    recipe = load_recipe(recipe_source, list(overrides))  # a bad recipe fails here, before any AWS call
    name = check_name(name or recipe.name)
    run_bucket, run_prefix, remote = run_location(bucket, name)
    if data and volume:
        raise ValueError("--data and --volume both name the dataset; give one")
    if data is None and volume is None and recipe.data.synthetic is None:
        raise ValueError(f"recipe {recipe.name!r} reads a dataset: pass --data s3://... (a folder with train/ and "
                         "val/, or a .tar/.tar.gz of one) or --volume snap-... (an EBS snapshot holding them)")
    if volume and not re.fullmatch(r"snap-[0-9a-f]+", volume):
        raise ValueError(f"--volume {volume!r}: expected an EBS snapshot id, snap-...")
    reads = [parse_remote(data)] if data else []
    wheel_key = None
    if package and package.startswith("s3://"):
        reads.append(parse_remote(package))
    elif package and package.endswith(".whl"):
        if not Path(package).is_file():
            raise FileNotFoundError(f"--package {package}: no such wheel")
        wheel_key = f"{run_prefix}/launch/{Path(package).name}"
    api = api or Api(region, dry_run, out)
    if dry_run:
        out(f"# dry run: the AWS calls `aws launch` makes, in order, with their arguments; none was made.\n"
            f"# region {api.region}; answers that later calls depend on are shown as <...>.")

    # The instance's vCPUs, against the account's spot quota, before anything is created.
    described = api("ec2", "describe_instance_types", InstanceTypes=[instance_type])
    vcpus = described["InstanceTypes"][0]["VCpuInfo"]["DefaultVCpus"] if described else None
    check_quota(api, instance_type, vcpus)
    existing = [i for i in run_instances_of(api, name) if i["State"]["Name"] not in ("terminated", "shutting-down")]
    if existing:
        raise AwsError(f"run {name!r} already has instance {existing[0]['InstanceId']} "
                       f"({existing[0]['State']['Name']}); `resnet50-recipe aws stop {name}` first, or pick --name")

    image_id = ami or DLAMI_PARAMETER
    if image_id.startswith("/"):  # an SSM parameter holding the AMI id, by default the Deep Learning Base AMI's
        found = api("ssm", "get_parameter", Name=image_id)
        image_id = found["Parameter"]["Value"] if found else "<ami-id from ssm.get_parameter>"
    image = api("ec2", "describe_images", ImageIds=[image_id])
    if image is not None and not image["Images"]:
        raise AwsError(f"AMI {image_id} does not exist in {api.region}")
    root_device = image["Images"][0]["RootDeviceName"] if image else "/dev/sda1"

    profile, created = ensure_instance_profile(api, name, policy_document(run_bucket, run_prefix, reads))

    api("s3", "put_object", Bucket=run_bucket, Key=f"{run_prefix}/launch/recipe.yaml", Body=to_yaml(recipe),
        ContentType="text/yaml")
    if wheel_key:
        api("s3", "upload_file", Filename=str(package), Bucket=run_bucket, Key=wheel_key)
    settings = {
        "RUN": name, "REMOTE": remote, "REGION": api.region,
        "PACKAGE": (f"s3://{run_bucket}/{wheel_key}" if wheel_key else package)
        or f"resnet50-recipe[aws]=={__version__}",
        "DATA": data or "", "VOLUME": "yes" if volume else "", "EPOCHS_NOTE": f"{recipe.train.epochs} epochs",
    }
    user_data = render_user_data(settings)

    if disk_gb is None:  # ImageNet copied from S3 is ~150 GB, besides the AMI's files and the environment
        disk_gb = 300 if data and (recipe_images(recipe) or 0) > 100_000 else 150
    devices = [{"DeviceName": root_device, "Ebs": {"VolumeSize": disk_gb, "VolumeType": "gp3",
                                                   "DeleteOnTermination": True}}]
    if volume:
        devices.append({"DeviceName": "/dev/sdf", "Ebs": {"SnapshotId": volume, "VolumeType": "gp3",
                                                          "DeleteOnTermination": True}})
    tags = [{"Key": "Name", "Value": f"resnet50-recipe {name}"}, {"Key": TAG_RUN, "Value": name},
            {"Key": TAG_REMOTE, "Value": remote},
            {"Key": TAG_LAUNCHED, "Value": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}]
    params = {
        "ImageId": image_id, "InstanceType": instance_type, "MinCount": 1, "MaxCount": 1,
        "IamInstanceProfile": {"Name": profile}, "UserData": user_data, "BlockDeviceMappings": devices,
        "InstanceMarketOptions": {"MarketType": "spot", "SpotOptions": {
            "SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"}},
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "TagSpecifications": [{"ResourceType": kind, "Tags": tags}
                              for kind in ("instance", "spot-instances-request", "volume")],
    }
    if key_name:
        params["KeyName"] = key_name
    if security_groups:
        params["SecurityGroupIds"] = list(security_groups)
    if subnet:
        params["SubnetId"] = subnet
        zones = [None]
    elif az != "auto":
        zones = [az]
    else:
        zones = list(spot_prices(api, instance_type)) or ["<cheapest AZ from describe_spot_price_history>"]

    reservation, tried = None, []
    for zone in zones:
        placed = {**params, "Placement": {"AvailabilityZone": zone}} if zone else params
        for attempt in range(12):
            try:
                reservation = api("ec2", "run_instances", note="repeated in the next-cheapest AZ on "
                                  "InsufficientInstanceCapacity" if az == "auto" and not subnet else None, **placed)
                break
            except ClientError as e:
                code = error_code(e)
                # A role and profile created seconds ago are not yet visible to EC2 (IAM is eventually consistent).
                if created and code == "InvalidParameterValue" and "iamInstanceProfile" in str(e) and attempt < 11:
                    time.sleep(5)
                    continue
                if code in ("InsufficientInstanceCapacity", "Unsupported", "SpotMaxPriceTooLow") and len(zones) > 1:
                    tried.append(f"{zone}: {code}")
                    log.warning("no %s spot capacity in %s (%s); trying the next AZ", instance_type, zone, code)
                    break
                raise
        if reservation is not None or dry_run:
            break
    if dry_run:
        for i, (key, text) in enumerate(api.texts, 1):
            source = "aws/user-data.sh rendered" if key == "UserData" else "the resolved recipe"
            out(f"\n# <{key} {i}>: {source}\n{text.rstrip()}")
        return {"run": name, "remote": remote, "dry_run": True, "user_data": user_data}
    if reservation is None:
        raise AwsError(f"no {instance_type} spot capacity in any AZ of {api.region} ({'; '.join(tried)}); try "
                       "later, another --instance-type or --region")
    instance = reservation["Instances"][0]
    result = {"run": name, "remote": remote, "instance_id": instance["InstanceId"], "instance_type": instance_type,
              "az": instance.get("Placement", {}).get("AvailabilityZone"), "image_id": image_id,
              "instance_profile": profile, "spot_request_id": instance.get("SpotInstanceRequestId")}
    out(f"launched {result['instance_id']} ({instance_type}, spot, persistent) in {result['az']} for run {name}; "
        f"checkpoints and metrics go to {remote}\nfollow it with: resnet50-recipe aws status {name}  |  "
        f"resnet50-recipe aws logs {name}  |  resnet50-recipe aws stop {name}")
    return result


# ---------------------------------------------------------------------------------------------------------
# Watching and stopping


def run_instances_of(api: Api, name: str | None = None) -> list[dict]:
    """Instances launched by this tool (tagged), for one run or all, newest first."""
    flt = [{"Name": f"tag:{TAG_RUN}", "Values": [name]}] if name else [{"Name": "tag-key", "Values": [TAG_RUN]}]
    response = api("ec2", "describe_instances", Filters=flt)
    found = [i for r in (response or {}).get("Reservations", []) for i in r["Instances"]]
    return sorted(found, key=lambda i: i["LaunchTime"], reverse=True)


def tag(resource: dict, key: str) -> str | None:
    return next((t["Value"] for t in resource.get("Tags", []) if t["Key"] == key), None)


def spot_requests_of(api: Api, name: str, instances: list[dict]) -> list[dict]:
    """The run's spot requests: tagged at launch, or named by its instances."""
    found = {}
    response = api("ec2", "describe_spot_instance_requests", Filters=[{"Name": f"tag:{TAG_RUN}", "Values": [name]}])
    for request in (response or {}).get("SpotInstanceRequests", []):
        found[request["SpotInstanceRequestId"]] = request
    ids = [i["SpotInstanceRequestId"] for i in instances if i.get("SpotInstanceRequestId")
           and i["SpotInstanceRequestId"] not in found]
    if ids:
        response = api("ec2", "describe_spot_instance_requests", SpotInstanceRequestIds=ids)
        for request in (response or {}).get("SpotInstanceRequests", []):
            found[request["SpotInstanceRequestId"]] = request
    return list(found.values())


def _require(instances: list[dict], name: str, region: str) -> dict:
    if not instances:
        raise AwsError(f"no instance tagged {TAG_RUN}={name} in {region}; `resnet50-recipe aws ls` lists the runs")
    return instances[0]


def run_status(name: str, region: str | None = None, api: Api | None = None, store=None) -> dict:
    """The run's instance and spot request, its last checkpoint and metrics from S3, cost so far and ETA."""
    from .runlog import read_metrics
    from .storage import S3Store

    api = api or Api(region)
    instances = run_instances_of(api, name)
    instance = _require(instances, name, api.region)
    requests = spot_requests_of(api, name, instances)
    remote = tag(instance, TAG_REMOTE)
    status = {"run": name, "remote": remote, "instance_id": instance["InstanceId"],
              "instance_type": instance["InstanceType"], "state": instance["State"]["Name"],
              "az": instance.get("Placement", {}).get("AvailabilityZone"),
              "spot_requests": [{"id": r["SpotInstanceRequestId"], "state": r["State"],
                                 "status": r.get("Status", {}).get("Code")} for r in requests]}

    store = store or S3Store(remote)
    manifest, _ = store.get_json("checkpoints/latest.json")
    if manifest and manifest.get("file"):  # a new lineage lists no checkpoint until its first one
        head = store.head("checkpoints/latest.json")
        status["checkpoint"] = {"file": manifest["file"], "epoch": manifest["epoch"], "step": manifest["step"],
                                "time": head["LastModified"].isoformat() if head else None}
    metrics = []
    if store.head("metrics.jsonl") is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            store.download_file("metrics.jsonl", Path(tmp) / "metrics.jsonl")
            metrics = read_metrics(Path(tmp) / "metrics.jsonl")
    epochs = [r for r in metrics if r.get("kind") == "epoch"]
    steps = [r for r in metrics if r.get("kind") == "step"]
    if epochs:
        status["last_epoch"] = {k: epochs[-1].get(k) for k in ("epoch", "train_loss", "top1", "top5", "ema_top1")}
    if steps:
        status["last_step"] = {k: steps[-1].get(k) for k in ("epoch", "step", "loss", "lr", "img_per_s")}
    summary, _ = store.get_json("summary.json")
    recipe_epochs = _recipe_epochs(store)
    status["finished"] = bool(summary) and summary.get("stopped") is False
    if epochs and recipe_epochs and not status["finished"]:
        recent = [r["epoch_time_s"] for r in epochs[-3:] if r.get("epoch_time_s")]
        left = recipe_epochs - (epochs[-1]["epoch"] + 1)
        if recent:
            status["eta_hours"] = left * sum(recent) / len(recent) / 3600
    status["epochs"] = recipe_epochs

    launched = tag(instance, TAG_LAUNCHED)
    if launched and status["az"]:
        start = datetime.fromisoformat(launched.replace("Z", "+00:00"))
        now = datetime.now(timezone.utc)
        history = api("ec2", "describe_spot_price_history", InstanceTypes=[instance["InstanceType"]],
                      ProductDescriptions=[PRODUCT], AvailabilityZone=status["az"],
                      StartTime=start - timedelta(days=1), EndTime=now)["SpotPriceHistory"]
        status["cost_usd_upper_bound"] = integrate_cost(history, start, now)
        status["hours_since_launch"] = (now - start).total_seconds() / 3600
    recorded = [r["cost_usd"] for r in metrics if r.get("cost_usd") is not None]
    if recorded:
        status["cost_usd_recorded"] = recorded[-1]
    return status


def _recipe_epochs(store) -> int | None:
    import yaml

    for name in ("recipe.yaml", "launch/recipe.yaml"):
        try:
            body = store.client.get_object(Bucket=store.bucket, Key=store.key(name))["Body"].read()
        except store.client.exceptions.NoSuchKey:
            continue
        return (yaml.safe_load(body) or {}).get("train", {}).get("epochs")
    return None


def print_status(status: dict, out=print) -> None:
    out(f"run {status['run']}: instance {status['instance_id']} ({status['instance_type']}, {status['az']}) "
        f"is {status['state']}")
    for r in status["spot_requests"]:
        out(f"  spot request {r['id']}: {r['state']} ({r['status']})")
    ck = status.get("checkpoint")
    out(f"  last checkpoint: epoch {ck['epoch']}, step {ck['step']}, at {ck['time']} ({ck['file']})" if ck
        else "  last checkpoint: none in S3 yet")
    if status.get("last_epoch"):
        e = status["last_epoch"]
        top1 = "-" if e.get("top1") is None else f"{e['top1']:.4f}"
        out(f"  epoch {e['epoch'] + 1}/{status.get('epochs') or '?'}: train loss {e['train_loss']:.4f}, "
            f"val top-1 {top1}")
    if status.get("last_step"):
        s = status["last_step"]
        out(f"  latest step: epoch {s['epoch'] + 1} step {s['step']}, loss {s['loss']:.4f}, "
            f"{s['img_per_s']:.0f} img/s")
    if "cost_usd_upper_bound" in status:
        out(f"  cost so far: at most ${status['cost_usd_upper_bound']:.2f} (spot price history x "
            f"{status['hours_since_launch']:.1f} h since launch; hours stopped by an interruption are not billed)"
            + (f"; ${status['cost_usd_recorded']:.2f} recorded by the training process"
               if "cost_usd_recorded" in status else ""))
    if status.get("finished"):
        out(f"  finished; the instance powers itself off: `resnet50-recipe aws stop {status['run']}` deletes it "
            "and its disk, keeping S3")
    elif "eta_hours" in status:
        out(f"  ETA: {status['eta_hours']:.1f} h of training (mean of the last epochs' times)")
    out(f"  files: {status['remote']}")


def logs(name: str, region: str | None = None, api: Api | None = None) -> str:
    """The instance's console output: the setup log and the training log (the unit writes to the console)."""
    api = api or Api(region)
    instance = _require(run_instances_of(api, name), name, api.region)
    response = api("ec2", "get_console_output", InstanceId=instance["InstanceId"], Latest=True)
    return response.get("Output") or f"(no console output yet from {instance['InstanceId']}; it appears a few " \
        "minutes after boot)"


def stop(name: str, region: str | None = None, api: Api | None = None, out=print) -> dict:
    """Cancel the run's persistent spot request first (else EC2 would replace the instance), then terminate its
    instances. S3 is left as it is."""
    api = api or Api(region)
    instances = [i for i in run_instances_of(api, name) if i["State"]["Name"] != "terminated"]
    requests = [r for r in spot_requests_of(api, name, instances)
                if r["State"] in ("open", "active", "disabled")]
    if not instances and not requests:
        raise AwsError(f"run {name!r} has no live instance or spot request in {api.region}")
    if requests:
        api("ec2", "cancel_spot_instance_requests", SpotInstanceRequestIds=[r["SpotInstanceRequestId"]
                                                                             for r in requests])
    ids = sorted({i["InstanceId"] for i in instances} | {r["InstanceId"] for r in requests if r.get("InstanceId")})
    if ids:
        api("ec2", "terminate_instances", InstanceIds=ids)
    out(f"run {name}: cancelled {len(requests)} spot request(s), terminating {', '.join(ids) or 'nothing'}; "
        f"the files in S3 stay ({tag(instances[0], TAG_REMOTE) if instances else 'its prefix'})")
    return {"cancelled": [r["SpotInstanceRequestId"] for r in requests], "terminated": ids}


def ls(region: str | None = None, api: Api | None = None, out=print) -> list[dict]:
    api = api or Api(region)
    rows = []
    for i in run_instances_of(api):
        rows.append({"run": tag(i, TAG_RUN), "instance_id": i["InstanceId"], "instance_type": i["InstanceType"],
                     "state": i["State"]["Name"], "az": i.get("Placement", {}).get("AvailabilityZone"),
                     "launched": tag(i, TAG_LAUNCHED), "remote": tag(i, TAG_REMOTE)})
        r = rows[-1]
        out(f"{r['run']}  {r['instance_id']}  {r['instance_type']}  {r['state']}  {r['az']}  launched "
            f"{r['launched']}  {r['remote']}")
    if not rows:
        out(f"no runs launched by resnet50-recipe in {api.region}")
    return rows


# ---------------------------------------------------------------------------------------------------------
# On the instance: the cost of the machine a run trains on


class InstanceCost:
    """Fields merged into every metrics.jsonl record on EC2: the instance type, AZ, market, the price now and the
    cost so far (price x time of the training processes, carried over from the last record of an earlier one).

    It asks the instance metadata (through the spot watcher's IMDSv2 session) once, and the spot price at most
    every `refresh_s` seconds, never per step. Only the first price is read in the caller's thread; later
    refreshes run in a background thread, so a slow or hanging EC2 API never stalls training. Boot, install and
    time spent stopped are not in `cost_usd`; `aws status` gives the bill's upper bound from the price history.
    """

    def __init__(self, watcher, metrics_path: Path, refresh_s: float = 600.0):
        self.watcher, self.refresh_s = watcher, refresh_s
        self.identity: dict | None = None
        self.price: float | None = None
        self.priced_at = -float("inf")
        self.pricing: threading.Thread | None = None
        self.cost = 0.0
        try:
            from .runlog import read_metrics

            costs = [r["cost_usd"] for r in read_metrics(metrics_path) if r.get("cost_usd") is not None]
            self.cost = costs[-1] if costs else 0.0
        except (OSError, ValueError):
            pass
        self.last = time.time()

    def __call__(self) -> dict:
        now = time.time()
        try:
            if self.identity is None:
                get = self.watcher.get
                self.identity = {"instance_type": get("instance-type"), "az": get("placement/availability-zone"),
                                 "region": get("placement/region"), "market": get("instance-life-cycle")}
        except (OSError, ValueError) as e:
            log.debug("instance metadata: %s", e)
            return {}
        if self.identity["instance_type"] is None:
            return {}  # a metadata service that does not know the instance: nothing to record
        if now - self.priced_at >= self.refresh_s and (self.pricing is None or not self.pricing.is_alive()):
            first = self.priced_at == -float("inf")
            self.priced_at = now
            if first:
                self.price = self.current_price()
            else:
                self.pricing = threading.Thread(target=self.refresh_price, name="spot-price", daemon=True)
                self.pricing.start()
        if self.price is not None:
            self.cost += (now - self.last) / 3600 * self.price
        self.last = now
        ident = self.identity
        return {"instance_type": ident["instance_type"], "az": ident["az"], "market": ident["market"],
                "price_usd_per_h": self.price, "cost_usd": self.cost if self.price is not None else None}

    def refresh_price(self) -> None:
        price = self.current_price()
        if price is not None:  # a failed refresh keeps the last known price
            self.price = price

    def current_price(self) -> float | None:
        ident = self.identity
        if ident["market"] != "spot":
            return INSTANCE_TYPES.get(ident["instance_type"], (None,) * 4)[3]
        try:
            prices = spot_prices(Api(ident["region"]), ident["instance_type"], [ident["az"]])
            return prices.get(ident["az"])
        except Exception as e:  # no boto3, no permission, no network: training goes on without a price
            log.warning("could not read the spot price of %s in %s (%s); cost is not recorded until it can be",
                        ident["instance_type"], ident["az"], e)
            return None
