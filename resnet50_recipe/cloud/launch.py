"""AWS spot runs from the command line, on the laptop: price, launch, status, logs, stop, ls. What runs on the
instance is elsewhere: the cost of its machine in trainer/budget.py, the rest in cloud/user-data.sh.

Every AWS call goes through `Api`, so that `--dry-run` can print each call with its arguments instead of making
it. Clients are plain boto3 clients: credentials and region come from boto3's chain, and boto3 itself honours
AWS_ENDPOINT_URL (and AWS_ENDPOINT_URL_<SERVICE>), so the whole CLI runs against a moto server too.

The files a user may read or edit sit beside this module (package data of `resnet50_recipe.cloud`): the
instance's user data (user-data.sh) and the IAM policy template (iam-policy.json).
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import re
import shlex
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from resnet50_recipe.cloud import ship
from resnet50_recipe.cloud.api import SECRET, TAG_LAUNCHED, TAG_REMOTE, TAG_RUN, Api, AwsError, _boto3, error_code
from resnet50_recipe.cloud.cost import THROUGHPUT_224, batch_advice, finish, recipe_images
from resnet50_recipe.cloud.instances import run_instances_of
from resnet50_recipe.cloud.ship import Package
from resnet50_recipe.ec2 import INSTANCE_TYPES, spot_prices
from resnet50_recipe.errors import UserError
from resnet50_recipe.recipe import load_recipe, to_yaml
from resnet50_recipe.store.s3 import parse_remote

__all__ = ["DLAMI_PARAMETER", "SPOT_QUOTAS", "run_location", "check_name", "asset", "policy_document", "ASSUME_ROLE",
           "iam_get", "ensure_instance_profile", "quota_family", "spot_quota", "check_quota", "spot_vcpus_in_use",
           "render_user_data", "Plan", "plan_launch", "INSTANCE_DATA_DIR", "check_for_the_instance",
           "training_processes", "cost_to_finish", "rank_types", "hourly_price", "price_source", "budget_refusal",
           "check_free", "find_image", "ARCHIVES", "check_data",
           "hub_token", "store_token", "delete_token", "upload_launch_files", "UPLOAD_RULE_ID", "offer_upload_rule",
           "instance_params", "NO_CAPACITY", "place", "SPOT_REQUEST", "record_spot_request", "launch"]

log = logging.getLogger(__name__)


# The AWS Deep Learning Base AMI (Ubuntu 22.04, NVIDIA driver, x86_64), through its public SSM parameter, so that a
# launch always gets the current image instead of a hard-coded AMI id, which goes stale.
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"


# Spot vCPU quotas per instance family (Service Quotas, service code "ec2"). L-34B43A08 is the quota for
# *standard* instances; g4dn counts against the G and VT one.
SPOT_QUOTAS = {"g": ("L-3819A6DF", "All G and VT Spot Instance Requests"),
               "vt": ("L-3819A6DF", "All G and VT Spot Instance Requests"),
               "p": ("L-7212CCBC", "All P Spot Instance Requests")}


# ---------------------------------------------------------------------------------------------------------
# Launch


def run_location(remote_root: str, name: str) -> tuple[str, str, str]:
    """s3://bucket/prefix + run name -> (bucket, key prefix of the run, s3 URL of the run)."""

    bucket, prefix = parse_remote(remote_root)
    if not re.fullmatch(r"[A-Za-z0-9._/-]*", prefix):
        raise UserError(f"--bucket {remote_root}: use letters, digits and . _ / - in the prefix (it goes into the "
                        "instance's systemd unit)")
    run_prefix = f"{prefix}/{name}" if prefix else name
    return bucket, run_prefix, f"s3://{bucket}/{run_prefix}"


def check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}", name or ""):
        raise UserError(f"run name {name!r}: use 1-40 letters, digits, '-' or '_' (it names the IAM role, the "
                        "tags and the S3 prefix)")
    return name


def asset(name: str) -> str:
    return (importlib.resources.files("resnet50_recipe.cloud") / name).read_text()


