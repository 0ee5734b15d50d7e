"""Training state capture and restore, atomic checkpoint files, the `latest.json` manifest, retention.

The state is one plain structure of tensors, dicts, lists and scalars (docs/DESIGN.md, section 3), so it
loads with `torch.load(weights_only=True)`: a checkpoint can never run code when it is opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import BinaryIO

import torch

from resnet50_recipe.errors import MissingInput, UserError

__all__ = ["FORMAT", "MANIFEST", "checkpoint_name", "free_name", "save_order", "new_lineage", "lineage_of",
           "save_atomic", "sha256_of",
           "write_manifest", "check_manifest", "read_manifest", "set_aside", "start_lineage", "commit",
           "verify_checkpoint", "remove_partials", "find_latest", "load_state", "Writer", "CheckpointError"]

log = logging.getLogger(__name__)

FORMAT = 1

MANIFEST = "latest.json"

_NAME = re.compile(r"^ckpt-(\d{9})(?:\.(\d+))?\.pt$")


def checkpoint_name(global_step: int, again: int = 0) -> str:
    """`ckpt-<step>.pt`; a later save at the same step (a run stopped during evaluation saves its step, and the
    resumed run saves it again once evaluated) is `ckpt-<step>.<again>.pt`, so that no save replaces a file that a
    manifest lists with its sha256, or that the remote pointer lists while the new object uploads."""
    return f"ckpt-{global_step:09d}.pt" if not again else f"ckpt-{global_step:09d}.{again}.pt"


def free_name(global_step: int, taken: set[str]) -> str:
    """The first name for a save at `global_step` that is not in `taken`."""
    again = 0
    while checkpoint_name(global_step, again) in taken:
        again += 1
    return checkpoint_name(global_step, again)


def save_order(entry: dict) -> tuple[int, int]:
    """The order in which checkpoints were saved: by step, then the later save at the same step."""
    match = _NAME.match(entry.get("file", ""))
    return entry["step"], int(match.group(2) or 0) if match else 0


def new_lineage(parent: dict | None = None) -> dict:
    """A fresh run id for a fresh start (docs/DESIGN.md, "Run lineage"). `parent` names the checkpoint a
    rollback or a copy started from: {"run_id", "step"}. The id sorts by its start time, so a listing shows the
    lineages of a run directory in the order they began."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return {"run_id": f"{stamp}-{uuid.uuid4().hex[:6]}", "started": time.time(), "parent": parent}


def lineage_of(manifest_or_state: dict | None) -> dict | None:
    """The lineage a manifest or checkpoint belongs to. Files written before lineages existed form one lineage
    that started at time 0, so any lineage started since is newer than it."""
    if manifest_or_state is None:
        return None
    return manifest_or_state.get("lineage") or {"run_id": "legacy", "started": 0.0, "parent": None}


