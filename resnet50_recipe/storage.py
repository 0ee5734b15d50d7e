"""The object store (S3 or an S3-compatible store, through boto3) and the background uploader.

The remote prefix mirrors the run directory: `checkpoints/ckpt-*.pt`, `checkpoints/latest.json`,
`metrics.jsonl`, `recipe.yaml`, ... The remote `latest.json` is written last, with a conditional put, and
only after the checkpoint it names has been uploaded and verified, so it can never point at a partial
object (the bug Composer shipped in PR 3376).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path

from . import checkpoint as ckpt

log = logging.getLogger(__name__)

# wandb.json (the W&B run id) comes back with a resume on a fresh machine, so W&B continues the same run.
SYNCED_FILES = ("metrics.jsonl", "recipe.yaml", "env.json", "curves.png", "summary.json", "wandb.json")
_CHUNK = 64 * 2**20  # multipart part size and threshold; the ETag check below recomputes with the same size


class RemoteError(RuntimeError):
    """The remote store cannot be used: unreachable, missing bucket, no permission, no credentials."""


def parse_remote(remote: str) -> tuple[str, str]:
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", remote or "")
    if not match:
        raise ValueError(f"checkpoint.remote: {remote!r} is not an S3 URL; expected s3://bucket/prefix")
    return match.group(1), match.group(2).strip("/")


class S3Store:
    """A prefix in a bucket. Credentials and region come from boto3's standard chain; the endpoint from the
    argument, or AWS_ENDPOINT_URL_S3 (read by boto3 itself), for MinIO, R2 and other S3-compatible stores."""

    def __init__(self, remote: str, endpoint_url: str | None = None, checksum: str = "when_supported"):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.remote = remote.rstrip("/")
        self.bucket, self.prefix = parse_remote(remote)
        config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                        request_checksum_calculation=checksum, response_checksum_validation=checksum)
        self.client = boto3.client("s3", endpoint_url=endpoint_url or None, config=config)
        self.transfer = TransferConfig(multipart_threshold=_CHUNK, multipart_chunksize=_CHUNK, max_concurrency=4)

    def child(self, sub: str) -> "S3Store":
        """The same store and client, one level deeper: `store.child("runs/in1k")`."""
        other = copy.copy(self)
        other.prefix = "/".join(p for p in (self.prefix, sub.strip("/")) if p)
        other.remote = f"s3://{self.bucket}/{other.prefix}"
        return other

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def upload_file(self, path: Path, name: str) -> None:
        self.client.upload_file(str(path), self.bucket, self.key(name), Config=self.transfer)

    def download_file(self, name: str, path: Path) -> None:
        self.client.download_file(self.bucket, self.key(name), str(path), Config=self.transfer)

    def head(self, name: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        except self.client.exceptions.ClientError as e:
            if e.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def get_json(self, name: str) -> tuple[dict | None, str | None]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
        except self.client.exceptions.NoSuchKey:
            return None, None
        try:
            return json.loads(response["Body"].read()), response["ETag"]
        except ValueError:
            raise ValueError(f"{self.remote}/{name}: not valid JSON") from None

    def put_json(self, name: str, data: dict, etag: str | None) -> str:
        """Conditional put: only over the version we read (If-Match), or only if absent (If-None-Match)."""
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        response = self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=json.dumps(data, indent=2),
                                          ContentType="application/json", **condition)
        return response["ETag"]

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(name))

    def copy(self, source: str, name: str) -> None:
        """A server-side copy within the prefix (multipart above 5 GB, by s3transfer): no bytes travel here."""
        self.client.copy({"Bucket": self.bucket, "Key": self.key(source)}, self.bucket, self.key(name),
                         Config=self.transfer)

    def manifest(self) -> tuple[dict | None, str | None]:
        """The remote checkpoints/latest.json and its ETag; ValueError when it is not a manifest."""
        data, etag = self.get_json(f"checkpoints/{ckpt.MANIFEST}")
        if data is not None:
            ckpt.check_manifest(data, f"{self.remote}/checkpoints/{ckpt.MANIFEST}")
        return data, etag

    def list(self, sub: str = "") -> list[str]:
        """Names (relative to the prefix) of every object under `sub`."""
        start = self.key(sub) if sub else (f"{self.prefix}/" if self.prefix else "")
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
            for item in page.get("Contents", []):
                names.append(item["Key"][len(self.prefix) + 1:] if self.prefix else item["Key"])
        return names

    def preflight(self) -> None:
        """Write and delete a small probe object, so that a wrong bucket or a missing permission fails now,
        before any training, instead of at the first checkpoint."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        probe = self.key(f".probe-{uuid.uuid4().hex}")
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"resnet50-recipe write probe")
            self.client.delete_object(Bucket=self.bucket, Key=probe)
        except NoCredentialsError:
            raise RemoteError(f"{self.remote}: no AWS credentials found (boto3 looks in the environment, "
                              "~/.aws and the instance role)") from None
        except ClientError as e:
            code = e.response["Error"]["Code"]
            if code == "NoSuchBucket":
                raise RemoteError(f"{self.remote}: bucket {self.bucket!r} does not exist; check checkpoint.remote "
                                  "or --remote") from None
            if code in ("AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise RemoteError(f"{self.remote}: not allowed to write there ({code}); the credentials need "
                                  "s3:PutObject, s3:GetObject, s3:DeleteObject and s3:ListBucket on this prefix") \
                    from None
            raise RemoteError(f"{self.remote}: the store refused a test write ({code})") from None
        except BotoCoreError as e:
            raise RemoteError(f"{self.remote}: cannot reach the store ({e})") from None