def policy_document(bucket: str, prefix: str, reads: list[tuple[str, str]], region: str = "us-east-1",
                    run: str = "", token: str | None = None, release: bool = True) -> dict:
    """iam-policy.json filled in: read-write on the run's prefix only, read-only on each (bucket, key or
    prefix) in `reads` (data, a wheel), the spot price history for cost tracking; with `release`, cancelling and
    terminating only what is tagged with the run's name (its own request and instance); with `token`, reading
    only that SSM parameter."""
    template = json.loads(asset("iam-policy.json"))
    names = dict(bucket=bucket, prefix=prefix, region=region, run=run, token=(token or "").lstrip("/"))
    statements = []
    for statement in template["Statement"]:
        sid = statement["Sid"]
        if sid.startswith("Read"):
            for i, (read_bucket, read_prefix) in enumerate(reads):
                filled = _fill(statement, read_bucket=read_bucket, read_prefix=read_prefix.strip("/"))
                statements.append({**filled, "Sid": f"{sid}{i}"})
        elif (sid.startswith("Release") and release) or (sid.startswith("HubToken") and token) or \
                not sid.startswith(("Release", "HubToken")):
            statements.append(_fill(statement, **names))
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
            Description=f"resnet50-recipe run {name}: its own S3 prefix, instance and spot request only")
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


def quota_family(instance_type: str) -> str | None:
    family = re.match(r"[a-z]+", instance_type).group(0)
    family = "vt" if family.startswith("vt") else family[:1]
    return family if family in SPOT_QUOTAS else None


def spot_quota(api: Api, family: str, known: dict) -> tuple[float, int] | None:
    """(the account's spot vCPU quota for the family, vCPUs in use), read once per family into `known`; None when
    it cannot be read (no permission, moto: warned about) or in a dry run."""
    from botocore.exceptions import BotoCoreError, ClientError

    if family in known:
        return known[family]
    code, quota_name = SPOT_QUOTAS[family]
    known[family] = None
    try:
        response = api("service-quotas", "get_service_quota", ServiceCode="ec2", QuotaCode=code)
    except (ClientError, BotoCoreError) as e:
        log.warning("could not read the spot vCPU quota %s (%s, %s): going on; if the launch fails with "
                    "MaxSpotInstanceCountExceeded, ask for more in the Service Quotas console", code, quota_name, e)
        return None
    used = spot_vcpus_in_use(api, family)
    if response is not None:
        known[family] = (response["Quota"]["Value"], used)
    return known[family]


def check_quota(api: Api, instance_type: str, vcpus: int | None, known: dict) -> str | None:
    """Why the spot vCPUs in use plus this instance's exceed the account's quota for its family; None if they fit
    or the quota is unknown."""
    family = quota_family(instance_type)
    found = spot_quota(api, family, known) if family else None
    if found is None or vcpus is None:
        return None
    (quota, used), (code, quota_name) = found, SPOT_QUOTAS[family]
    if used + vcpus <= quota:
        return None
    return (f"{instance_type} needs {vcpus} vCPUs and {used} are in use by running spot instances, but the "
            f"account's quota {code} ({quota_name}) in {api.region} is {quota:g} vCPUs; ask for an increase in the "
            "Service Quotas console, or pick a smaller instance type (--instance-type)")


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
    """user-data.sh with its settings block replaced by these values (shell-quoted)."""
    template = asset("user-data.sh")
    begin, end = "# --- settings: written by `resnet50-recipe aws launch` ---", "# --- end of settings ---"
    head, rest = template.split(begin, 1)
    _, tail = rest.split(end, 1)
    lines = [f"{key}={shlex.quote(str(value))}" for key, value in settings.items()]
    return head + begin + "\n" + "\n".join(lines) + "\n" + end + tail


@dataclass
class Plan:
    """What a launch was asked for, checked before any AWS call."""
    recipe: object
    name: str
    bucket: str
    prefix: str
    remote: str
    types: list[str]  # in the order to try; ["auto"] is ranked once prices are known
    package: Package
    data: str | None = None
    volume: str | None = None
    disk_gb: int = 150
    budget_usd: float | None = None
    push: str | None = None
    keep_instance: bool = False
    reads: list = field(default_factory=list)

    @property
    def wheel_key(self) -> str | None:
        name = self.package.wheel_name
        return f"{self.prefix}/launch/{name}" if name else None

    @property
    def token_parameter(self) -> str | None:
        return f"/resnet50-recipe/{self.name}/hf-token" if self.push else None


