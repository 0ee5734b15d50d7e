"""Training state capture and restore, atomic checkpoint files, the `latest.json` manifest, retention.

The state is one plain structure of tensors, dicts, lists and scalars (docs/DESIGN.md, section 3), so it
loads with `torch.load(weights_only=True)`: a checkpoint can never run code when it is opened.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "latest.json"
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


def checkpoint_name(global_step: int) -> str:
    return f"ckpt-{global_step:09d}.pt"


def cpu_copy(tree: Any) -> Any:
    """Detached CPU copies of every tensor in a nested dict/list, so training can go on while it is written."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [cpu_copy(v) for v in tree]
    return tree


def rng_state() -> dict:
    """Every process-level RNG stream as tensors and lists (numpy's tuple state would need pickle)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(state: dict, path: Path) -> dict:
    """Write `state` to `path` via a temp file in the same folder, fsync, rename; return its manifest entry.

    A crash at any point leaves either the old file or the complete new one, never a partial file under the
    final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return {"file": path.name, "step": int(state["global_step"]), "epoch": int(state["epoch"]),
            "sha256": sha256_of(path), "size": path.stat().st_size}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, manifest: dict) -> None:
    """Point `latest.json` at a complete checkpoint, atomically: it is written only after the file itself.

    Besides the newest file's `file`, `step`, `sha256` and `size` it lists every retained checkpoint with its
    hash, so that a corrupt newest file can fall back to a verified older one.
    """
    tmp = folder / f".{MANIFEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    _fsync_dir(folder)


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # a manifest is replaced atomically, so this is damage from outside; say so
        log.warning("%s is not valid JSON; ignoring it", folder / MANIFEST)
        return None


def commit(folder: Path, entry: dict, best: dict | None, keep_last: int, keep_best: bool = True) -> dict:
    """Record a freshly written checkpoint in the manifest, then delete what falls out of retention.

    Retention keeps the newest `keep_last` files and the best one; the file the manifest names is never
    deleted, because deletion happens only after the manifest has moved on.
    """
    previous = read_manifest(folder) or {}
    entries = [e for e in previous.get("checkpoints", []) if e["file"] != entry["file"]] + [entry]
    entries.sort(key=lambda e: e["step"])
    keep = {e["file"] for e in entries[-keep_last:]} | {entry["file"]}
    if keep_best and best and best.get("file"):
        keep.add(best["file"])
    kept = [e for e in entries if e["file"] in keep]
    manifest = {**entry, "best": best, "checkpoints": kept}
    write_manifest(folder, manifest)
    for p in folder.iterdir():
        if _NAME.match(p.name) and p.name not in keep:
            p.unlink(missing_ok=True)
    return manifest


def verify(path: Path, entry: dict) -> str | None:
    """None when the file has the recorded size and sha256; otherwise what is wrong with it."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"truncated or padded: {size} bytes, the manifest recorded {entry['size']}"
    if sha256_of(path) != entry["sha256"]:
        return "corrupt: its sha256 differs from the manifest's"
    return None


def find_latest(folder: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint in `folder` that passes its size and hash check, loaded; None when there is none.

    Leftovers of an interrupted write (temp files) are reported and removed; a damaged file is reported and
    skipped in favour of the previous good one.
    """
    if not folder.is_dir():
        return None
    for p in folder.glob(".ckpt-*.tmp-*"):
        log.warning("removing %s: a partial checkpoint from an interrupted write", p)
        p.unlink(missing_ok=True)
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    for entry in sorted(manifest.get("checkpoints", [manifest]), key=lambda e: e["step"], reverse=True):
        path = folder / entry["file"]
        problem = verify(path, entry)
        if problem is None:
            return path, load_state(path, entry)
        log.warning("skipping checkpoint %s (%s); falling back to the previous one", path, problem)
    return None


def load_state(path: str | Path, entry: dict | None = None) -> dict:
    """Load a checkpoint without unpickling objects; check its size and sha256 when the manifest lists it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if entry is None:
        manifest = read_manifest(path.parent) or {}
        entry = next((e for e in manifest.get("checkpoints", [manifest]) if e.get("file") == path.name), None)
        if entry is not None and (problem := verify(path, entry)):
            raise ValueError(f"{path}: {problem} ({path.parent / MANIFEST}): the file is truncated or corrupt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle of objects, or not a checkpoint at all
        raise ValueError(f"{path}: not a readable resnet50-recipe checkpoint ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a resnet50-recipe checkpoint (format {FORMAT} expected)")
    return state


class Writer:
    """Writes snapshots on a background thread so that saving does not stall training.

    At most one write is in flight; a snapshot submitted while another waits replaces it (the newer one is
    what a resume wants). `drain()` waits for the queue to empty, with a deadline.
    """

    def __init__(self, folder: Path, keep_last: int, keep_best: bool = True, on_commit=None):
        self.folder, self.keep_last, self.keep_best = folder, keep_last, keep_best
        self.on_commit = on_commit  # called with the new manifest on the writer thread (the S3 uploader)
        self._cond = threading.Condition()
        self._pending: dict | None = None
        self._busy = False
        self._error: BaseException | None = None
        self.last: dict | None = None  # the manifest after the newest completed write
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, state: dict) -> None:
        """Queue a CPU snapshot; its `best_checkpoint` names the file that retention must keep."""
        self._raise_error()
        with self._cond:
            if self._pending is not None:
                log.info("checkpoint at step %d superseded before it was written", self._pending["global_step"])
            self._pending = state
            self._cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted snapshot is on disk; False if the deadline passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        self._raise_error()
        return True

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint to {self.folder} failed: {error}") from error

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None:
                    self._cond.wait()
                state, self._pending = self._pending, None
                self._busy = True
            try:
                entry = save_atomic(state, self.folder / checkpoint_name(state["global_step"]))
                self.last = commit(self.folder, entry, state.get("best_checkpoint"), self.keep_last, self.keep_best)
                if self.on_commit is not None:
                    self.on_commit(self.last)
            except BaseException as e:  # reported to the training thread on its next submit or drain
                self._error = e
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