def save_atomic(state: dict, path: Path) -> dict:
    """Write `state` to `path` via a temp file in the same folder, fsync, rename; return its manifest entry.

    A crash at any point leaves either the old file or the complete new one, never a partial file under the
    final name. A failed write (a full disk) removes its temp file before the error goes on.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            sink = _Writes(f)
            try:
                torch.save(state, sink)
            except RuntimeError:
                # torch reports a failed write as an inconsistency of its zip writer; the OS's error says it plainly.
                if sink.error is not None:
                    raise sink.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return {"file": path.name, "step": int(state["global_step"]), "epoch": int(state["epoch"]),
            "sha256": sha256_of(path), "size": path.stat().st_size,
            "run_id": lineage_of(state)["run_id"]}


class _Writes:
    """A file's write and flush, keeping the first OSError (ENOSPC, EFBIG) that a write raised."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path, also=None) -> str:
    """The file's sha256; `also` (anything with hashlib's `update`, such as a CRC) sees the same blocks, so
    that a second checksum costs no second read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            if also is not None:
                also.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, manifest: dict) -> None:
    """Point `latest.json` at a complete checkpoint, atomically: it is written only after the file itself.

    Besides the newest file's `file`, `step`, `sha256` and `size` it lists every retained checkpoint of the
    current lineage with its hash, so that a corrupt newest file can fall back to a verified older one, and the
    checkpoints of earlier lineages under `lineages`, which retention never deletes.
    """
    tmp = folder / f".{MANIFEST}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / MANIFEST)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)


def check_manifest(manifest, where: str) -> dict:
    """The manifest, or UserError when it is not one. Damage is reported with the way out that loses nothing:
    the checkpoint files are never judged, or touched, without the hashes the manifest holds."""
    entries = manifest.get("checkpoints") if isinstance(manifest, dict) else None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and {"file", "step", "sha256", "size"} <= e.keys() for e in entries):
        raise UserError(f"{where}: not a checkpoint manifest (it needs a 'checkpoints' list of entries with file, "
                        "step, sha256 and size)")
    return manifest


def read_manifest(folder: Path) -> dict | None:
    """The manifest `folder/latest.json`; None when there is none. A damaged one is an error that names the
    checkpoint files beside it and how to resume from one of them, since its hashes are what vouch for them."""
    path = folder / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return check_manifest(json.loads(text), str(path))
    except ValueError as e:  # a manifest is replaced atomically, so this is damage from outside
        files = sorted(p.name for p in folder.glob("ckpt-*.pt"))
        newest = f"; the newest file is {folder / files[-1]}" if files else ""
        raise UserError(f"{path} is damaged ({e}), so the {len(files)} checkpoint file(s) beside it cannot be "
                        f"verified{newest}. Nothing was changed: resume from one of them explicitly with "
                        "--resume PATH (it is checked as it loads), or restore latest.json from a copy "
                        "(S3, a backup)") from None


def set_aside(folder: Path, manifest: dict) -> dict:
    """Move the checkpoints `manifest` lists out of the way of a new lineage, into `lineages/<run_id>/`, and
    return the record of them that the new manifest keeps under `lineages`. Nothing is deleted: an abandoned
    lineage is kept until its owner deletes it, and it resumes only by an explicit path."""
    lineage = lineage_of(manifest)
    target = folder / "lineages" / lineage["run_id"]
    target.mkdir(parents=True, exist_ok=True)
    moved = []
    for entry in manifest.get("checkpoints", []):
        if (folder / entry["file"]).is_file():
            os.replace(folder / entry["file"], target / entry["file"])
        if (target / entry["file"]).is_file():
            moved.append(entry)
    _fsync_dir(folder)
    return {**lineage, "folder": f"lineages/{lineage['run_id']}", "checkpoints": moved}


def start_lineage(folder: Path, lineage: dict) -> dict:
    """Make `lineage` the folder's current one: an earlier lineage's checkpoints are set aside and listed, and the
    manifest names the new lineage with no checkpoint yet, so that no later auto-resume can pick up the old one."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        previous = read_manifest(folder)
    except ValueError:  # damaged: its files go aside unverified, with the damaged manifest, for their owner
        previous = {"lineage": {"run_id": f"unverified-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}",
                                "started": 0.0, "parent": None},
                    "checkpoints": [{"file": p.name} for p in sorted(folder.glob("ckpt-*.pt"))]}
        aside = folder / "lineages" / previous["lineage"]["run_id"]
        aside.mkdir(parents=True, exist_ok=True)
        os.replace(folder / MANIFEST, aside / f"damaged-{MANIFEST}")
    lineages = list((previous or {}).get("lineages", []))
    if previous is not None and lineage_of(previous)["run_id"] != lineage["run_id"]:
        record = set_aside(folder, previous)
        if record["checkpoints"]:
            lineages.append(record)
            log.info("lineage %s: its %d checkpoint(s) are kept in %s", record["run_id"], len(record["checkpoints"]),
                     folder / record["folder"])
    manifest = {"lineage": lineage, "run_id": lineage["run_id"], "best": None, "checkpoints": [],
                "lineages": lineages}
    write_manifest(folder, manifest)
    return manifest