def plan_launch(recipe_source: str, bucket: str, name: str | None, overrides: list[str], instance_type: str,
                data: str | None, volume: str | None, package: str | None, disk_gb: int | None,
                budget_usd: float | None, push: str | None, private: bool, keep_instance: bool) -> Plan:
    """Step 1: the recipe resolved and validated, with the budget and the Hub repository in it; the run's
    name and prefix; the data; the package the instance installs. Bad input fails here, before any AWS call."""

    if budget_usd is not None:
        overrides = [*overrides, f"train.budget_usd={budget_usd}"]
    if push:
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", push):
            raise UserError(f"--push {push!r}: expected a Hugging Face repository id, USER/NAME")
        overrides = [*overrides, f"export.repo_id={push}", f"export.private={str(private).lower()}",
                     "export.enabled=true"]
    recipe = load_recipe(recipe_source, list(overrides))
    name = check_name(name or recipe.name)
    run_bucket, run_prefix, remote = run_location(bucket, name)
    if data and volume:
        raise UserError("--data and --volume both name the dataset; give one")
    if data is None and volume is None and recipe.data.synthetic is None:
        raise UserError(f"recipe {recipe.name!r} reads a dataset: pass --data s3://... (a folder with train/ and "
                        "val/, or a .tar/.tar.gz of one) or --volume snap-... (an EBS snapshot holding them)")
    if volume and not re.fullmatch(r"snap-[0-9a-f]+", volume):
        raise UserError(f"--volume {volume!r}: expected an EBS snapshot id, snap-...")
    types = [t.strip() for t in instance_type.split(",") if t.strip()]
    if not types or ("auto" in types and len(types) > 1):
        raise UserError(f"--instance-type {instance_type!r}: one type, a comma-separated list, or auto")
    chosen = ship.choose(package)
    reads = [parse_remote(data)] if data else []
    if chosen.spec and chosen.spec.startswith("s3://"):
        reads.append(parse_remote(chosen.spec))
    if disk_gb is None:  # ImageNet copied from S3 is ~150 GB, besides the AMI's files and the environment
        disk_gb = 300 if data and (recipe_images(recipe) or 0) > 100_000 else 150
    check_for_the_instance(recipe, push)
    return Plan(recipe, name, run_bucket, run_prefix, remote, types, chosen, data, volume, disk_gb, budget_usd,
                push, keep_instance, reads)


# Where the instance has the dataset (user-data.sh's DATA_DIR): the one folder of its own a recipe can name.
INSTANCE_DATA_DIR = "/data/dataset"


def check_for_the_instance(recipe, push: str | None) -> None:
    """What the trainer's check_inputs and check_export_settings (trainer/run.py) would refuse on the instance,
    with exit 2 after the whole set-up, because of what the instance has: the package with the [aws] extra only,
    a Hub token only with --push, and none of this machine's files but the recipe (and the dataset)."""
    ec = recipe.export
    if ec.enabled and ec.repo_id and not push:
        raise UserError(f"export.repo_id: {ec.repo_id!r} without --push: the instance gets a Hub token only with "
                        f"--push; pass --push {ec.repo_id}, or --set export.repo_id=null and push later with "
                        "`resnet50-recipe push`")
    if recipe.log.wandb:
        raise UserError("log.wandb: true: the instance installs resnet50-recipe[aws], without wandb, and has no W&B "
                        "login; set log.wandb=false (the metrics go to S3 and `resnet50-recipe aws status`)")
    if ec.enabled and ec.label_names and not str(ec.label_names).startswith(INSTANCE_DATA_DIR + "/"):
        raise UserError(f"export.label_names: {str(ec.label_names)!r} is a file on this machine, which the instance "
                        f"does not have; put it in the dataset and name it by its path there "
                        f"({INSTANCE_DATA_DIR}/...), or leave it unset")


def training_processes(instance_type: str) -> int | None:
    """How many training processes the instance runs: one per GPU (user-data.sh counts them); None if unknown."""
    return INSTANCE_TYPES.get(instance_type, (None, None))[1]


def cost_to_finish(plan: Plan, instance_type: str, spot: float | None) -> float | None:
    """Estimated USD to train the recipe on `instance_type` at the spot price: cost.finish's hours (DDP over every
    GPU, no faster than the vCPUs decode) times the price, plus the root volume for as long (aws price's estimate)."""
    finished = finish(plan.recipe, instance_type, spot, disk_gb=plan.disk_gb)
    return None if finished is None else finished["usd"]