def expected_etag(path: Path, size: int) -> str:
    """The ETag S3 gives an object uploaded with our TransferConfig: the MD5 of the bytes for a single part,
    else the MD5 of the parts' MD5s and the part count. Lets an upload be verified without reading it back."""
    digests = []
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digests.append(hashlib.md5(block, usedforsecurity=False).digest())
    if size < _CHUNK:
        return digests[0].hex() if digests else hashlib.md5(b"", usedforsecurity=False).hexdigest()
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


class RemoteSuperseded(RemoteError):
    """The remote pointer belongs to a newer lineage: another run started afresh on this prefix."""


class Uploader:
    """Uploads committed checkpoints and the run's small files on a background thread.

    For each checkpoint: upload (multipart), verify size and ETag, then move the remote `latest.json` with a
    conditional put, then delete what falls out of retention. Only the newest pending checkpoint is kept when
    uploads fall behind. Failures are retried with backoff and never stop training; checkpoints that never
    made it are listed in `failed`.

    Lineages (docs/DESIGN.md): the remote pointer follows this run's lineage only. An older lineage found there
    is set aside (`claim`); a newer one means another run took the prefix over, and this one stops uploading
    rather than fight it. Retention deletes only files of this lineage that the pointer it replaced listed.
    """

    def __init__(self, store: S3Store, run_dir: Path, keep_last: int, keep_best: bool = True,
                 lineage: dict | None = None):
        self.store, self.run_dir, self.keep_last, self.keep_best = store, run_dir, keep_last, keep_best
        self.lineage = lineage or ckpt.new_lineage()
        self._cond = threading.Condition()
        self._pending: dict | None = None  # the local manifest naming the checkpoint to upload
        self._files_pending = False
        self._busy = False
        self._closed = False
        self.failed: list[str] = []
        self.superseded: str | None = None
        self.last_upload_s: float | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-uploader", daemon=True)
        self._thread.start()

    def submit(self, manifest: dict) -> None:
        with self._cond:
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
                return
            except Exception as e:  # network or store failure: warn, back off, try again; training goes on
                with self._cond:
                    if self._closed:  # the run has ended: what is left was reported as unfinished
                        return
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
        local = self.run_dir / "checkpoints" / entry["file"]
        name = f"checkpoints/{entry['file']}"
        head = self.store.head(name)
        if head is None or head["ContentLength"] != entry["size"]:
            self.store.upload_file(local, name)
            head = self.store.head(name)
        expected = expected_etag(local, entry["size"])
        if head is None or head["ContentLength"] != entry["size"] or head["ETag"].strip('"') != expected:
            self.store.delete(name)
            raise RemoteError(f"{name}: the uploaded object does not match the local file; deleted it")

    def _upload_checkpoint(self, manifest: dict) -> None:
        entry = {k: manifest[k] for k in ("file", "step", "epoch", "sha256", "size")}
        entry["run_id"] = self.lineage["run_id"]
        remote, _ = self.store.manifest()
        if remote is not None and ckpt.lineage_of(remote)["run_id"] != self.lineage["run_id"]:
            claim(self.store, self.lineage)  # before any upload, which could overwrite a same-named file of theirs
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
            if remote is not None and ckpt.lineage_of(remote)["run_id"] != self.lineage["run_id"]:
                claim(self.store, self.lineage)
                continue
            listed = (remote or {}).get("checkpoints", [])
            entries = [e for e in listed if e["file"] != entry["file"]] + [entry]
            if best_entry is not None and not any(e["file"] == best_entry["file"] for e in entries):
                entries.append({**best_entry, "run_id": self.lineage["run_id"]})
            entries.sort(key=lambda e: e["step"])
            remote_best = best if best_entry is not None else (remote or {}).get("best")
            keep = {e["file"] for e in entries[-self.keep_last:]} | {entry["file"]}
            if self.keep_best and remote_best and remote_best.get("file"):
                keep.add(remote_best["file"])
            kept = [e for e in entries if e["file"] in keep]
            try:
                self.store.put_json(f"checkpoints/{ckpt.MANIFEST}", {
                    **entry, "lineage": self.lineage, "run_id": self.lineage["run_id"], "best": remote_best,
                    "checkpoints": kept, "lineages": (remote or {}).get("lineages", [])}, etag)
                break
            except self.store.client.exceptions.ClientError as e:
                if e.response["Error"]["Code"] != "PreconditionFailed":
                    raise
                log.warning("the remote latest.json changed under us; reading it again")
        else:
            raise RemoteError("could not update the remote latest.json: another writer keeps changing it")
        for e in listed:  # only what the replaced pointer listed for this lineage: never another writer's files
            if e["file"] not in keep:
                self.store.delete(f"checkpoints/{e['file']}")

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


