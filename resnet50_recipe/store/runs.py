"""`runs ls` and `runs pull`: the runs under an S3 prefix, and a verified copy of one of them."""

from __future__ import annotations

import logging
from pathlib import Path

from resnet50_recipe.store.checkpoints import MANIFEST, verify_checkpoint
from resnet50_recipe.store.lineage import safe_path
from resnet50_recipe.store.s3 import S3Store

__all__ = ["list_runs", "pull_run"]

log = logging.getLogger(__name__)


def list_runs(store: S3Store) -> list[dict]:
    """Every run under the store's prefix: where its latest.json is, with its step, epoch and results."""
    runs = []
    for name in store.list():
        if not name.endswith(f"checkpoints/{MANIFEST}"):
            continue
        run = name[: -len(f"checkpoints/{MANIFEST}")].rstrip("/")
        sub = store.child(run)
        manifest, _ = sub.get_json(f"checkpoints/{MANIFEST}")
        summary, _ = sub.get_json("summary.json")
        runs.append({"run": sub.remote, "epoch": manifest.get("epoch", 0),
                     "step": manifest.get("step", 0), "top1": (summary or {}).get("top1"),
                     "best_top1": (summary or {}).get("best_top1"), "stopped": (summary or {}).get("stopped")})
    return runs


def pull_run(store: S3Store, dest: Path) -> tuple[list[str], list[str]]:
    """Download every object of a run into `dest`; checkpoints are checked against the remote manifest. Returns
    the names fetched and the names refused because they would land outside `dest` (`safe_path`)."""
    manifest, _ = store.get_json(f"checkpoints/{MANIFEST}")
    entries = {e["file"]: e for e in (manifest or {}).get("checkpoints", [])}
    fetched, refused = [], []
    for name in store.list():
        if name.startswith(".probe-"):
            continue
        try:
            path = safe_path(dest, name)
        except ValueError as e:
            log.warning("%s/%s: %s", store.remote, name, e)
            refused.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        store.download_file(name, path)
        base = name.rsplit("/", 1)[-1]
        if base in entries and (problem := verify_checkpoint(path, entries[base])):
            log.warning("%s/%s is %s", store.remote, name, problem)
        fetched.append(name)
    return fetched, refused