def rank_types(api: Api, plan: Plan, quotas: dict, out) -> list[tuple[str, dict]]:
    """Step 2: the instance types to try, each with its spot price per AZ. `auto` ranks every type of the table
    with a throughput figure that fits the spot quota by estimated cost to finish; a list keeps its order. With a
    budget, types whose estimate passes it are dropped, and none left is a refusal that lists the estimates. A dry
    run reads no spot prices: it estimates at the on-demand list price (ec2.INSTANCE_TYPES) and says so."""
    auto = plan.types == ["auto"]
    candidates = [t for t in INSTANCE_TYPES if INSTANCE_TYPES[t][0] in THROUGHPUT_224] if auto else plan.types
    rows = []
    for itype in candidates:
        vcpus = INSTANCE_TYPES[itype][2] if itype in INSTANCE_TYPES else None
        if vcpus is None:
            described = api("ec2", "describe_instance_types", InstanceTypes=[itype])
            vcpus = described["InstanceTypes"][0]["VCpuInfo"]["DefaultVCpus"] if described else None
        refused = check_quota(api, itype, vcpus, quotas)
        if refused and not auto:
            raise AwsError(refused)
        prices = spot_prices(api, itype) if not refused else {}
        if refused or (auto and not prices and not api.dry_run):
            continue
        rows.append((itype, prices, cost_to_finish(plan, itype, hourly_price(api, itype, prices))))
    if auto:
        rows.sort(key=lambda r: (r[2] is None, r[2] or 0.0))
        out(f"instance types by estimated cost to finish ({price_source(api)} x hours from the per-GPU throughput "
            "table, plus the disk): " + ", ".join(f"{t} ~${c:.2f}" if c is not None else f"{t} ?" for t, _, c in rows))
    if plan.budget_usd is not None:
        fits = [r for r in rows if r[2] is None or r[2] <= plan.budget_usd]
        if not fits:
            raise AwsError(budget_refusal(api, plan, rows))
        rows = fits
        if api.dry_run:
            out(f"--budget-usd {plan.budget_usd:g}: checked at the on-demand list price (a dry run reads no spot "
                "prices): " + ", ".join(f"{t} ~${c:.2f}" if c is not None else f"{t} not checked (no list price or "
                                        "throughput figure)" for t, _, c in rows))
    if not rows:
        raise AwsError(f"no instance type fits the account's spot quotas in {api.region}")
    train = plan.recipe.train
    for itype, _, _ in rows[:3]:  # the types a launch is likely to land on
        processes = training_processes(itype)
        if processes and processes > 1:  # train.batch_size is per process; the lr follows the global batch
            out(f"{itype}: {processes} GPUs, {processes} training processes (one per GPU): a global batch of "
                f"{processes} x {train.batch_size} x {train.accum_steps} = "
                f"{processes * train.batch_size * train.accum_steps} images per step, the learning rate scaled to it "
                "(docs/distributed.md)")
        advice = batch_advice(plan.recipe, INSTANCE_TYPES.get(itype, (None,))[0])
        if advice:
            out(f"{itype}: {advice}")
    return [(t, prices) for t, prices, _ in rows]


def hourly_price(api: Api, instance_type: str, prices: dict) -> float | None:
    """The price an estimate uses: the cheapest AZ's spot price; in a dry run, which reads none, the on-demand list
    price (an upper bound: spot is usually lower)."""
    if api.dry_run:
        return INSTANCE_TYPES.get(instance_type, (None, None, None, None))[3]
    return next(iter(prices.values()), None)


def price_source(api: Api) -> str:
    return "on-demand list price" if api.dry_run else "spot price"


def budget_refusal(api: Api, plan: Plan, rows: list) -> str:
    """The estimates that pass the budget, and the types of the table whose estimate fits it (the cheaper choices)."""
    shown = {t for t, _, _ in rows}
    others = []
    for itype in INSTANCE_TYPES:
        if itype not in shown and INSTANCE_TYPES[itype][0] in THROUGHPUT_224:
            prices = {} if api.dry_run else spot_prices(api, itype)
            cost = cost_to_finish(plan, itype, hourly_price(api, itype, prices))
            if cost is not None and cost <= plan.budget_usd:
                others.append((cost, itype))
    estimates = "; ".join(f"{t} ~${c:.2f}" for t, _, c in rows)
    cheaper = ", ".join(f"{t} ~${c:.2f}" for c, t in sorted(others)) or "none of the instance types this command knows"
    dry = " (a dry run reads no spot prices; spot is usually lower, and the launch checks again at the spot " \
        "price)" if api.dry_run else ""
    return (f"--budget-usd {plan.budget_usd:g}: the estimate for {plan.recipe.name} passes it ({estimates}: "
            f"{price_source(api)} x hours{dry} from the per-GPU throughput table, plus {plan.disk_gb} GB of gp3 for as "
            f"long); within the budget: {cheaper}. Try --instance-type auto, fewer epochs (--set train.epochs=N) or a "
            "larger budget")


