"""`watch`: a terminal view of a running or finished run, local or in S3, from the files the run writes
(metrics.jsonl, checkpoints/latest.json, summary.json) and, for a local run, nvidia-smi.

A run in S3 is as fresh as its last upload: the run's files go up with each checkpoint.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from resnet50_recipe.errors import MissingInput, UserError
from resnet50_recipe.store.checkpoints import MANIFEST, read_manifest
from resnet50_recipe.store.s3 import S3Store
from resnet50_recipe.trainer.budget import budget_text, planned_epochs

__all__ = ["read_run", "summarize", "gpu_status", "duration", "render", "watch"]


def read_run(source: str, endpoint_url: str | None = None) -> dict:
    """The run's records, manifest and summary, with the times they were last written."""
    if source.startswith("s3://"):
        store = S3Store(source, endpoint_url)
        client = store.client
        text, updated = None, None
        try:
            response = client.get_object(Bucket=store.bucket, Key=store.key("metrics.jsonl"))
            text, updated = response["Body"].read().decode(), response["LastModified"].timestamp()
        except client.exceptions.NoSuchKey:
            pass
        manifest, _ = store.get_json(f"checkpoints/{MANIFEST}")
        head = store.head(f"checkpoints/{MANIFEST}") if manifest else None
        summary, _ = store.get_json("summary.json")
        local = False
        manifest_time = head["LastModified"].timestamp() if head else None
    else:
        run = Path(source)
        metrics, latest = run / "metrics.jsonl", run / "checkpoints" / MANIFEST
        text = metrics.read_text() if metrics.is_file() else None
        updated = metrics.stat().st_mtime if text is not None else None
        manifest = read_manifest(run / "checkpoints")
        manifest_time = latest.stat().st_mtime if manifest else None
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else None
        local = True
    if text is None and manifest is None:
        raise MissingInput(f"{source}: no metrics.jsonl or checkpoints/{MANIFEST}; is it a run "
                           "directory (or the s3:// prefix a run syncs to)?")
    # The last line of a file being appended to may be incomplete; it is read on the next refresh.
    records = []
    for line in (text or "").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return {"source": source, "records": records, "updated": updated, "manifest": manifest,
            "manifest_time": manifest_time, "summary": summary, "local": local}


def summarize(run: dict, now: float | None = None) -> dict:
    """What the view shows, computed from `read_run`'s result."""
    now = time.time() if now is None else now
    records = run["records"]
    starts = [r for r in records if r.get("kind") == "start"]
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    evaluated = [r for r in epochs if r.get("top1") is not None]
    plan = starts[-1] if starts else {}
    last = records[-1] if records else {}
    global_step = max((r.get("global_step", 0) for r in records), default=0)
    length, planned = planned_epochs(records)  # train.budget_mode: fit may have shortened the run since it started
    length = length or plan.get("epochs")
    total = length * plan["steps_per_epoch"] if length is not None and "steps_per_epoch" in plan else None
    summary = run["summary"]
    if summary and summary.get("global_step", -1) >= global_step and last.get("kind") != "start":
        status = "stopped (preempted or interrupted; resume continues it)" if summary.get("stopped") else "finished"
    else:
        status = "running"
    snap = {"source": run["source"], "status": status, "global_step": global_step, "total_steps": total,
            "epochs": length, "planned_epochs": planned, "steps_per_epoch": plan.get("steps_per_epoch"),
            "restarts": max(0, len(starts) - 1), "updated_age_s": None if run["updated"] is None
            else now - run["updated"]}
    if steps:
        s = steps[-1]
        snap.update(epoch=s["epoch"] + 1, step=s["step"], loss=s["loss"], lr=s["lr"], img_per_s=s["img_per_s"],
                    data_wait=s["data_wait"])
    if last.get("kind") == "epoch":  # between epochs: the finished epoch's numbers are the news
        snap.update(epoch=last["epoch"] + 1, step=plan.get("steps_per_epoch"))
    if evaluated:
        e = evaluated[-1]
        snap.update(top1=e["top1"], ema_top1=e.get("ema_top1"), eval_epoch=e["epoch"] + 1)
    snap["eta_s"] = _eta(total, global_step, plan, steps, epochs) if status == "running" else None
    manifest = run["manifest"]
    if manifest and manifest.get("file"):  # a new lineage lists no checkpoint until its first one
        snap["checkpoint"] = {"file": manifest["file"], "step": manifest["step"], "epoch": manifest["epoch"],
                              "age_s": now - run["manifest_time"] if run["manifest_time"] else None}
    costed = [r for r in records if r.get("cost_usd") is not None]
    if summary and summary.get("cost_usd") is not None and summary.get("global_step", -1) >= global_step:
        costed.append(summary)
    if costed:
        snap["cost_usd"] = costed[-1]["cost_usd"]
        snap["instance_type"] = next((r["instance_type"] for r in reversed(records + [summary or {}])
                                      if r.get("instance_type")), None)
        snap["price_usd_per_h"] = costed[-1].get("price_usd_per_h")
        snap["budget_usd"], snap["budget_mode"] = plan.get("budget_usd"), plan.get("budget_mode")
    if run["local"] and status == "running":
        snap["gpus"] = gpu_status()
    return snap


