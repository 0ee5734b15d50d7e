"""Facts about EC2 that both sides need: the instance types (GPU, count, vCPUs, list price), the gp3 price and
the spot price API. The trainer reads them on the instance (trainer/budget.py), the launcher on the laptop
(cloud/)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

__all__ = ["PRODUCT", "GP3_USD_PER_GB_MONTH", "HOURS_PER_MONTH", "INSTANCE_TYPES", "boto3_call", "spot_prices",
           "ebs_cost"]

log = logging.getLogger(__name__)

PRODUCT = "Linux/UNIX"


# gp3 storage, USD per GB-month (us-east-1 list price, https://aws.amazon.com/ebs/pricing/; AWS bills it per
# second of a month of 730 hours). The run's root volume costs this from launch until the instance is terminated.
GP3_USD_PER_GB_MONTH = 0.08

HOURS_PER_MONTH = 730


# GPU kind, GPUs, vCPUs and on-demand price (USD/h, Linux, us-east-1) per instance type. Prices are AWS's list
# prices from https://aws.amazon.com/ec2/pricing/on-demand/ (g4dn.xlarge $0.526,
# g4dn.2xlarge $0.752); they were not re-read on 2026-11-26 and differ by region: check the page. P4d/P5 prices
# were cut in 2025 and are left out rather than guessed. Spot prices always come from the API.
INSTANCE_TYPES = {
    "g4dn.xlarge": ("T4", 1, 4, 0.526), "g4dn.2xlarge": ("T4", 1, 8, 0.752), "g4dn.4xlarge": ("T4", 1, 16, 1.204),
    "g4dn.8xlarge": ("T4", 1, 32, 2.176), "g4dn.12xlarge": ("T4", 4, 48, 3.912),
    "g5.xlarge": ("A10G", 1, 4, 1.006), "g5.2xlarge": ("A10G", 1, 8, 1.212), "g5.4xlarge": ("A10G", 1, 16, 1.624),
    "p3.2xlarge": ("V100", 1, 8, 3.06), "p3.8xlarge": ("V100", 4, 32, 12.24),
    "p4d.24xlarge": ("A100", 8, 96, None), "p5.48xlarge": ("H100", 8, 192, None),
}


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