def commit(folder: Path, entry: dict, best: dict | None, keep_last: int, keep_best: bool = True,
           lineage: dict | None = None) -> dict:
    """Record a freshly written checkpoint in the manifest, then delete what falls out of retention.

    Retention keeps the newest `keep_last` files of the current lineage and the best one; the file the manifest
    names is never deleted, because deletion happens only after the manifest has moved on. Only files this
    lineage's manifest listed are ever deleted: other lineages' files, and files the manifest never named, stay.
    `best` is recorded only when its file exists; otherwise the previous best stands.
    """
    previous = read_manifest(folder) or {}
    lineage = lineage or lineage_of(previous) or new_lineage()
    if previous and lineage_of(previous)["run_id"] != lineage["run_id"]:
        previous = start_lineage(folder, lineage)  # a writer of a new lineage: the old one is set aside, not pruned
    entry = {**entry, "run_id": lineage["run_id"]}
    entries = [e for e in previous.get("checkpoints", []) if e["file"] != entry["file"]] + [entry]
    entries.sort(key=save_order)
    if not (best and best.get("file") and (folder / best["file"]).is_file()):
        if best and best.get("file"):
            log.warning("the best checkpoint %s was never written; the manifest keeps the previous best", best["file"])
        best = previous.get("best")
    keep = {e["file"] for e in entries[-keep_last:]} | {entry["file"]}
    if keep_best and best and best.get("file"):
        keep.add(best["file"])
    kept = [e for e in entries if e["file"] in keep]
    manifest = {**entry, "lineage": lineage, "run_id": lineage["run_id"], "best": best, "checkpoints": kept,
                "lineages": previous.get("lineages", [])}
    write_manifest(folder, manifest)
    for e in entries:
        if e["file"] not in keep:
            (folder / e["file"]).unlink(missing_ok=True)
    return manifest


def verify_checkpoint(path: Path, entry: dict) -> str | None:
    """None when the file has the recorded size and sha256; otherwise what is wrong with it."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"truncated or padded: {size} bytes, the manifest recorded {entry['size']}"
    if sha256_of(path) != entry["sha256"]:
        return "corrupt: its sha256 differs from the manifest's"
    return None


def remove_partials(folder: Path) -> None:
    """Leftovers of an interrupted write (temp files) are reported and removed."""
    for p in folder.glob(".ckpt-*.tmp-*") if folder.is_dir() else []:
        log.warning("removing %s: a partial checkpoint from an interrupted write", p)
        p.unlink(missing_ok=True)


def find_latest(folder: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint of the folder's current lineage that passes its size and hash check, loaded; None
    when there is none.

    A damaged file is reported and skipped in favour of the previous good one. Earlier lineages, listed under
    `lineages`, are never candidates: resuming one of them takes an explicit path.
    """
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is None:
        return None
    for entry in sorted(manifest["checkpoints"], key=save_order, reverse=True):
        path = folder / entry["file"]
        problem = verify_checkpoint(path, entry)
        if problem is None:
            return path, load_state(path, entry)
        log.warning("skipping checkpoint %s (%s); falling back to the previous one", path, problem)
    return None