def claim(store: S3Store, lineage: dict) -> None:
    """Make `lineage` the remote's current one before it uploads anything. The checkpoints of the lineage the
    pointer named are copied aside into `checkpoints/lineages/<run_id>/` (server-side) and listed under
    `lineages`, then the pointer names the new lineage, then the originals go: nothing is lost, and no fresh
    machine resumes the abandoned lineage. A newer lineage already there is never displaced."""
    for _ in range(3):
        remote, etag = store.manifest()
        if remote is None or ckpt.lineage_of(remote)["run_id"] == lineage["run_id"]:
            if remote is None:
                try:
                    store.put_json(f"checkpoints/{ckpt.MANIFEST}", {
                        "lineage": lineage, "run_id": lineage["run_id"], "best": None, "checkpoints": [],
                        "lineages": []}, None)
                except store.client.exceptions.ClientError as e:
                    if e.response["Error"]["Code"] == "PreconditionFailed":
                        continue  # someone wrote one meanwhile: look at it
                    raise
            return
        theirs = ckpt.lineage_of(remote)
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
                if e.response["Error"]["Code"] not in ("404", "NoSuchKey", "NotFound"):
                    raise
        record = {**theirs, "folder": folder, "checkpoints": moved}
        try:
            store.put_json(f"checkpoints/{ckpt.MANIFEST}", {
                "lineage": lineage, "run_id": lineage["run_id"], "best": None, "checkpoints": [],
                "lineages": remote.get("lineages", []) + ([record] if moved else [])}, etag)
        except store.client.exceptions.ClientError as e:
            if e.response["Error"]["Code"] == "PreconditionFailed":
                continue
            raise
        for entry in moved:
            store.delete(f"checkpoints/{entry['file']}")
        log.info("lineage %s: its %d remote checkpoint(s) are kept in %s/checkpoints/%s", theirs["run_id"],
                 len(moved), store.remote, folder)
        return
    raise RemoteError(f"{store.remote}: could not claim the remote latest.json: another writer keeps changing it")