def check_free(api: Api, name: str) -> None:
    existing = [i for i in run_instances_of(api, name) if i["State"]["Name"] not in ("terminated", "shutting-down")]
    if existing:
        raise AwsError(f"run {name!r} already has instance {existing[0]['InstanceId']} "
                       f"({existing[0]['State']['Name']}); `resnet50-recipe aws stop {name}` first, or pick --name")


def find_image(api: Api, ami: str | None) -> tuple[str, str]:
    """Step 3: the AMI id (through an SSM parameter, by default the Deep Learning Base AMI's) and its root device."""
    image_id = ami or DLAMI_PARAMETER
    if image_id.startswith("/"):
        found = api("ssm", "get_parameter", Name=image_id)
        image_id = found["Parameter"]["Value"] if found else "<ami-id from ssm.get_parameter>"
    image = api("ec2", "describe_images", ImageIds=[image_id])
    if image is not None and not image["Images"]:
        raise AwsError(f"AMI {image_id} does not exist in {api.region}")
    return image_id, image["Images"][0]["RootDeviceName"] if image else "/dev/sda1"


# What user-data.sh streams into tar; any other --data is a folder it copies with `aws s3 sync`.
ARCHIVES = (".tar", ".tar.gz", ".tgz")


def check_data(api: Api, data: str) -> None:
    """Step 3b with --data: what the instance will copy is there, read with the launching credentials. On the
    instance `aws s3 sync` of a missing prefix copies nothing and exits 0, and the trainer exits 2 after the whole
    set-up; `aws s3 cp` of a missing archive fails every setup, a crash each time. A folder needs an object under
    its train/ and its val/, an archive must exist. Credentials that may not read the data warn, and the launch goes
    on (the run role is granted the read, and a bucket policy may grant it to the role alone)."""
    from botocore.exceptions import ClientError

    bucket, key = parse_remote(data)
    archive = data.endswith(ARCHIVES)
    for split in [None] if archive else ["train", "val"]:
        try:
            if archive:
                api("s3", "head_object", Bucket=bucket, Key=key)
                continue
            found = api("s3", "list_objects_v2", Bucket=bucket, Prefix=f"{key}/{split}/".lstrip("/"), MaxKeys=1)
            if found is None or found["KeyCount"]:  # (a dry run reads nothing)
                continue
            missing = f"no {split}/ under it"
        except ClientError as e:
            code = error_code(e)
            if code in ("AccessDenied", "403"):
                log.warning("could not read --data %s (%s): going on unchecked", data, code)
                return
            if code not in ("NoSuchBucket", "404"):  # head_object's errors have no body, only the status
                raise
            missing = "no such bucket" if code == "NoSuchBucket" else "no such object"
        raise UserError(f"{data}: {missing}; --data takes a folder with train/ and val/, or a .tar/.tar.gz of one")


def hub_token() -> str:
    """HF_TOKEN, else the token of the local huggingface_hub login."""
    import os

    token = os.environ.get("HF_TOKEN")
    if not token:
        try:
            from huggingface_hub import get_token
            token = get_token()
        except ImportError:
            token = None
    if not token:
        raise UserError("--push needs a Hugging Face token with write access: set HF_TOKEN or run "
                        "`huggingface-cli login`")
    return token


def store_token(api: Api, plan: Plan, token: str) -> None:
    """Step 7 with --push: the token (read in step 1) as an SSM SecureString under the run's name (the run role may
    read only this parameter). The dry run shows the call with the value hidden."""
    api("ssm", "put_parameter", Name=plan.token_parameter, Type="SecureString", Overwrite=True,
        Value=token, Description=f"Hugging Face token of resnet50-recipe run {plan.name} (push to {plan.push})")


