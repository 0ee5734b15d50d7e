"""The runs `aws launch` started, found by tag: `status` (with cost so far), `follow`, `logs`, `stop`, `ls`."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from resnet50_recipe.cloud.api import TAG_LAUNCHED, TAG_REMOTE, TAG_RUN, Api, AwsError, error_code, tag
from resnet50_recipe.cloud.cost import integrate_cost
from resnet50_recipe.ec2 import PRODUCT
from resnet50_recipe.errors import EXIT_BAD_INPUT, EXIT_BUDGET, EXIT_FINISHED, EXIT_PUBLISH_FAILED
from resnet50_recipe.store.s3 import S3Store
from resnet50_recipe.trainer.budget import budget_text, planned_epochs
from resnet50_recipe.trainer.runlog import read_metrics

__all__ = ["run_instances_of", "spot_requests_of", "run_status", "print_status", "ENDED", "follow", "logs", "stop",
           "ls"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Watching and stopping


def run_instances_of(api: Api, name: str | None = None) -> list[dict]:
    """Instances launched by this tool (tagged), for one run or all, newest first."""
    flt = [{"Name": f"tag:{TAG_RUN}", "Values": [name]}] if name else [{"Name": "tag-key", "Values": [TAG_RUN]}]
    response = api("ec2", "describe_instances", Filters=flt)
    found = [i for r in (response or {}).get("Reservations", []) for i in r["Instances"]]
    return sorted(found, key=lambda i: i["LaunchTime"], reverse=True)


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
    summary = _since_launch(store, "summary.json", instance)
    train = (_run_recipe(store) or {}).get("train", {})
    recipe_epochs, status["budget_usd"] = train.get("epochs"), train.get("budget_usd")
    status["budget_mode"] = train.get("budget_mode")
    recipe_epochs = planned_epochs(metrics)[0] or recipe_epochs  # a budget's shortened plan, when there is one
    status["finished"] = bool(summary) and summary.get("stopped") is False
    status["exit_status"], status["pushed"] = (summary or {}).get("exit_status"), (summary or {}).get("pushed")
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
    recorded = [r for r in metrics if r.get("cost_usd") is not None]
    if recorded:
        status["cost_usd_recorded"], status["price_usd_per_h"] = recorded[-1]["cost_usd"], recorded[-1].get(
            "price_usd_per_h")
    live = [i for i in instances if i["State"]["Name"] not in ("terminated", "shutting-down")]
    # A persistent request is open or active while EC2 runs its instance or will start one again (an interrupted
    # one is opened again); one whose instance was stopped by its user or its own shutdown (the end of the run with
    # --keep-instance, or a failure on the way) is disabled, and starts nothing: that instance is powered off.
    live_requests = [r for r in requests if r["State"] in ("open", "active")]
    status["released"] = not live and not live_requests
    status["powered_off"] = status["state"] in ("stopping", "stopped") and not live_requests
    # How the instance ended its run, or that it is crash-looping (user-data.sh --end writes it).
    end = _since_launch(store, "logs/end.json", instance)
    if end:
        status["end"] = end
    return status


def _since_launch(store, name: str, instance: dict) -> dict | None:
    """The JSON object `name` under the run's prefix, unless it was written before this instance was launched: then
    it belongs to an earlier run of the same name (one stopped by its budget, say, and launched again)."""
    body, _ = store.get_json(name)
    head = store.head(name) if body else None
    if body and (head is None or "LaunchTime" not in instance or head["LastModified"] >= instance["LaunchTime"]):
        return body
    return None


def _run_recipe(store) -> dict | None:
    """The run's resolved recipe: the trainer's copy, else the one the launch uploaded."""
    import yaml

    for name in ("recipe.yaml", "launch/recipe.yaml"):
        try:
            body = store.client.get_object(Bucket=store.bucket, Key=store.key(name))["Body"].read()
        except store.client.exceptions.NoSuchKey:
            continue
        return yaml.safe_load(body) or {}
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
    spent = status.get("cost_usd_recorded", status.get("cost_usd_upper_bound"))
    if spent is not None and (status.get("budget_usd") is not None or status.get("eta_hours") is not None):
        tail = budget_text(spent, status.get("budget_usd"), status.get("price_usd_per_h"), status.get("eta_hours"),
                           status.get("budget_mode"))
        out(f"  spent ~${spent:.2f}{tail}")
    end = status.get("end") or {}
    # The training log goes to S3 at an end by exit 2 or by crashes (user-data.sh --end); 0, 3 and 4 have a summary.
    code = str(end.get("exit_status"))
    log_file = {"2": "train-exit-2.log"}.get(code, "train-crash-loop.log")
    log_text = f"; the log is in {status['remote']}/logs/{log_file}" if code not in ("0", "3", "4") else ""
    disk = f"its disk bills until `resnet50-recipe aws stop {status['run']}` deletes it"
    if status.get("finished") and status.get("released"):
        out("  finished, nothing running, nothing billing except S3 (the instance and its spot request are gone)")
    elif status.get("released") and end.get("state") == "released":
        out(f"  ended {_ended_by(end)}: released, nothing running, nothing billing except S3 (the instance and its "
            f"spot request are gone){log_text}")
    elif status.get("powered_off"):
        logs = f"`resnet50-recipe aws logs {status['run']}` shows why"
        why = {"not-in-s3": f" (it holds {end.get('checkpoint') or 'the run'}, which is not in S3)",
               "keep-instance": " (--keep-instance)",
               "end-failed": f" (its end-of-run path failed; {logs})"}.get(end.get("reason"), "")
        if not end:
            why = f" (no logs/end.json: stopped by hand, or its end-of-run path failed before writing it; {logs})"
        ended = f"ended {_ended_by(end)}: " if end.get("state") == "powered-off" else ""
        request = "disabled" if any(r["state"] == "disabled" for r in status["spot_requests"]) else "cancelled"
        out(f"  {ended}powered off with its spot request {request}, nothing running, but {disk}{why}"
            + (log_text if ended else ""))
    elif end.get("state") == "crash-looping" and status["state"] == "running":
        out(f"  crash-looping: {end['crashes']} crashes in a row without a new checkpoint (the last exit "
            f"{end.get('exit_status') or '?'}); the unit restarts it, and crash {end['max_crashes']} ends the run "
            "(released, or powered off if its newest checkpoint is not in S3)")
    elif status.get("finished"):
        out(f"  finished; the instance releases itself (or powers off with --keep-instance): `resnet50-recipe aws "
            f"stop {status['run']}` deletes it and its disk, keeping S3")
    elif "eta_hours" in status:
        out(f"  ETA: {status['eta_hours']:.1f} h of training (mean of the last epochs' times)")
    out(f"  files: {status['remote']}")

_EXITS = {"0": "finished", "2": "with exit 2 (bad input)", "3": "with exit 3 (trained; the export or push failed)",
          "4": "with exit 4 (train.budget_usd)"}


def _ended_by(end: dict) -> str:
    """How a run ended, from end.json: "finished", "with exit 2 (bad input)", "after 5 crashes in a row"."""
    code = str(end.get("exit_status", ""))
    if code in _EXITS:
        return _EXITS[code]
    return f"after {end.get('crashes', '?')} crashes in a row"

# The exit statuses after which the unit starts the trainer no more (user-data.sh's RestartPreventExitStatus, and 0)
ENDED = (EXIT_FINISHED, EXIT_BAD_INPUT, EXIT_PUBLISH_FAILED, EXIT_BUDGET)


def follow(name: str, region: str | None = None, interval: float = 60.0, api: Api | None = None, out=print,
           stream=None, sleep=time.sleep) -> dict:
    """Redraw `aws status` every `interval` seconds, as `watch` does, until the run has ended (finished, stopped by
    its budget, bad input, released or powered off by its end) or its instance is gone; then say where the weights
    are."""
    import io
    import sys

    api = api or Api(region)
    stream = stream or sys.stdout
    while True:
        status = run_status(name, api.region, api)
        text = io.StringIO()
        print_status(status, out=lambda line: print(line, file=text))
        clear = "\x1b[H\x1b[2J" if stream.isatty() else ""  # redraw in place on a terminal; append in a log
        print(f"{clear}{time.strftime('%H:%M:%S')}  {text.getvalue()}", file=stream, flush=True)
        end = status.get("end") or {}
        if (status["exit_status"] in ENDED or status["finished"] or status["released"] or status["powered_off"]
                or end.get("state") in ("released", "powered-off")):
            break
        sleep(interval)
    if status["finished"]:
        out(f"weights: {status['remote']}/export/ (timm format; resnet50-recipe runs pull {status['remote']} DIR)"
            + (f" and https://huggingface.co/{status['pushed']}" if status.get("pushed") else ""))
    else:
        code = status["exit_status"] if status["exit_status"] is not None else end.get("exit_status") or "?"
        out(f"run {name} ended without weights (exit {code}); its files are in {status['remote']}")
    return status


def logs(name: str, region: str | None = None, api: Api | None = None) -> str:
    """The instance's console output: the setup log and the training log (the unit writes to the console)."""
    api = api or Api(region)
    instance = _require(run_instances_of(api, name), name, api.region)
    response = api("ec2", "get_console_output", InstanceId=instance["InstanceId"], Latest=True)
    return response.get("Output") or f"(no console output yet from {instance['InstanceId']}; it appears a few " \
        "minutes after boot)"


