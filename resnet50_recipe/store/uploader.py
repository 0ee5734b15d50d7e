"""The background uploader: each committed local checkpoint goes to the store (upload, verify, sidecar), then the
remote pointer moves, with a conditional put; the run's files follow. At most one upload is in flight."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from resnet50_recipe.store.checkpoints import MANIFEST, lineage_of, new_lineage, save_order, sha256_of
from resnet50_recipe.store.lineage import SYNCED_FILES, RemoteSuperseded, claim
from resnet50_recipe.store.s3 import SIDECAR, Crc64, RemoteError, S3Store

__all__ = ["Uploader"]

log = logging.getLogger(__name__)


class Uploader:
    """Uploads committed checkpoints and the run's small files on a background thread.

    For each checkpoint: upload (multipart, with a CRC64NVME), verify size and checksum, write its sidecar, then
    move the remote `latest.json` with a conditional put, then delete what falls out of retention. A pointer
    changed by anyone else since this uploader's last write means a second writer on the prefix: uploading
    stops with an error rather than fight it. Only the newest pending checkpoint is kept when
    uploads fall behind. Failures are retried with backoff and never stop training; checkpoints that never
    made it are listed in `failed`.

    Lineages (docs/DESIGN.md): the remote pointer follows this run's lineage only. An older lineage found there
    is set aside (`claim`); a newer one means another run took the prefix over, and this one stops uploading
    rather than fight it. Retention deletes only files of this lineage that the pointer it replaced listed.
    """

    def __init__(self, store: S3Store, run_dir: Path, keep_last: int, keep_best: bool = True,
                 lineage: dict | None = None, on_superseded: Callable[[str], None] | None = None):
        self.store, self.run_dir, self.keep_last, self.keep_best = store, run_dir, keep_last, keep_best
        self.on_superseded = on_superseded  # told why, once, when another run has taken the prefix over
        self.lineage = lineage or new_lineage()
        self._cond = threading.Condition()
        self._pending: dict | None = None  # the local manifest naming the checkpoint to upload
        self._files_pending = False
        self._busy = False
        self._closed = False
        self.failed: list[str] = []
        self.superseded: str | None = None
        self._etag: str | None = None  # of the pointer this uploader last wrote: any other means a second writer
        self.writer = {"pid": os.getpid(), "host": socket.gethostname(), "id": uuid.uuid4().hex}
        self.last_upload_s: float | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-uploader", daemon=True)
        self._thread.start()

    def submit(self, manifest: dict) -> None:
        with self._cond:
            if self.superseded:
                self.failed.append(manifest["file"])
                return
            if self._pending is not None:
                log.warning("upload of %s superseded by %s before it started", self._pending["file"],
                            manifest["file"])
                self.failed.append(self._pending["file"])
            self._pending = manifest
            self._files_pending = True
            self._cond.notify_all()

    @property
    def pending(self) -> str | None:
        """The checkpoint still waiting to be uploaded, if any."""
        with self._cond:
            return self._pending["file"] if self._pending is not None else None

    def sync_files(self) -> None:
        with self._cond:
            if self.superseded:  # the thread is gone: nothing would ever sync them, and a drain would wait it out
                return
            self._files_pending = True
            self._cond.notify_all()

    def unfinished(self) -> list[str]:
        """What has not reached the store yet: the pending checkpoint, the run's files."""
        with self._cond:
            left = [f"upload of checkpoints/{self._pending['file']}"] if self._pending is not None else []
            if self._files_pending or (self._busy and self._pending is None):
                left.append("sync of the run's files")
            return left

    def drain(self, timeout: float) -> bool:
        """Wait until everything submitted is in the store; False when `timeout` seconds passed first. There is
        always a deadline: a store that is down must not hold a stopping run past its notice."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._files_pending or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self) -> None:
        """Stop the thread once it is idle; one still retrying gives up after its current attempt."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run(self) -> None:
        delay = 1.0
        while True:
            with self._cond:
                while self._pending is None and not self._files_pending and not self._closed:
                    self._cond.wait()
                if self._closed and self._pending is None and not self._files_pending:
                    return
                manifest, files = self._pending, self._files_pending
                self._busy = True
            try:
                if manifest is not None:
                    start = time.monotonic()
                    self._upload_checkpoint(manifest)
                    self.last_upload_s = time.monotonic() - start
                if files:
                    self._upload_files()
                with self._cond:
                    if self._pending is manifest:
                        self._pending = None
                    if files:
                        self._files_pending = self._pending is not None
                delay = 1.0
            except RemoteSuperseded as e:  # permanent: never overwrite another run's pointer
                log.error("%s; this run's checkpoints stay local from now on", e)
                with self._cond:
                    self.superseded = str(e)
                    self.failed += [self._pending["file"]] if self._pending else []
                    self._pending, self._files_pending, self._closed = None, False, True
                if self.on_superseded is not None:
                    self.on_superseded(str(e))
                return
            except Exception as e:  # network or store failure: warn, back off, try again; training goes on
                with self._cond:
                    if self._closed:  # the run has ended: what is left was reported as unfinished
                        return
                if self.store.credentials_pending(e):  # on EC2: the instance role's credentials, late
                    self.store.renew_client()
                log.warning("upload to %s failed (%s); retrying in %.0f s", self.store.remote, e, delay)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait(delay)
                delay = min(delay * 2, 60.0)
                continue
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _ensure_uploaded(self, entry: dict) -> None:
        """Upload a checkpoint unless the store already holds exactly its bytes; verify the upload; then write
        its sidecar, which lets a fresh machine resume even if the remote latest.json is lost."""
        local = self.run_dir / "checkpoints" / entry["file"]
        name = f"checkpoints/{entry['file']}"
        crc = Crc64() if self.store.crc64 else None
        if sha256_of(local, crc) != entry["sha256"]:  # the one pass that also computes the CRC64NVME
            raise RemoteError(f"{local}: its sha256 differs from the local manifest's; not uploading it")
        if not self._holds(name, entry, crc):
            self.store.upload_file(local, name)
            if not self._holds(name, entry, crc):
                raise RemoteError(f"{self.store.remote}/{name}: the uploaded object does not match the local file")
        self.store.put_json(name + SIDECAR, {**entry, "lineage": self.lineage}, None, conditional=False)

    def _holds(self, name: str, entry: dict, crc: Crc64 | None) -> bool:
        """Whether the object has the local file's size and bytes: its full-object CRC64NVME against the local
        one, or, on a store that keeps no flexible checksums, its sha256 read back."""
        head = self.store.head(name)
        if head is None or head["ContentLength"] != entry["size"]:
            return False
        if crc is not None and self.store.crc64:
            if "ChecksumCRC64NVME" in head:
                return head["ChecksumCRC64NVME"] == crc.b64()
            if any(k.startswith("Checksum") and k != "ChecksumType" for k in head):
                return False  # written by someone else, with another algorithm
            self.store.crc64 = False
            log.warning("%s: the store returned no checksum for %s; uploads are verified by reading them back "
                        "(sha256) from now on", self.store.remote, name)
        return self.store.sha256(name) == entry["sha256"]

    def _upload_checkpoint(self, manifest: dict) -> None:
        entry = {k: manifest[k] for k in ("file", "step", "epoch", "sha256", "size")}
        entry["run_id"] = self.lineage["run_id"]
        remote, _ = self.store.manifest()
        if remote is not None and lineage_of(remote)["run_id"] != self.lineage["run_id"]:
            claim(self.store, self.lineage)  # before any upload, which could overwrite a same-named file of theirs
            self._etag = None
        self._ensure_uploaded(entry)
        best = manifest.get("best")
        best_entry = next((e for e in manifest.get("checkpoints", []) if best and e["file"] == best.get("file")),
                          None)
        if best_entry is not None and best_entry["file"] != entry["file"] and \
                (self.run_dir / "checkpoints" / best_entry["file"]).is_file():
            self._ensure_uploaded(best_entry)  # the pointer's `best` must name an object that is there
        # Only now may the pointer name it. The conditional put makes a concurrent writer fail, not interleave.
        for _ in range(3):
            remote, etag = self.store.manifest()
            if remote is not None and lineage_of(remote)["run_id"] != self.lineage["run_id"]:
                claim(self.store, self.lineage)  # raises RemoteSuperseded for a newer lineage
                self._etag = None
                continue
            # A second writer is told by its writer id, never by an ETag alone: a write of ours whose answer was
            # lost (below) leaves a pointer with an ETag this uploader never saw.
            if self._etag is not None and etag != self._etag and not self._mine(remote):
                raise self._second_writer(remote)
            listed = (remote or {}).get("checkpoints", [])
            entries = [e for e in listed if e["file"] != entry["file"]] + [entry]
            if best_entry is not None and not any(e["file"] == best_entry["file"] for e in entries):
                entries.append({**best_entry, "run_id": self.lineage["run_id"]})
            entries.sort(key=save_order)
            remote_best = best if best_entry is not None else (remote or {}).get("best")
            keep = {e["file"] for e in entries[-self.keep_last:]} | {entry["file"]}
            if self.keep_best and remote_best and remote_best.get("file"):
                keep.add(remote_best["file"])
            kept = [e for e in entries if e["file"] in keep]
            try:
                self._etag = self.store.put_json(f"checkpoints/{MANIFEST}", {
                    **entry, "lineage": self.lineage, "run_id": self.lineage["run_id"], "best": remote_best,
                    "checkpoints": kept, "lineages": (remote or {}).get("lineages", []), "writer": self.writer},
                    etag)
                break
            except self.store.client.exceptions.ClientError as e:
                if e.response["Error"]["Code"] != "PreconditionFailed":
                    raise
                # botocore resends a request whose answer was lost; when the store had applied the first one, the
                # resent conditional put meets the pointer it moved itself. That write is done.
                now, now_etag = self.store.manifest()
                if self._mine(now) and (now or {}).get("file") == entry["file"] and \
                        now.get("sha256") == entry["sha256"]:
                    log.info("the remote latest.json already names %s: this uploader's write, whose answer was lost",
                             entry["file"])
                    self._etag = now_etag
                    break
                log.warning("the remote latest.json changed under us; reading it again")
                self._etag = etag or ""  # so that the next pass tells a second writer from a lineage's claim
        else:
            raise RemoteError("could not update the remote latest.json: another writer keeps changing it")
        # Retention, only once the pointer has moved on, and only of this lineage's files that the replaced
        # pointer listed: never another writer's or another lineage's.
        for e in listed:
            if e["file"] not in keep and e.get("run_id") == self.lineage["run_id"]:
                self.store.delete(f"checkpoints/{e['file']}")
                self.store.delete(f"checkpoints/{e['file']}{SIDECAR}")

    def _mine(self, remote: dict | None) -> bool:
        """Whether this uploader wrote the pointer `remote`: its writer id, unique per uploader."""
        return ((remote or {}).get("writer") or {}).get("id") == self.writer["id"]

    def _second_writer(self, remote: dict | None) -> RemoteSuperseded:
        other = (remote or {}).get("writer") or {}
        return RemoteSuperseded(
            f"{self.store.remote}/checkpoints/{MANIFEST} was rewritten by another writer of lineage "
            f"{self.lineage['run_id']} (pid {other.get('pid', '?')} on host {other.get('host', '?')}): two "
            "machines are training the same run on one prefix; stop one of them")

    def _upload_files(self) -> None:
        for name in SYNCED_FILES:
            path = self.run_dir / name
            if path.is_file():
                self.store.upload_file(path, name)
        for folder in ("export", "tensorboard"):  # event files are named per process, so none overwrites another
            if (self.run_dir / folder).is_dir():
                for path in sorted((self.run_dir / folder).iterdir()):
                    if path.is_file():
                        self.store.upload_file(path, f"{folder}/{path.name}")