def delete_token(api: Api, plan: Plan) -> None:
    """The token's parameter of a launch that placed no instance: nothing will read it, and `aws stop` finds no run
    to delete it with. A failed delete is a warning, so that it never hides why the launch failed."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        api("ssm", "delete_parameter", Name=plan.token_parameter)
    except (ClientError, BotoCoreError) as e:
        log.warning("could not delete the Hub token's SSM parameter %s (%s); delete it with: aws ssm "
                    "delete-parameter --name %s", plan.token_parameter, e, plan.token_parameter)


def upload_launch_files(api: Api, plan: Plan) -> str:
    """Step 5: the resolved recipe, and the wheel (built first when it is this checkout), to the run's prefix;
    what the instance pip-installs."""

    api("s3", "put_object", Bucket=plan.bucket, Key=f"{plan.prefix}/launch/recipe.yaml",
        Body=to_yaml(plan.recipe), ContentType="text/yaml")
    chosen = plan.package
    if plan.wheel_key is None:
        return chosen.spec
    wheel = chosen.wheel
    if chosen.build_from is not None:
        wheel = ship.build_wheel(chosen.build_from) if not api.dry_run else None
    elif chosen.installed is not None:
        wheel = ship.pack_installed(chosen.installed) if not api.dry_run else None
    made = "packed from the installed files" if chosen.installed is not None else "built by pip wheel"
    api("s3", "upload_file", Filename=str(wheel) if wheel else f"<{chosen.wheel_name}, {made}>",
        Bucket=plan.bucket, Key=plan.wheel_key)
    return f"s3://{plan.bucket}/{plan.wheel_key}"

UPLOAD_RULE_ID = "resnet50-recipe-abort-incomplete-uploads"


def offer_upload_rule(api: Api, plan: Plan, set_rule: bool, say) -> None:
    """Step 5b: parts of a multipart upload cut off by a preemption are billed until aborted. The run aborts its
    own at start; the bucket's AbortIncompleteMultipartUpload rule catches what a run never restarted leaves.
    Without one over the run's prefix the launch says so, and with `set_rule` adds one to the bucket's rules
    (a put replaces the whole configuration, so the existing rules are kept in it, and the bucket's
    TransitionDefaultMinimumObjectSize). The rule covers the prefix of every run of the --bucket; launch refuses
    to set one over a bucket's root."""
    from botocore.exceptions import ClientError

    rules, current = [], {}
    try:
        current = api("s3", "get_bucket_lifecycle_configuration", Bucket=plan.bucket) or {}
        rules = current.get("Rules", [])
    except ClientError as e:
        if error_code(e) != "NoSuchLifecycleConfiguration":
            say(f"could not read the lifecycle rules of s3://{plan.bucket} ({error_code(e)}); see docs/aws.md for "
                "the AbortIncompleteMultipartUpload rule")
            return
    key = f"{plan.prefix}/"
    for rule in rules:
        where = rule.get("Filter", {})
        prefix = where.get("Prefix", where.get("And", {}).get("Prefix", rule.get("Prefix", "")))
        if rule.get("Status") == "Enabled" and "AbortIncompleteMultipartUpload" in rule and key.startswith(prefix):
            return
    if not set_rule:
        say(f"s3://{plan.bucket} has no AbortIncompleteMultipartUpload lifecycle rule over {key}: parts of an upload "
            "cut off by a preemption are billed until aborted; --abort-incomplete-uploads adds one over the runs' "
            "prefix (1 day)")
        return
    root = plan.prefix.rpartition("/")[0]  # where every run of this --bucket lives
    rule = {"ID": UPLOAD_RULE_ID, "Status": "Enabled", "Filter": {"Prefix": f"{root}/" if root else ""},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}}
    # The bucket's setting beside its rules goes back as it was: a put without it resets it to AWS's default.
    kept = {k: current[k] for k in ("TransitionDefaultMinimumObjectSize",) if k in current}
    api("s3", "put_bucket_lifecycle_configuration", Bucket=plan.bucket, **kept,
        LifecycleConfiguration={"Rules": [r for r in rules if r.get("ID") != UPLOAD_RULE_ID] + [rule]})


def instance_params(plan: Plan, api: Api, image_id: str, root_device: str, profile: str, package: str) -> dict:
    """Step 6: run_instances' arguments, but the type and AZ: a persistent spot request that stops on an
    interruption, IMDSv2, the rendered user data, and tags on the instance, its request and its volumes."""
    settings = {"RUN": plan.name, "REMOTE": plan.remote, "REGION": api.region, "PACKAGE": package,
                "DATA": plan.data or "", "VOLUME": "yes" if plan.volume else "",
                "EPOCHS_NOTE": f"{plan.recipe.train.epochs} epochs", "HUB_TOKEN_PARAMETER": plan.token_parameter or "",
                "KEEP_INSTANCE": "yes" if plan.keep_instance else ""}
    devices = [{"DeviceName": root_device, "Ebs": {"VolumeSize": plan.disk_gb, "VolumeType": "gp3",
                                                   "DeleteOnTermination": True}}]
    if plan.volume:
        devices.append({"DeviceName": "/dev/sdf", "Ebs": {"SnapshotId": plan.volume, "VolumeType": "gp3",
                                                          "DeleteOnTermination": True}})
    tags = [{"Key": "Name", "Value": f"resnet50-recipe {plan.name}"}, {"Key": TAG_RUN, "Value": plan.name},
            {"Key": TAG_REMOTE, "Value": plan.remote},
            {"Key": TAG_LAUNCHED, "Value": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}]
    return {
        "ImageId": image_id, "MinCount": 1, "MaxCount": 1,
        "IamInstanceProfile": {"Name": profile}, "UserData": render_user_data(settings), "BlockDeviceMappings": devices,
        "InstanceMarketOptions": {"MarketType": "spot", "SpotOptions": {
            "SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"}},
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "TagSpecifications": [{"ResourceType": kind, "Tags": tags}
                              for kind in ("instance", "spot-instances-request", "volume")],
    }

