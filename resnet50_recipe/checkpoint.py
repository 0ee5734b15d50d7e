"""Training state capture and restore, atomic checkpoint files, the `latest.json` manifest, retention.

The state is one plain structure of tensors, dicts, lists and scalars (docs/DESIGN.md, section 3), so it
loads with `torch.load(weights_only=True)`: a checkpoint can never run code when it is opened.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def write_manifest(folder: Path, entry: dict, best: dict | None) -> None:
    """Point `latest.json` at a complete checkpoint, atomically: it is written only after the file itself."""
    tmp = folder / f".{MANIFEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({**entry, "best": best}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    _fsync_dir(folder)


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None


def prune(folder: Path, keep_last: int, keep: set[str]) -> list[str]:
    """Delete all but the newest `keep_last` checkpoints, never touching the names in `keep` (best, latest)."""
    files = sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)
    doomed = [p for p in files[:-keep_last] if p.name not in keep]
    for p in doomed:
        p.unlink()
    return [p.name for p in doomed]


def load_state(path: str | Path) -> dict:
    """Load a checkpoint without unpickling objects; check it against the manifest when one describes it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    manifest = read_manifest(path.parent)
    if manifest and manifest.get("file") == path.name:
        size = path.stat().st_size
        if size != manifest["size"] or sha256_of(path) != manifest["sha256"]:
            raise ValueError(f"{path}: does not match {path.parent / MANIFEST} (size {size}, expected "
                             f"{manifest['size']}, or a different sha256): the file is truncated or corrupt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle of objects, or not a checkpoint at all
        raise ValueError(f"{path}: not a readable resnet50-recipe checkpoint ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a resnet50-recipe checkpoint (format {FORMAT} expected)")
    return state
