"""The object store (S3 or an S3-compatible store, through boto3) and the background uploader.

The remote prefix mirrors the run directory: `checkpoints/ckpt-*.pt`, `checkpoints/latest.json`,
`metrics.jsonl`, `recipe.yaml`, ... The remote `latest.json` is written last, with a conditional put, and
only after the checkpoint it names has been uploaded and verified, so it can never point at a partial
object (the bug Composer shipped in PR 3376).
"""
from __future__ import annotations

import base64
import copy
import datetime
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path, PurePosixPath

from . import checkpoint as ckpt

log = logging.getLogger(__name__)

# wandb.json (the W&B run id) comes back with a resume on a fresh machine, so W&B continues the same run.
SYNCED_FILES = ("metrics.jsonl", "recipe.yaml", "env.json", "curves.png", "summary.json", "wandb.json")
_CHUNK = 64 * 2**20  # multipart part size and threshold
SIDECAR = ".json"  # checkpoints/ckpt-*.pt.json: the checkpoint's entry and lineage, for a pointer that is gone
# Errors a later attempt may not meet: the network, the store's 5xx and throttling, credentials being refreshed.
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
                    "RequestTimeout", "RequestTimeTooSkewed", "ExpiredToken", "ExpiredTokenException",
                    "RequestExpired", "TokenRefreshRequired", "OperationAborted"}
_MISSING_CODES = ("404", "NoSuchKey", "NotFound")


class RemoteError(RuntimeError):
    """The remote store cannot be used: missing bucket, no permission, no credentials. Permanent: exit 2."""


class RemoteUnavailable(RemoteError):
    """The store kept failing with errors that may pass (network, 5xx, throttling, expired credentials) for
    the whole start-up retry window: exit 75, so that the unit tries again later."""