NO_CAPACITY = ("InsufficientInstanceCapacity", "Unsupported", "SpotMaxPriceTooLow")


def place(api: Api, params: dict, ranked: list[tuple[str, dict]], zones_given: list | None, created: bool):
    """Step 8: run_instances for each type in order, in each of its AZs cheapest first, moving on when EC2 has no
    capacity; (reservation or None, type, what was tried)."""
    from botocore.exceptions import ClientError

    tried = []
    for itype, prices in ranked:
        zones = zones_given or list(prices) or ["<cheapest AZ from describe_spot_price_history>"]
        for zone in zones:
            placed = {**params, "InstanceType": itype, **({"Placement": {"AvailabilityZone": zone}} if zone else {})}
            for attempt in range(12):
                try:
                    return api("ec2", "run_instances", note="repeated in the next-cheapest AZ, then the next type, "
                               "on InsufficientInstanceCapacity" if not zones_given else None, **placed), itype, tried
                except ClientError as e:
                    code = error_code(e)
                    # A role and profile created seconds ago are not yet visible to EC2 (IAM is eventually consistent).
                    if created and code == "InvalidParameterValue" and "iamInstanceProfile" in str(e) and attempt < 11:
                        time.sleep(5)
                        continue
                    if code not in NO_CAPACITY:
                        raise
                    tried.append(f"{itype} in {zone}: {code}")
                    log.warning("no %s spot capacity in %s (%s); trying the next", itype, zone, code)
                    break
    return None, None, tried


# The run's spot request id, under its prefix, for the instance's `setup.sh --end` to cancel: the run role may not
# describe spot requests (that call has no resource-level permission, and on "*" it shows every request's user
# data, other workloads' included).
SPOT_REQUEST = "launch/spot-request"


def record_spot_request(api: Api, remote: str, request_id: str | None) -> None:
    """Step 9: the spot request id, from run_instances' answer, to the run's prefix (SPOT_REQUEST)."""
    bucket, prefix = parse_remote(remote)
    if not request_id:  # (moto's run_instances opens none)
        log.warning("run_instances named no spot request; at its end the instance cannot cancel one, and powers off "
                    "instead of terminating: resnet50-recipe aws stop releases it")
        return
    api("s3", "put_object", Bucket=bucket, Key=f"{prefix}/{SPOT_REQUEST}", Body=request_id, ContentType="text/plain")