def load_state(path: str | Path, entry: dict | None = None, data: BinaryIO | None = None) -> dict:
    """Load a checkpoint without unpickling objects; check its size and sha256 when a manifest lists it (the one
    beside it, or for a set-aside lineage the run's manifest). `data`: the file's bytes, sent by the process that
    read and checked `path` (a DDP rank on another machine, which has no such file; the path names it in errors)."""
    path = Path(path)
    if data is None and not path.is_file():
        raise MissingInput(f"{path}: checkpoint not found")
    if entry is None and data is None:
        entry, manifest_path = _listed_entry(path)
        if entry is not None and (problem := verify_checkpoint(path, entry)):
            raise UserError(f"{path}: {problem} ({manifest_path}): the file is truncated or corrupt")
    try:
        state = torch.load(path if data is None else data, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle of objects, or not a checkpoint at all
        raise UserError(f"{path}: not a readable resnet50-recipe checkpoint ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a resnet50-recipe checkpoint (format {FORMAT} expected)")
    return state


def _listed_entry(path: Path) -> tuple[dict | None, Path | None]:
    """The manifest entry that vouches for `path`, and where it is; (None, None) when no readable manifest
    lists it (a copied file, or a damaged manifest: the load itself is then the only check)."""
    folder = path.parent
    candidates = [(folder, None)]
    if folder.parent.name == "lineages":  # checkpoints/lineages/<run_id>/ckpt-*.pt
        candidates.append((folder.parent.parent, folder.name))
    for where, run_id in candidates:
        try:
            manifest = read_manifest(where)
        except ValueError as e:
            log.warning("%s; loading %s without its hash check", e, path)
            continue
        if manifest is None:
            continue
        lists = [manifest["checkpoints"]] if run_id is None else [
            r["checkpoints"] for r in manifest.get("lineages", []) if r.get("run_id") == run_id]
        for entries in lists:
            entry = next((e for e in entries if e.get("file") == path.name), None)
            if entry is not None:
                return entry, where / MANIFEST
    return None, None


class Writer:
    """Writes snapshots on a background thread so that saving does not stall training.

    At most one write is in flight. A snapshot submitted while another waits replaces it (the newer one is what
    a resume wants), except a snapshot of a best epoch, which is always written: the manifest's `best` must
    name a file that exists. `drain()` waits for the queue to empty, with a deadline. A failed write is kept in
    `error` for the training thread, which stops the run; the previous checkpoint and manifest stay intact.
    """

    def __init__(self, folder: Path, keep_last: int, keep_best: bool = True, on_commit=None,
                 lineage: dict | None = None):
        self.folder, self.keep_last, self.keep_best, self.lineage = folder, keep_last, keep_best, lineage
        self.on_commit = on_commit  # called with the new manifest on the writer thread (the S3 uploader)
        self._cond = threading.Condition()
        self._pending: list[dict] = []
        self._busy = False
        self._writing: int | None = None
        self.error: BaseException | None = None
        self.last: dict | None = None  # the manifest after the newest completed write
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, state: dict) -> None:
        """Queue a CPU snapshot; its `best_checkpoint` names the file that retention must keep, `is_best`
        marks the snapshot of the best epoch so far, and `file`, when given, is the name to write it under."""
        self.raise_error()
        with self._cond:
            for waiting in [p for p in self._pending if not p.get("is_best")]:
                log.info("checkpoint at step %d superseded before it was written", waiting["global_step"])
                self._pending.remove(waiting)
            self._pending.append(state)
            self._cond.notify_all()

    @property
    def waiting(self) -> list[int]:
        """Steps of the snapshots not yet on disk (queued or being written)."""
        with self._cond:
            return [p["global_step"] for p in self._pending] + ([self._writing] if self._busy else [])

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted snapshot is on disk; False if the deadline passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (self._pending or self._busy) and self.error is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        self.raise_error()
        return True

    def raise_error(self) -> None:
        if self.error is not None:
            raise CheckpointError(f"writing a checkpoint to {self.folder} failed ({self.error}); the previous "
                                  "checkpoint and latest.json are intact. Free the space (or fix the disk) and "
                                  "run the same command again to resume from it") from self.error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                state = self._pending.pop(0)
                self._busy, self._writing = True, state["global_step"]
            try:
                name = state.pop("file", None) or checkpoint_name(state["global_step"])
                entry = save_atomic(state, self.folder / name)
                self.last = commit(self.folder, entry, state.get("best_checkpoint"), self.keep_last, self.keep_best,
                                   self.lineage or lineage_of(state))
                if self.on_commit is not None:
                    self.on_commit(self.last)
            except BaseException as e:  # reported to the training thread, which stops the run
                with self._cond:
                    self.error = e
                    self._pending.clear()
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (a full disk, a failing volume): the run stops, losing nothing saved."""