def is_transient(error: BaseException) -> bool:
    """Whether an error from boto3 may go away by itself (README, "Exit codes")."""
    try:
        from botocore import exceptions as bx
    except ImportError:
        return False
    if isinstance(error, RemoteUnavailable):
        return True
    if isinstance(error, bx.ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return error.response["Error"].get("Code") in _TRANSIENT_CODES or status >= 500
    if isinstance(error, bx.SSLError):  # a certificate problem does not pass by waiting
        return False
    return isinstance(error, (bx.ConnectionError, bx.HTTPClientError, bx.CredentialRetrievalError))


def parse_remote(remote: str) -> tuple[str, str]:
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", remote or "")
    if not match:
        raise ValueError(f"checkpoint.remote: {remote!r} is not an S3 URL; expected s3://bucket/prefix")
    return match.group(1), match.group(2).strip("/")


def has_crc64() -> bool:
    """CRC64NVME needs the AWS common runtime (the `aws` extra): botocore computes it only through awscrt, and
    a pure-Python CRC64 runs at about 7 MB/s, 40 s for a ResNet-50 checkpoint, too slow for a spot notice."""
    try:
        from awscrt import checksums
    except ImportError:
        return False
    return hasattr(checksums, "crc64nvme")


class Crc64:
    """A running CRC64NVME with hashlib's `update`, so that it is computed in the sha256's pass over a file."""

    def __init__(self):
        from awscrt.checksums import crc64nvme

        self._fn, self.value = crc64nvme, 0

    def update(self, block: bytes) -> None:
        self.value = self._fn(block, self.value)

    def b64(self) -> str:
        return base64.b64encode(self.value.to_bytes(8, "big")).decode()


class S3Store:
    """A prefix in a bucket. Credentials and region come from boto3's standard chain; the endpoint from the
    argument, or AWS_ENDPOINT_URL_S3 (read by boto3 itself), for MinIO, R2 and other S3-compatible stores.

    Uploads carry a full-object CRC64NVME (flexible checksums) when awscrt is installed and the store keeps
    them (`crc64`, found out by `preflight`); otherwise an upload is verified by reading it back."""

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
        # `when_required` is for stores that reject checksums they were not asked for: send none then.
        self.checksum = checksum
        self.crc64 = checksum == "when_supported" and has_crc64()
        self.created = datetime.datetime.now(datetime.timezone.utc)

    def child(self, sub: str) -> "S3Store":
        """The same store and client, one level deeper: `store.child("runs/in1k")`."""
        other = copy.copy(self)
        other.prefix = "/".join(p for p in (self.prefix, sub.strip("/")) if p)
        other.remote = f"s3://{self.bucket}/{other.prefix}"
        return other

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def upload_file(self, path: Path, name: str) -> None:
        extra = {"ChecksumAlgorithm": "CRC64NVME"} if self.crc64 else None
        self.client.upload_file(str(path), self.bucket, self.key(name), ExtraArgs=extra, Config=self.transfer)

    def download_file(self, name: str, path: Path) -> None:
        self.client.download_file(self.bucket, self.key(name), str(path), Config=self.transfer)

    def exists(self, name: str) -> bool:
        """Asked by listing, which a prefix-scoped s3:ListBucket allows: AWS answers a HEAD of a missing key
        with 403, not 404, when the caller may not list the bucket without a prefix (aws/README.md)."""
        key = self.key(name)  # one key is enough: a key sorts before every other key it is a prefix of
        page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=key, MaxKeys=1)
        return any(item["Key"] == key for item in page.get("Contents", []))

    def head(self, name: str) -> dict | None:
        """The object's metadata with its flexible checksum, or None when there is no such object."""
        if not self.exists(name):
            return None
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(name), ChecksumMode="ENABLED")
        except self.client.exceptions.ClientError as e:
            if self.missing(e, name):  # deleted since the listing
                return None
            raise

    def missing(self, error, name: str) -> bool:
        """Whether a failed request means the object is not there: 404, or AWS's 403 for a missing key."""
        code = error.response["Error"]["Code"]
        return code in _MISSING_CODES or code in ("403", "AccessDenied") and not self.exists(name)

    def sha256(self, name: str) -> str:
        """The sha256 of the object's bytes, read back: the check for stores without flexible checksums."""
        digest = hashlib.sha256()
        body = self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"]
        for block in iter(lambda: body.read(1 << 20), b""):
            digest.update(block)
        return digest.hexdigest()

    def get_json(self, name: str) -> tuple[dict | None, str | None]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
        except self.client.exceptions.ClientError as e:
            if self.missing(e, name):
                return None, None
            raise
        try:
            return json.loads(response["Body"].read()), response["ETag"]
        except ValueError:
            raise ValueError(f"{self.remote}/{name}: not valid JSON") from None

    def put_json(self, name: str, data: dict, etag: str | None, conditional: bool = True) -> str:
        """Conditional put: only over the version we read (If-Match), or only if absent (If-None-Match)."""
        condition = ({"IfMatch": etag} if etag else {"IfNoneMatch": "*"}) if conditional else {}
        response = self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=json.dumps(data, indent=2),
                                          ContentType="application/json", **condition)
        return response["ETag"]

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(name))

    def copy(self, source: str, name: str) -> None:
        """A server-side copy within the prefix (multipart above 5 GB, by s3transfer): no bytes travel here."""
        self.client.copy({"Bucket": self.bucket, "Key": self.key(source)}, self.bucket, self.key(name),
                         Config=self.transfer)

    def manifest(self, rebuild: bool = False) -> tuple[dict | None, str | None]:
        """The remote checkpoints/latest.json and its ETag; ValueError when it is not a manifest. With `rebuild`
        (a resume), when it is gone but checkpoints remain, a manifest rebuilt from their sidecars, no ETag."""
        data, etag = self.get_json(f"checkpoints/{ckpt.MANIFEST}")
        if data is None:
            return (rebuilt_manifest(self) if rebuild else None), None
        ckpt.check_manifest(data, f"{self.remote}/checkpoints/{ckpt.MANIFEST}")
        return data, etag

    def list(self, sub: str = "", delimiter: bool = False) -> list[str]:
        """Names (relative to the prefix) of every object under `sub`; with `delimiter`, not in sub-folders."""
        start = self.key(sub) if sub else (f"{self.prefix}/" if self.prefix else "")
        names = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start,
                                                                      **({"Delimiter": "/"} if delimiter else {}))
        for page in pages:
            for item in page.get("Contents", []):
                names.append(item["Key"][len(self.prefix) + 1:] if self.prefix else item["Key"])
        return names

    def preflight(self, retry_s: float = 300.0) -> None:
        """Write, check and delete a small probe object, so that a wrong bucket or a missing permission fails
        now, before any training, instead of at the first checkpoint; then abort the multipart uploads an
        earlier process left unfinished. Errors that may pass are retried for `retry_s` seconds, with backoff
        (on top of boto3's own retries), then raise RemoteUnavailable; the others raise RemoteError at once."""
        deadline, delay = time.monotonic() + retry_s, 1.0
        while True:
            try:
                self._probe()
                break
            except Exception as e:
                if not is_transient(e):
                    raise self._explain(e) from None
                if time.monotonic() + delay > deadline:
                    raise RemoteUnavailable(f"{self.remote}: the store kept failing for {retry_s:.0f} s ({e}); "
                                            "exiting 75 so that a restart tries again") from None
                log.warning("%s: the store is not answering (%s); retrying in %.0f s", self.remote, e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.abort_stale_uploads()

    def _probe(self) -> None:
        probe = self.key(f".probe-{uuid.uuid4().hex}")
        body = b"resnet50-recipe write probe"
        if self.crc64:
            try:
                self.client.put_object(Bucket=self.bucket, Key=probe, Body=body, ChecksumAlgorithm="CRC64NVME")
                head = self.client.head_object(Bucket=self.bucket, Key=probe, ChecksumMode="ENABLED")
            except self.client.exceptions.ClientError as e:
                if e.response["Error"]["Code"] not in ("InvalidRequest", "InvalidArgument", "NotImplemented"):
                    raise
                head = {}  # a store that refuses the checksum header
            crc = Crc64()
            crc.update(body)
            if head.get("ChecksumCRC64NVME") != crc.b64():
                self.crc64 = False
        if not self.crc64:
            why = ("awscrt is not installed (pip install 'resnet50-recipe[aws]')" if not has_crc64() else
                   "checkpoint.checksum is when_required" if self.checksum == "when_required" else
                   "the store keeps no CRC64NVME checksums")
            log.info("%s: uploads are verified by reading them back (sha256): %s", self.remote, why)
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=body)
        self.client.delete_object(Bucket=self.bucket, Key=probe)

    def _explain(self, error: Exception) -> RemoteError:
        """The permanent start-up errors, in one line each."""
        from botocore.exceptions import ClientError, NoCredentialsError

        if isinstance(error, NoCredentialsError):
            return RemoteError(f"{self.remote}: no AWS credentials found (boto3 looks in the environment, "
                               "~/.aws and the instance role)")
        if not isinstance(error, ClientError):
            return RemoteError(f"{self.remote}: cannot reach the store ({error})")
        code = error.response["Error"]["Code"]
        if code == "NoSuchBucket":
            return RemoteError(f"{self.remote}: bucket {self.bucket!r} does not exist; check checkpoint.remote "
                               "or --remote")
        if code in ("AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return RemoteError(f"{self.remote}: not allowed to write there ({code}); the credentials need "
                               "s3:PutObject, s3:GetObject, s3:DeleteObject and s3:ListBucket on this prefix")
        return RemoteError(f"{self.remote}: the store refused a test write ({code})")

    def abort_stale_uploads(self) -> int:
        """Abort the multipart uploads under the prefix that began before this store was opened: a process
        killed mid-upload leaves its parts, which S3 bills until they are aborted. Needs
        s3:ListBucketMultipartUploads; without it the bucket's lifecycle rule does the job (aws/README.md)."""
        start = f"{self.prefix}/" if self.prefix else ""
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=start)
            stale = [u for page in pages for u in page.get("Uploads", []) if u["Initiated"] < self.created]
            for upload in stale:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        except self.client.exceptions.ClientError as e:
            log.warning("%s: could not abort stale multipart uploads (%s); the bucket's "
                        "AbortIncompleteMultipartUpload lifecycle rule removes them", self.remote,
                        e.response["Error"]["Code"])
            return 0
        if stale:
            log.info("%s: aborted %d multipart upload(s) left unfinished by an earlier process", self.remote,
                     len(stale))
        return len(stale)