def _eta(total: int | None, global_step: int, plan: dict, steps: list[dict], epochs: list[dict]) -> float | None:
    """Seconds left: from the mean time of the last epochs (evaluation included) when there are any, else from
    the recent step records' throughput and the global batch."""
    if total is None:
        return None
    remaining = max(0, total - global_step)
    timed = [r["epoch_time_s"] for r in epochs[-3:] if r.get("epoch_time_s")]
    if timed:
        return remaining * statistics.mean(timed) / plan["steps_per_epoch"]
    rates = [r["img_per_s"] for r in steps[-5:] if r.get("img_per_s")]
    if rates and plan.get("global_batch"):
        return remaining * plan["global_batch"] / statistics.median(rates)
    return None


def gpu_status() -> list[dict]:
    """Utilisation and memory of each local GPU, from nvidia-smi; empty without one."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10,
                             check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        try:
            index, util, used, total = (float(v) for v in line.split(","))
        except ValueError:
            continue
        gpus.append({"index": int(index), "util_pct": util, "mem_used_gib": used / 1024, "mem_total_gib": total / 1024})
    return gpus


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def render(snap: dict) -> str:
    lines = [f"{snap['source']}: {snap['status']}"
             + (f", updated {duration(snap['updated_age_s'])} ago" if snap["updated_age_s"] is not None else "")
             + (f", restarted {snap['restarts']} time{'s' if snap['restarts'] != 1 else ''}" if snap["restarts"]
                else "")]
    if "epoch" in snap:
        where = f"epoch {snap['epoch']}/{snap['epochs'] or '?'}"
        if snap.get("planned_epochs"):
            where += f" (planned {snap['planned_epochs']}, shortened to fit train.budget_usd)"
        if snap["step"] is not None:
            where += f"  step {snap['step']}/{snap['steps_per_epoch'] or '?'}"
        where += f"  global step {snap['global_step']}"
        if snap["total_steps"]:
            where += f"/{snap['total_steps']} ({snap['global_step'] / snap['total_steps']:.0%})"
        lines.append(where)
    if "loss" in snap:
        lines.append(f"loss {snap['loss']:.4f}  lr {snap['lr']:.4g}  {snap['img_per_s']:.0f} img/s  "
                     f"data-wait {snap['data_wait']:.0%}")
    if "top1" in snap:
        ema = f"  EMA {snap['ema_top1']:.4f}" if snap.get("ema_top1") is not None else ""
        lines.append(f"val top-1 {snap['top1']:.4f}{ema} (epoch {snap['eval_epoch']})")
    else:
        lines.append("val top-1: no evaluation yet")
    for gpu in snap.get("gpus") or []:
        lines.append(f"GPU {gpu['index']}: {gpu['util_pct']:.0f} % busy, {gpu['mem_used_gib']:.1f} of "
                     f"{gpu['mem_total_gib']:.1f} GiB")
    if snap["eta_s"] is not None:
        lines.append(f"ETA {duration(snap['eta_s'])}")
    if "checkpoint" in snap:
        c = snap["checkpoint"]
        age = f", {duration(c['age_s'])} old" if c["age_s"] is not None else ""
        lines.append(f"last checkpoint {c['file']} (epoch {c['epoch']}, step {c['step']}){age}")
    else:
        lines.append("last checkpoint: none yet")
    if "cost_usd" in snap:
        on = f" on {snap['instance_type']}" if snap.get("instance_type") else ""
        hours_left = snap["eta_s"] / 3600 if snap["eta_s"] is not None else None
        lines.append(f"cost so far ${snap['cost_usd']:.2f}{on}" + budget_text(
            snap["cost_usd"], snap.get("budget_usd"), snap.get("price_usd_per_h"), hours_left, snap.get("budget_mode")))
    return "\n".join(lines)


def watch(source: str, interval: float = 10.0, once: bool = False, endpoint_url: str | None = None,
          stream=None) -> dict:
    """Print the view every `interval` seconds until the run finishes (or once); return the last snapshot."""
    if interval <= 0:
        raise UserError(f"--interval {interval}: give the seconds between refreshes, a positive number")
    stream = stream or sys.stdout
    while True:
        snap = summarize(read_run(source, endpoint_url))
        text = render(snap)
        if once:
            print(text, file=stream, flush=True)
            return snap
        clear = "\x1b[H\x1b[2J" if stream.isatty() else ""  # redraw in place on a terminal; append in a log
        print(f"{clear}{time.strftime('%H:%M:%S')}  {text}\n", file=stream, flush=True)
        if snap["status"] == "finished":
            return snap
        time.sleep(interval)