def stop(name: str, region: str | None = None, api: Api | None = None, out=print) -> dict:
    """Delete the run's Hub token, cancel its persistent spot request (else EC2 would replace the instance), then
    terminate its instances (a powered-off one too: its disk). S3 is left as it is. Refused only when there is
    none of the three."""
    from botocore.exceptions import ClientError

    api = api or Api(region)
    # The Hub token of a --push run (launch.py's Plan.token_parameter), which the instance deletes itself when the
    # run ends; first, since one can be left with no instance at all (a launch that failed after storing it, an
    # instance whose own delete failed). Gone already, or never stored, is fine.
    token = f"/resnet50-recipe/{name}/hf-token"
    try:
        api("ssm", "delete_parameter", Name=token)
        deleted = f"; deleted the Hub token {token}"
    except ClientError as e:
        if error_code(e) != "ParameterNotFound":
            raise
        deleted = ""
    instances = [i for i in run_instances_of(api, name) if i["State"]["Name"] != "terminated"]
    requests = [r for r in spot_requests_of(api, name, instances)
                if r["State"] in ("open", "active", "disabled")]
    if not instances and not requests and not deleted:
        raise AwsError(f"run {name!r} has no live instance, spot request or Hub token in {api.region}")
    if requests:
        api("ec2", "cancel_spot_instance_requests", SpotInstanceRequestIds=[r["SpotInstanceRequestId"]
                                                                             for r in requests])
    ids = sorted({i["InstanceId"] for i in instances} | {r["InstanceId"] for r in requests if r.get("InstanceId")})
    if ids:
        api("ec2", "terminate_instances", InstanceIds=ids)
    out(f"run {name}: cancelled {len(requests)} spot request(s), terminating {', '.join(ids) or 'nothing'}{deleted}; "
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