class RemoteSuperseded(RemoteError):
    """The remote pointer belongs to a newer lineage: another run started afresh on this prefix."""


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
        self._etag: str | None = None  # of the pointer this uploader last wrote: any other means a second writer
        self.writer = {"pid": os.getpid(), "host": socket.gethostname(), "id": uuid.uuid4().hex}
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
        """Upload a checkpoint unless the store already holds exactly its bytes; verify the upload; then write
        its sidecar, which lets a fresh machine resume even if the remote latest.json is lost."""
        local = self.run_dir / "checkpoints" / entry["file"]
        name = f"checkpoints/{entry['file']}"
        crc = Crc64() if self.store.crc64 else None
        if ckpt.sha256_of(local, crc) != entry["sha256"]:  # the one pass that also computes the CRC64NVME
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
        if remote is not None and ckpt.lineage_of(remote)["run_id"] != self.lineage["run_id"]:
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
            if remote is not None and ckpt.lineage_of(remote)["run_id"] != self.lineage["run_id"]:
                claim(self.store, self.lineage)  # raises RemoteSuperseded for a newer lineage
                self._etag = None
                continue
            if self._etag is not None and etag != self._etag:
                raise self._second_writer(remote)
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
                self._etag = self.store.put_json(f"checkpoints/{ckpt.MANIFEST}", {
                    **entry, "lineage": self.lineage, "run_id": self.lineage["run_id"], "best": remote_best,
                    "checkpoints": kept, "lineages": (remote or {}).get("lineages", []), "writer": self.writer},
                    etag)
                break
            except self.store.client.exceptions.ClientError as e:
                if e.response["Error"]["Code"] != "PreconditionFailed":
                    raise
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

    def _second_writer(self, remote: dict | None) -> RemoteSuperseded:
        other = (remote or {}).get("writer") or {}
        return RemoteSuperseded(
            f"{self.store.remote}/checkpoints/{ckpt.MANIFEST} was rewritten by another writer of lineage "
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
                if not store.missing(e, f"checkpoints/{entry['file']}"):
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
            store.delete(f"checkpoints/{entry['file']}{SIDECAR}")
        log.info("lineage %s: its %d remote checkpoint(s) are kept in %s/checkpoints/%s", theirs["run_id"],
                 len(moved), store.remote, folder)
        return
    raise RemoteError(f"{store.remote}: could not claim the remote latest.json: another writer keeps changing it")


def stage_remote(store: S3Store, folder: Path, manifest: dict, newer_than: int) -> tuple[Path, dict] | None:
    """Download the newest checkpoint the remote manifest lists, newer than step `newer_than`, that passes its
    sha256 check, to a hidden temp file in `folder`; return it with its entry. Nothing is installed: the caller
    checks the checkpoint against the recipe and data first (`install_staged`). A corrupt or vanished object
    is reported and the previous one tried."""
    for entry in sorted(manifest["checkpoints"], key=lambda e: e["step"], reverse=True):
        if entry["step"] <= newer_than:
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
    problem = ckpt.verify(tmp, entry)
    if problem:
        log.warning("remote checkpoint %s/%s is %s; trying the previous one", store.remote, name, problem)
        tmp.unlink()
        return None
    return tmp


def install_staged(store: S3Store, folder: Path, staged: tuple[Path, dict], manifest: dict, keep_last: int) -> None:
    """Put a staged download in place and record it, in the remote's lineage, in the local manifest, with the
    remote's best checkpoint, fetched too when it is another file, so that a fresh machine keeps it."""
    tmp, entry = staged
    lineage = ckpt.lineage_of(manifest)
    best = manifest.get("best") or {}
    best_entry = next((e for e in manifest["checkpoints"] if e["file"] == best.get("file")), None)
    fields = ("file", "step", "epoch", "sha256", "size")
    if best_entry is not None and best_entry["file"] != entry["file"] and best_entry["step"] < entry["step"]:
        best_tmp = download_verified(store, folder, best_entry)
        if best_tmp is not None:
            os.replace(best_tmp, folder / best_entry["file"])
            ckpt.commit(folder, {k: best_entry[k] for k in fields}, None, keep_last, lineage=lineage)
    os.replace(tmp, safe_path(folder, entry["file"]))
    ckpt.commit(folder, {k: entry[k] for k in fields}, best or None, keep_last, lineage=lineage)
    log.info("fetched %s/checkpoints/%s (step %d)", store.remote, entry["file"], entry["step"])


def rebuilt_manifest(store: S3Store) -> dict | None:
    """When the remote latest.json is gone but checkpoints remain: a manifest of the newest lineage's checkpoints
    from their sidecars, so that a fresh machine resumes from the newest one that verifies instead of step 0."""
    sidecars = [n for n in store.list("checkpoints/", delimiter=True) if n.endswith(f".pt{SIDECAR}")]
    found = []
    for name in sidecars:
        data, _ = store.get_json(name)
        if isinstance(data, dict) and {"file", "step", "sha256", "size", "lineage"} <= data.keys() and \
                store.exists(f"checkpoints/{data['file']}"):
            found.append(data)
    if not found:
        return None
    lineage = max((e["lineage"] for e in found), key=lambda lin: lin["started"])
    entries = sorted((e for e in found if e["lineage"]["run_id"] == lineage["run_id"]), key=lambda e: e["step"])
    log.warning("%s/checkpoints/%s is gone, but %d checkpoint(s) of lineage %s remain: resuming from the newest "
                "that verifies, not from step 0", store.remote, ckpt.MANIFEST, len(entries), lineage["run_id"])
    checkpoints = [{k: e[k] for k in ("file", "step", "epoch", "sha256", "size", "run_id") if k in e}
                   for e in entries]
    return {**checkpoints[-1], "lineage": lineage, "run_id": lineage["run_id"], "best": None,
            "checkpoints": checkpoints, "lineages": []}


def fetch_latest(store: S3Store, folder: Path, newer_than: int, keep_last: int) -> bool:
    """Download the newest remote checkpoint newer than step `newer_than` that passes its sha256 check into
    the local `folder` and record it in the local manifest, with the best one. Returns whether one was fetched."""
    manifest, _ = store.manifest(rebuild=True)
    staged = stage_remote(store, folder, manifest, newer_than) if manifest is not None else None
    if staged is None:
        return False
    install_staged(store, folder, staged, manifest, keep_last)
    return True


def pull_files(store: S3Store, run_dir: Path) -> None:
    """Fetch the run's small files (metrics, recipe, ...) when the local run directory lacks them."""
    for name in SYNCED_FILES:
        if not (run_dir / name).exists() and store.exists(name):
            store.download_file(name, run_dir / name)


def safe_path(dest: Path, name: str) -> Path:
    """`dest / name` for a name that came from the store, or ValueError when it could land anywhere else:
    `..`, an absolute path, an empty segment or a backslash (a separator on Windows)."""
    parts = name.split("/")
    if not name or "\\" in name or any(p in ("", ".", "..") for p in parts) or PurePosixPath(name).is_absolute():
        raise ValueError(f"{name!r}: not a safe relative name under {dest} (no '..', absolute path, empty "
                         "segment or backslash); refusing to write it")
    path = dest / PurePosixPath(*parts)
    if not path.resolve().is_relative_to(dest.resolve()):
        raise ValueError(f"{name!r}: resolves outside {dest}; refusing to write it")
    return path


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


def pull_run(store: S3Store, dest: Path) -> tuple[list[str], list[str]]:
    """Download every object of a run into `dest`; checkpoints are checked against the remote manifest. Returns
    the names fetched and the names refused because they would land outside `dest` (`safe_path`)."""
    manifest, _ = store.get_json(f"checkpoints/{ckpt.MANIFEST}")
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
        if base in entries and (problem := ckpt.verify(path, entries[base])):
            log.warning("%s/%s is %s", store.remote, name, problem)
        fetched.append(name)
    return fetched, refused
