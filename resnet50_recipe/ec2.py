"""Facts about EC2 that both sides need: the instance types (GPU, count, vCPUs, list price), the gp3 price and
the spot price API. The trainer reads them on the instance (trainer/budget.py), the launcher on the laptop
(cloud/)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

__all__ = ["PRODUCT", "GP3_USD_PER_GB_MONTH", "HOURS_PER_MONTH", "INSTANCE_TYPES", "DEFAULT_PRICE_TYPES",
           "TABLE_TYPES", "boto3_call", "spot_prices", "ebs_cost"]

log = logging.getLogger(__name__)

PRODUCT = "Linux/UNIX"


# gp3 storage, USD per GB-month (us-east-1 list price, https://aws.amazon.com/ebs/pricing/; AWS bills it per
# second of a month of 730 hours). The run's root volume costs this from launch until the instance is terminated.
GP3_USD_PER_GB_MONTH = 0.08

HOURS_PER_MONTH = 730


# GPU kind, GPUs, vCPUs and on-demand price (USD/h, Linux, us-east-1) per instance type: every type `aws launch`
# can use, multi-GPU sizes included (the unit runs one training process per GPU, user-data.sh). The GPU counts and
# vCPUs are AWS's (https://aws.amazon.com/ec2/instance-types/g4/, .../g5/, .../g6/, .../g6e/, .../p3/; the same
# table is in https://docs.aws.amazon.com/batch/latest/userguide/gpu-jobs.html). The prices are AWS's list prices
# from https://aws.amazon.com/ec2/pricing/on-demand/ as published for these types in 2024-2025 (g4dn.xlarge $0.526,
# g5.xlarge $1.006, g6.xlarge $0.8048, g6e.xlarge $1.861); they were not re-read on 2026-12-05 (this project's
# machines reach no network; a June 2026 third-party page still gives g5.xlarge $1.006) and differ by region: check
# the page. P4d/P5 prices were cut in 2025 and are left out rather than guessed. Spot prices always come from the
# API, and a dry run, which reads none, prices at these list prices.
INSTANCE_TYPES = {
    "g4dn.xlarge": ("T4", 1, 4, 0.526), "g4dn.2xlarge": ("T4", 1, 8, 0.752), "g4dn.4xlarge": ("T4", 1, 16, 1.204),
    "g4dn.8xlarge": ("T4", 1, 32, 2.176), "g4dn.12xlarge": ("T4", 4, 48, 3.912),
    "g5.xlarge": ("A10G", 1, 4, 1.006), "g5.2xlarge": ("A10G", 1, 8, 1.212), "g5.4xlarge": ("A10G", 1, 16, 1.624),
    "g5.8xlarge": ("A10G", 1, 32, 2.448), "g5.12xlarge": ("A10G", 4, 48, 5.672),
    "g5.24xlarge": ("A10G", 4, 96, 8.144), "g5.48xlarge": ("A10G", 8, 192, 16.288),
    "g6.xlarge": ("L4", 1, 4, 0.8048), "g6.2xlarge": ("L4", 1, 8, 0.9776), "g6.4xlarge": ("L4", 1, 16, 1.3232),
    "g6.8xlarge": ("L4", 1, 32, 2.0144), "g6.12xlarge": ("L4", 4, 48, 4.6016), "g6.24xlarge": ("L4", 4, 96, 6.6752),
    "g6.48xlarge": ("L4", 8, 192, 13.3504),
    "g6e.xlarge": ("L40S", 1, 4, 1.861), "g6e.2xlarge": ("L40S", 1, 8, 2.24208),
    "g6e.4xlarge": ("L40S", 1, 16, 3.00424), "g6e.8xlarge": ("L40S", 1, 32, 4.52856),
    "g6e.12xlarge": ("L40S", 4, 48, 10.49264), "g6e.24xlarge": ("L40S", 4, 96, 15.06559),
    "g6e.48xlarge": ("L40S", 8, 192, 30.13118),
    "p3.2xlarge": ("V100", 1, 8, 3.06), "p3.8xlarge": ("V100", 4, 32, 12.24), "p3.16xlarge": ("V100", 8, 64, 24.48),
    "p4d.24xlarge": ("A100", 8, 96, None), "p5.48xlarge": ("H100", 8, 192, None),
}


# What `aws price` lists by default: its per-AZ listing (DEFAULT_PRICE_TYPES) and the rows of its --recipes table
# (TABLE_TYPES: per GPU kind a single-GPU size with the vCPUs to decode for it, and the 4-GPU size).
DEFAULT_PRICE_TYPES = ("g4dn.xlarge", "g4dn.2xlarge", "g5.xlarge", "g5.2xlarge", "p3.2xlarge")
TABLE_TYPES = ("g4dn.2xlarge", "g4dn.12xlarge", "g5.2xlarge", "g5.12xlarge", "g6.2xlarge", "g6.12xlarge",
               "g6e.4xlarge", "g6e.12xlarge", "p3.2xlarge", "p3.8xlarge")


def boto3_call(region: str):
    """`api` for spot_prices without the launcher, on the instance: each call made by a boto3 client that gives up
    within about half a minute (2 attempts, 5 s to connect, 10 s to answer) instead of botocore's default 60 s
    timeouts and 5 attempts: the price is worth a line of metrics, never minutes of a run."""
    import boto3
    from botocore.config import Config

    client = {}
    config = Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"})

    def call(service: str, operation: str, **params):
        if service not in client:
            client[service] = boto3.client(service, region_name=region, config=config)
        return getattr(client[service], operation)(**params)
    return call


def spot_prices(api, instance_type: str, azs: list[str] | None = None) -> dict[str, float]:
    """The current spot price per availability zone (USD/h), cheapest first. `api(service, operation, **params)`
    makes the call: `aws.Api` on the laptop (so that a dry run prints it), `boto3_call` on the instance."""
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


def ebs_cost(disk_gb: float, hours: float) -> float:
    """USD for a gp3 volume of `disk_gb` kept for `hours`."""
    return disk_gb * GP3_USD_PER_GB_MONTH * hours / HOURS_PER_MONTH