def stage_remote(store: S3Store, folder: Path, manifest: dict, newer_than: int) -> tuple[Path, dict] | None:
    """Download the newest checkpoint the remote manifest lists, newer than step `newer_than`, that passes its
    sha256 check, to a hidden temp file in `folder`; return it with its entry. Nothing is installed: the caller
    checks the checkpoint against the recipe and data first (`install_staged`). A corrupt or vanished object
    is reported and the previous one tried."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in sorted(manifest["checkpoints"], key=lambda e: e["step"], reverse=True):
        if entry["step"] <= newer_than:
            return None
        tmp = folder / f".{entry['file']}.tmp-{os.getpid()}"
        try:
            store.download_file(f"checkpoints/{entry['file']}", tmp)
        except store.client.exceptions.ClientError as e:
            if e.response["Error"]["Code"] not in ("404", "NoSuchKey", "NotFound"):
                raise
            log.warning("remote checkpoint %s/checkpoints/%s is listed but gone; trying the previous one",
                        store.remote, entry["file"])
            continue
        problem = ckpt.verify(tmp, entry)
        if problem:
            log.warning("remote checkpoint %s/checkpoints/%s is %s; trying the previous one", store.remote,
                        entry["file"], problem)
            tmp.unlink()
            continue
        return tmp, entry
    return None


def install_staged(store: S3Store, folder: Path, staged: tuple[Path, dict], manifest: dict, keep_last: int) -> None:
    """Put a staged download in place and record it, in the remote's lineage, in the local manifest."""
    tmp, entry = staged
    os.replace(tmp, folder / entry["file"])
    best = manifest.get("best") if (manifest.get("best") or {}).get("file") == entry["file"] else None
    ckpt.commit(folder, {k: entry[k] for k in ("file", "step", "epoch", "sha256", "size")}, best, keep_last,
                lineage=ckpt.lineage_of(manifest))
    log.info("fetched %s/checkpoints/%s (step %d)", store.remote, entry["file"], entry["step"])


def fetch_latest(store: S3Store, folder: Path, newer_than: int, keep_last: int) -> bool:
    """Download the newest remote checkpoint newer than step `newer_than` that passes its sha256 check into
    the local `folder` and record it in the local manifest. Returns whether one was fetched."""
    manifest, _ = store.manifest()
    staged = stage_remote(store, folder, manifest, newer_than) if manifest is not None else None
    if staged is None:
        return False
    install_staged(store, folder, staged, manifest, keep_last)
    return True


def pull_files(store: S3Store, run_dir: Path) -> None:
    """Fetch the run's small files (metrics, recipe, ...) when the local run directory lacks them."""
    for name in SYNCED_FILES:
        if not (run_dir / name).exists() and store.head(name) is not None:
            store.download_file(name, run_dir / name)


def list_runs(store: S3Store) -> list[dict]:
    """Every run under the store's prefix: where its latest.json is, with its step, epoch and results."""
    runs = []
    for name in store.list():
        if not name.endswith(f"checkpoints/{ckpt.MANIFEST}"):
            continue
        run = name[: -len(f"checkpoints/{ckpt.MANIFEST}")].rstrip("/")
        sub = store.child(run)
        manifest, _ = sub.get_json(f"checkpoints/{ckpt.MANIFEST}")
        summary, _ = sub.get_json("summary.json")
        runs.append({"run": sub.remote, "epoch": manifest.get("epoch", 0),
                     "step": manifest.get("step", 0), "top1": (summary or {}).get("top1"),
                     "best_top1": (summary or {}).get("best_top1"), "stopped": (summary or {}).get("stopped")})
    return runs


def pull_run(store: S3Store, dest: Path) -> list[str]:
    """Download every object of a run into `dest`; checkpoints are checked against the remote manifest."""
    manifest, _ = store.get_json(f"checkpoints/{ckpt.MANIFEST}")
    entries = {e["file"]: e for e in (manifest or {}).get("checkpoints", [])}
    fetched = []
    for name in store.list():
        if name.startswith(".probe-"):
            continue
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        store.download_file(name, path)
        base = name.rsplit("/", 1)[-1]
        if base in entries and (problem := ckpt.verify(path, entries[base])):
            log.warning("%s/%s is %s", store.remote, name, problem)
        fetched.append(name)
    return fetched