def launch(recipe_source: str, bucket: str, *, name: str | None = None, overrides: list[str] = (),
           instance_type: str = "g4dn.2xlarge", region: str | None = None, az: str = "auto",
           subnet: str | None = None, key_name: str | None = None, security_groups: list[str] = (),
           data: str | None = None, volume: str | None = None, ami: str | None = None,
           package: str | None = None, disk_gb: int | None = None, budget_usd: float | None = None,
           push: str | None = None, private: bool = False, keep_instance: bool = False,
           abort_incomplete_uploads: bool = False, dry_run: bool = False, api: Api | None = None, out=print) -> dict:
    """Launch a persistent spot instance that trains `recipe_source` and mirrors the run to `bucket`/NAME.

    Steps: (1) plan: validate the recipe, the name, the data, the package (2) rank the instance types against
    the spot quota and the budget (3) find the AMI, refuse a run that has a live instance, check that the data is in
    S3 (4) the run's IAM role and profile (5) upload the recipe and the wheel, and offer (or set) the bucket's rule
    for cut-off multipart uploads (6) run_instances' arguments (7) store the Hub token (--push), deleted again when
    no instance is placed (8) delete the spot request id an earlier run of the name recorded, then place it: each
    type in order, the cheapest AZ first, the next on InsufficientInstanceCapacity (9) record its spot request id
    under the run's prefix, for the instance to cancel at the end. Returns what was launched. With `dry_run`,
    prints each call instead of making it.
    """
    _boto3()  # without boto3, say how to install it before anything else
    plan = plan_launch(recipe_source, bucket, name, list(overrides), instance_type, data, volume, package, disk_gb,
                       budget_usd, push, private, keep_instance)
    if abort_incomplete_uploads and "/" not in plan.prefix:
        raise UserError(f"--abort-incomplete-uploads: --bucket {bucket.rstrip('/')} has no prefix, and the rule would "
                        "abort every unfinished upload in the bucket, any tool's; give the runs a prefix "
                        f"(--bucket {bucket.rstrip('/')}/runs), or add a rule by hand (docs/aws.md)")
    # Read here, where a missing token fails before any AWS call; stored in step 7.
    token = (SECRET if dry_run else hub_token()) if plan.push else None
    api = api or Api(region, dry_run, out)
    say = (lambda text: out(f"# {text}")) if dry_run else out
    if dry_run:
        out(f"# dry run: the AWS calls `aws launch` makes, in order, with their arguments; none was made.\n"
            f"# region {api.region}; answers that later calls depend on are shown as <...>.")
    say(f"package: {plan.package.why}")
    ranked = rank_types(api, plan, {}, say)
    check_free(api, plan.name)
    image_id, root_device = find_image(api, ami)
    if plan.data:
        check_data(api, plan.data)
    profile, created = ensure_instance_profile(api, plan.name, policy_document(
        plan.bucket, plan.prefix, plan.reads, region=api.region, run=plan.name, token=plan.token_parameter,
        release=not plan.keep_instance))
    package = upload_launch_files(api, plan)
    offer_upload_rule(api, plan, abort_incomplete_uploads, say)
    params = instance_params(plan, api, image_id, root_device, profile, package)
    for key, value in (("KeyName", key_name), ("SecurityGroupIds", list(security_groups)), ("SubnetId", subnet)):
        if value:
            params[key] = value
    zones = [None] if subnet else [az] if az != "auto" else None
    # The id an earlier run of this name recorded goes before placement: if recording this one's fails, the instance
    # finds no id at its end and powers off, instead of cancelling that other request and terminating itself (which
    # its own request would replace).
    api("s3", "delete_object", Bucket=plan.bucket, Key=f"{plan.prefix}/{SPOT_REQUEST}")
    if plan.push:  # as late as can be, for the instance reads it at boot: what fails before leaves no token
        store_token(api, plan, token)
    reservation = None
    try:
        reservation, itype, tried = place(api, params, ranked, zones, created)
    finally:  # no capacity, an error, Ctrl-C
        if reservation is None and plan.push and not dry_run:
            delete_token(api, plan)
    if dry_run:
        record_spot_request(api, plan.remote, "<SpotInstanceRequestId from run_instances>")
        for i, (key, text) in enumerate(api.texts, 1):
            source = "resnet50_recipe/cloud/user-data.sh rendered" if key == "UserData" else "the resolved recipe"
            out(f"\n# <{key} {i}>: {source}\n{text.rstrip()}")
        return {"run": plan.name, "remote": plan.remote, "dry_run": True, "user_data": params["UserData"]}
    if reservation is None:
        raise AwsError(f"no spot capacity for {', '.join(t for t, _ in ranked)} in any AZ of {api.region} "
                       f"({'; '.join(tried)}); try later, another --instance-type (or auto) or --region")
    instance = reservation["Instances"][0]
    record_spot_request(api, plan.remote, instance.get("SpotInstanceRequestId"))
    result = {"run": plan.name, "remote": plan.remote, "instance_id": instance["InstanceId"], "instance_type": itype,
              "az": instance.get("Placement", {}).get("AvailabilityZone"), "image_id": image_id,
              "instance_profile": profile, "spot_request_id": instance.get("SpotInstanceRequestId"), "tried": tried}
    out(f"launched {result['instance_id']} ({itype}, spot, persistent) in {result['az']} for run {plan.name}; "
        f"checkpoints and metrics go to {plan.remote}\nfollow it with: resnet50-recipe aws status {plan.name}  |  "
        f"resnet50-recipe aws logs {plan.name}  |  resnet50-recipe aws stop {plan.name}")
    return result
