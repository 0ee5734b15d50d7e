"""The lineage protocol between a run and its remote copy: claiming the remote for a lineage, setting an old
lineage aside, fetching the newest verified checkpoint for a resume, and the run's files that travel with it
(docs/DESIGN.md, "Run lineage")."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path, PurePosixPath

from resnet50_recipe.errors import UserError
from resnet50_recipe.store.checkpoints import MANIFEST, commit, lineage_of, save_order, verify_checkpoint
from resnet50_recipe.store.s3 import SIDECAR, RemoteRefused, S3Store

__all__ = ["SYNCED_FILES", "RemoteSuperseded", "claim", "stage_remote", "download_verified", "install_staged",
           "fetch_latest", "pull_files", "safe_path"]

# wandb.json (the W&B run id) comes back with a resume on a fresh machine, so W&B continues the same run.
SYNCED_FILES = ("metrics.jsonl", "recipe.yaml", "env.json", "curves.png", "summary.json", "wandb.json")
class RemoteSuperseded(RemoteRefused):
    """The remote pointer belongs to a newer lineage, or to a second writer of this one: another run is using
    this prefix. Bad input at start-up (exit 2); in the uploader it stops the uploads."""


log = logging.getLogger(__name__)


def claim(store: S3Store, lineage: dict) -> None:
    """Make `lineage` the remote's current one before it uploads anything. The checkpoints of the lineage the
    pointer named are copied aside into `checkpoints/lineages/<run_id>/` (server-side) and listed under
    `lineages`, then the pointer names the new lineage, then the originals go: nothing is lost, and no fresh
    machine resumes the abandoned lineage. A newer lineage already there is never displaced."""
    for _ in range(3):
        remote, etag = store.manifest()
        if remote is None or lineage_of(remote)["run_id"] == lineage["run_id"]:
            if remote is None:
                try:
                    store.put_json(f"checkpoints/{MANIFEST}", {
                        "lineage": lineage, "run_id": lineage["run_id"], "best": None, "checkpoints": [],
                        "lineages": []}, None)
                except store.client.exceptions.ClientError as e:
                    if e.response["Error"]["Code"] == "PreconditionFailed":
                        continue  # someone wrote one meanwhile: look at it
                    raise
            return
        theirs = lineage_of(remote)
        if theirs["started"] > lineage["started"]:
            raise RemoteSuperseded(f"{store.remote}: the remote checkpoints belong to lineage {theirs['run_id']}, "
                                   f"started after this run's {lineage['run_id']}: another run has started afresh "
                                   "on this prefix")
        folder = f"lineages/{theirs['run_id']}"
        moved = []
        for entry in remote["checkpoints"]:
            try:
                store.copy(f"checkpoints/{entry['file']}", f"checkpoints/{folder}/{entry['file']}")
                moved.append(entry)
            except store.client.exceptions.ClientError as e:
                if not store.missing(e, f"checkpoints/{entry['file']}"):
                    raise
        record = {**theirs, "folder": folder, "checkpoints": moved}
        try:
            store.put_json(f"checkpoints/{MANIFEST}", {
                "lineage": lineage, "run_id": lineage["run_id"], "best": None, "checkpoints": [],
                "lineages": remote.get("lineages", []) + ([record] if moved else [])}, etag)
        except store.client.exceptions.ClientError as e:
            if e.response["Error"]["Code"] == "PreconditionFailed":
                continue
            raise
        for entry in moved:
            store.delete(f"checkpoints/{entry['file']}")
            store.delete(f"checkpoints/{entry['file']}{SIDECAR}")
        log.info("lineage %s: its %d remote checkpoint(s) are kept in %s/checkpoints/%s", theirs["run_id"],
                 len(moved), store.remote, folder)
        return
    raise RemoteRefused(f"{store.remote}: could not claim the remote latest.json: another writer keeps changing it")


def stage_remote(store: S3Store, folder: Path, manifest: dict,
                 newer_than: int | tuple[int, int]) -> tuple[Path, dict] | None:
    """Download the newest checkpoint the remote manifest lists, saved after `newer_than` (a step, or a local
    checkpoint's `save_order`: a later save at the same step, evaluated, is newer), that passes its sha256 check,
    to a hidden temp file in `folder`; return it with its entry. Nothing is installed: the caller checks the
    checkpoint against the recipe and data first (`install_staged`). A corrupt or vanished object is reported
    and the previous one tried."""
    after = (newer_than, math.inf) if isinstance(newer_than, int) else newer_than
    for entry in sorted(manifest["checkpoints"], key=save_order, reverse=True):
        if save_order(entry) <= after:
            return None
        tmp = download_verified(store, folder, entry)
        if tmp is not None:
            return tmp, entry
    return None


def download_verified(store: S3Store, folder: Path, entry: dict) -> Path | None:
    """A listed checkpoint downloaded to a hidden temp file in `folder` and checked against its sha256; None,
    with a warning, when the object is gone or corrupt."""
    tmp = safe_path(folder, f".{entry['file']}.tmp-{os.getpid()}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    name = f"checkpoints/{entry['file']}"
    try:
        store.download_file(name, tmp)
    except store.client.exceptions.ClientError as e:
        if not store.missing(e, name):
            raise
        log.warning("remote checkpoint %s/%s is listed but gone; trying the previous one", store.remote, name)
        return None
    problem = verify_checkpoint(tmp, entry)
    if problem:
        log.warning("remote checkpoint %s/%s is %s; trying the previous one", store.remote, name, problem)
        tmp.unlink()
        return None
    return tmp


def install_staged(store: S3Store, folder: Path, staged: tuple[Path, dict], manifest: dict, keep_last: int) -> None:
    """Put a staged download in place and record it, in the remote's lineage, in the local manifest, with the
    remote's best checkpoint, fetched too when it is another file, so that a fresh machine keeps it."""
    tmp, entry = staged
    lineage = lineage_of(manifest)
    best = manifest.get("best") or {}
    best_entry = next((e for e in manifest["checkpoints"] if e["file"] == best.get("file")), None)
    fields = ("file", "step", "epoch", "sha256", "size")
    if best_entry is not None and best_entry["file"] != entry["file"] and save_order(best_entry) < save_order(entry):
        best_tmp = download_verified(store, folder, best_entry)
        if best_tmp is not None:
            os.replace(best_tmp, folder / best_entry["file"])
            commit(folder, {k: best_entry[k] for k in fields}, None, keep_last, lineage=lineage)
    os.replace(tmp, safe_path(folder, entry["file"]))
    commit(folder, {k: entry[k] for k in fields}, best or None, keep_last, lineage=lineage)
    log.info("fetched %s/checkpoints/%s (step %d)", store.remote, entry["file"], entry["step"])


def fetch_latest(store: S3Store, folder: Path, newer_than: int, keep_last: int) -> bool:
    """Download the newest remote checkpoint newer than step `newer_than` that passes its sha256 check into
    the local `folder` and record it in the local manifest, with the best one. Returns whether one was fetched."""
    manifest, _ = store.manifest(rebuild=True)
    staged = stage_remote(store, folder, manifest, newer_than) if manifest is not None else None
    if staged is None:
        return False
    install_staged(store, folder, staged, manifest, keep_last)
    return True


def pull_files(store: S3Store, run_dir: Path, replace: bool = False) -> None:
    """Fetch the run's small files (metrics, recipe, ...) when the local run directory lacks them, or, with
    `replace`, whenever the store has them: a resume from a remote checkpoint newer than every local one continues
    the remote's history, and the stale local records would otherwise be synced over the only complete copy.
    Each file is downloaded beside its target, then renamed over it."""
    for name in SYNCED_FILES:
        if (replace or not (run_dir / name).exists()) and store.exists(name):
            partial = run_dir / f".{name}.pull"
            store.download_file(name, partial)
            os.replace(partial, run_dir / name)


def safe_path(dest: Path, name: str) -> Path:
    """`dest / name` for a name that came from the store, or UserError when it could land anywhere else:
    `..`, an absolute path, an empty segment or a backslash (a separator on Windows)."""
    parts = name.split("/")
    if not name or "\\" in name or any(p in ("", ".", "..") for p in parts) or PurePosixPath(name).is_absolute():
        raise UserError(f"{name!r}: not a safe relative name under {dest} (no '..', absolute path, empty "
                        "segment or backslash); refusing to write it")
    path = dest / PurePosixPath(*parts)
    if not path.resolve().is_relative_to(dest.resolve()):
        raise UserError(f"{name!r}: resolves outside {dest}; refusing to write it")
    return path
