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
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from resnet50_recipe.errors import UserError
from resnet50_recipe.store.checkpoints import MANIFEST, check_manifest, save_order

__all__ = ["SIDECAR", "MULTIPART", "RemoteError", "RemoteRefused", "RemoteUnavailable", "is_transient", "parse_remote",
           "has_crc64", "Crc64", "Waiting", "S3Store", "rebuilt_manifest"]

log = logging.getLogger(__name__)

_CHUNK = 64 * 2**20  # multipart part size and threshold

SIDECAR = ".json"  # checkpoints/ckpt-*.pt.json: the checkpoint's entry and lineage, for a pointer that is gone

# .multipart/<id>.json under the prefix: one per multipart upload this store started and has not seen complete,
# {"key", "upload_id"}, so that a later process aborts exactly those (`abort_stale_uploads`). Listing a bucket's
# uploads needs s3:ListBucketMultipartUploads on the whole bucket (AWS has no prefix condition for it), which would
# show the run role every unfinished upload's key in the bucket.
MULTIPART = ".multipart"


# Errors a later attempt may not meet: the network, the store's 5xx and throttling, credentials being refreshed.
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
                    "RequestTimeout", "RequestTimeTooSkewed", "ExpiredToken", "ExpiredTokenException",
                    "RequestExpired", "TokenRefreshRequired", "OperationAborted"}

_MISSING_CODES = ("404", "NoSuchKey", "NotFound")


class RemoteError(RuntimeError):
    """The remote store failed. Its subclasses say whose to fix: `RemoteRefused` is bad input (exit 2),
    `RemoteUnavailable` a store that may come back (exit 75); a plain one (a failed upload check) is retried
    by the uploader and never ends a run."""


class RemoteRefused(UserError, RemoteError):
    """The remote the user named cannot be used as given: missing bucket or object, no permission, no
    credentials, an endpoint that does not answer as a store, another writer on its pointer. Permanent: exit 2."""


class RemoteUnavailable(RemoteError):
    """The store kept failing with errors that may pass (network, 5xx, throttling, expired credentials) for
    the whole start-up retry window: exit 75, so that the unit tries again later."""


def is_transient(error: BaseException, on_ec2: bool = False) -> bool:
    """Whether an error from boto3 may go away by itself (README, "Exit codes"). `on_ec2`: the credentials come
    from the instance role, so that missing credentials mean a metadata service too slow for botocore's one
    attempt of 1 s, which passes; elsewhere they mean none were given, which does not."""
    try:
        from botocore import exceptions as bx
    except ImportError:
        return False
    if isinstance(error, RemoteUnavailable):
        return True
    if isinstance(error, bx.NoCredentialsError):
        return on_ec2
    if isinstance(error, bx.ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return error.response["Error"].get("Code") in _TRANSIENT_CODES or status >= 500
    if isinstance(error, bx.SSLError):  # a certificate problem does not pass by waiting
        return False
    return isinstance(error, (bx.ConnectionError, bx.HTTPClientError, bx.CredentialRetrievalError))


def parse_remote(remote: str) -> tuple[str, str]:
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", remote or "")
    if not match:
        raise UserError(f"checkpoint.remote: {remote!r} is not an S3 URL; expected s3://bucket/prefix")
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


class Waiting:
    """A wait of more than a few seconds is never silent: `note` says at its first call what is being waited for
    (what failed, where, for how long at most, Ctrl-C to stop), then at most every `every_s` seconds how it goes;
    `end` gives the outcome, only when something was said. Lines go to the package's log (stderr in the CLI)."""

    def __init__(self, every_s: float = 30.0):
        self.every_s, self.started, self.last = every_s, time.monotonic(), None

    def note(self, first: str, later: str) -> None:
        now = time.monotonic()
        if self.last is None or now - self.last >= self.every_s:
            log.warning(first if self.last is None else f"{later} ({now - self.started:.0f} s so far)")
            self.last = now

    def end(self, outcome: str) -> None:
        if self.last is not None:
            log.warning("%s after %.0f s", outcome, time.monotonic() - self.started)


class S3Store:
    """A prefix in a bucket. Credentials and region come from boto3's standard chain; the endpoint from the
    argument, or AWS_ENDPOINT_URL_S3 (read by boto3 itself), for MinIO, R2 and other S3-compatible stores.

    Uploads carry a full-object CRC64NVME (flexible checksums) when awscrt is installed and the store keeps
    them (`crc64`, found out by `preflight`); otherwise an upload is verified by reading it back.

    `on_ec2` (the trainer passes its metadata-service probe, trainer/stop.py's `on_ec2`; this layer cannot import
    it) is asked only when credentials are missing: on EC2 they are the instance role's, late, and are waited
    for (`credentials_pending`); elsewhere missing credentials stay a permanent error."""

    def __init__(self, remote: str, endpoint_url: str | None = None, checksum: str = "when_supported",
                 on_ec2: Callable[[], bool] | None = None):
        from boto3.s3.transfer import TransferConfig

        self.remote = remote.rstrip("/")
        self.bucket, self.prefix = parse_remote(remote)
        self.endpoint_url, self.checksum, self.on_ec2 = endpoint_url or None, checksum, on_ec2
        self._ec2: bool | None = None  # on_ec2's answer, once asked
        self._records: dict[str, list[str]] = {}  # key -> its MULTIPART records, of uploads not yet complete
        self.client = self._new_client()
        self.transfer = TransferConfig(multipart_threshold=_CHUNK, multipart_chunksize=_CHUNK, max_concurrency=4)
        # `when_required` is for stores that reject checksums they were not asked for: send none then.
        self.crc64 = checksum == "when_supported" and has_crc64()
        self.created = datetime.datetime.now(datetime.timezone.utc)

    def _new_client(self, patient: bool = False):
        """An S3 client; `patient`, one whose credentials are read from the instance metadata service with 5 s
        timeouts and 3 attempts instead of botocore's 1 s and 1 (botocore's metadata_service_timeout and
        metadata_service_num_attempts settings, AWS_METADATA_SERVICE_TIMEOUT / _NUM_ATTEMPTS in the environment)."""
        import boto3
        import botocore.session
        from botocore.config import Config

        config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                        request_checksum_calculation=self.checksum, response_checksum_validation=self.checksum)
        if not patient:
            client = boto3.client("s3", endpoint_url=self.endpoint_url, config=config)
        else:
            session = botocore.session.get_session()
            for name, value in (("metadata_service_timeout", 5), ("metadata_service_num_attempts", 3)):
                if session.get_config_variable(name) in (None, 1):  # botocore's defaults; a user's own setting stays
                    session.set_config_variable(name, value)
            client = boto3.Session(botocore_session=session).client("s3", endpoint_url=self.endpoint_url,
                                                                    config=config)
        # s3transfer starts multipart uploads itself and keeps their ids to itself: the answer is read here, on
        # its worker thread, before any part is sent.
        client.meta.events.register("after-call.s3.CreateMultipartUpload", self._record_upload)
        return client

    def _record_upload(self, parsed: dict, **_) -> None:
        """Store a new multipart upload's id under the prefix (MULTIPART) before its parts go, so that a later
        process can abort it if this one dies mid-upload; `_uploaded` deletes the record once it is complete."""
        key, upload_id = parsed.get("Key"), parsed.get("UploadId")
        if not key or not upload_id:  # an error answer
            return
        record = self.key(f"{MULTIPART}/{hashlib.sha256(upload_id.encode()).hexdigest()[:32]}.json")
        try:
            self.client.put_object(Bucket=self.bucket, Key=record, ContentType="application/json",
                                   Body=json.dumps({"key": key, "upload_id": upload_id}))
        except Exception as e:  # the upload itself may well succeed: only a crash in it would leave parts behind
            log.warning("%s: could not record multipart upload %s of %s (%s); if this process dies mid-upload, the "
                        "bucket's AbortIncompleteMultipartUpload lifecycle rule removes its parts", self.remote,
                        upload_id, key, e)
            return
        self._records.setdefault(key, []).append(record)

    def _uploaded(self, key: str) -> None:
        """The upload of `key` is complete: its records go."""
        for record in self._records.pop(key, []):
            self.client.delete_object(Bucket=self.bucket, Key=record)

    def credentials_pending(self, error: BaseException) -> bool:
        """Whether `error` is missing credentials that the instance role will bring: on EC2, with the metadata
        service enabled. The caller then retries after `renew_client`."""
        from botocore.exceptions import NoCredentialsError

        if not isinstance(error, NoCredentialsError) or self.on_ec2 is None or \
                os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
            return False
        if self._ec2 is None:
            self._ec2 = bool(self.on_ec2())
        return self._ec2

    def renew_client(self) -> None:
        """A fresh, patient client: botocore reads the credentials once, when it makes a client, and a client made
        without them never asks again."""
        self.client = self._new_client(patient=True)

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
        self._uploaded(self.key(name))

    def download_file(self, name: str, path: Path) -> None:
        self.client.download_file(self.bucket, self.key(name), str(path), Config=self.transfer)

    def exists(self, name: str) -> bool:
        """Asked by listing, which a prefix-scoped s3:ListBucket allows: AWS answers a HEAD of a missing key
        with 403, not 404, when the caller may not list the bucket without a prefix (docs/aws.md)."""
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
            raise UserError(f"{self.remote}/{name}: not valid JSON") from None

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
        self._uploaded(self.key(name))

    def manifest(self, rebuild: bool = False) -> tuple[dict | None, str | None]:
        """The remote checkpoints/latest.json and its ETag; UserError when it is not a manifest. With `rebuild`
        (a resume), when it is gone but checkpoints remain, a manifest rebuilt from their sidecars, no ETag."""
        data, etag = self.get_json(f"checkpoints/{MANIFEST}")
        if data is None:
            return (rebuilt_manifest(self) if rebuild else None), None
        check_manifest(data, f"{self.remote}/checkpoints/{MANIFEST}")
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

    def preflight(self, retry_s: float = 300.0, stop: threading.Event | None = None) -> None:
        """Write, check and delete a small probe object, so that a wrong bucket or a missing permission fails
        now, before any training, instead of at the first checkpoint; then abort the multipart uploads an
        earlier process recorded and left unfinished. A bucket's root is refused: a run needs a prefix of its own.
        Errors that may pass are retried for `retry_s` seconds, with backoff (on top of boto3's own retries), then
        raise RemoteUnavailable; the others raise RemoteRefused at once.

        The wait is said at the first failed attempt (boto3's own, through its needs-retry event), then every 30 s,
        then its outcome. `stop` set (a signal, Ctrl-C) ends it early, unverified: the caller stops its set-up."""
        if not self.prefix:  # the run's files would mix with the whole bucket's
            raise RemoteRefused(f"{self.remote}: a run needs a prefix of its own, s3://{self.bucket}/NAME; at the "
                                "bucket's root its files would mix with every other object in the bucket")
        deadline, delay = time.monotonic() + retry_s, 1.0
        waiting = Waiting()
        endpoint = self.client.meta.endpoint_url

        def say(error, pending=False) -> None:
            what = "the instance role's credentials are not there yet" if pending else "the store is not answering"
            waiting.note(f"{self.remote}: {what} at {endpoint} ({error}); retrying for up to {retry_s:.0f} s "
                         "(checkpoint.startup_retry_s); Ctrl-C to stop", f"{self.remote}: still retrying: {error}")

        def on_retry(caught_exception=None, response=None, **kwargs):
            status = (response[1] if response else {}).get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if caught_exception is not None and is_transient(caught_exception) or status >= 500:
                say(caught_exception or f"HTTP {status}")  # returns None: botocore's own handler decides
        self.client.meta.events.register("needs-retry.s3", on_retry)
        try:
            while True:
                try:
                    self._probe()
                    break
                except Exception as e:
                    pending = self.credentials_pending(e)
                    if not is_transient(e, on_ec2=pending):
                        raise self._explain(e) from None
                    if time.monotonic() + delay > deadline:
                        raise RemoteUnavailable(f"{self.remote}: the store kept failing for {retry_s:.0f} s ({e}); "
                                                "exiting 75 so that a restart tries again") from None
                    say(e, pending)
                    if stop is None:
                        time.sleep(delay)
                    elif stop.wait(delay):
                        return  # asked to stop: the caller ends its set-up
                    if pending:
                        self.renew_client()
                        self.client.meta.events.register("needs-retry.s3", on_retry)
                    delay = min(delay * 2, 30.0)
        finally:
            self.client.meta.events.unregister("needs-retry.s3", on_retry)
        waiting.end(f"{self.remote}: the store answers")
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

    def _explain(self, error: Exception) -> RemoteRefused:
        """The permanent start-up errors, in one line each."""
        from botocore.exceptions import ClientError, NoCredentialsError

        if isinstance(error, NoCredentialsError):
            return RemoteRefused(f"{self.remote}: no AWS credentials found (boto3 looks in the environment, "
                                 "~/.aws and the instance role)")
        if not isinstance(error, ClientError):
            return RemoteRefused(f"{self.remote}: cannot reach the store ({error})")
        code = error.response["Error"]["Code"]
        if code == "NoSuchBucket":
            return RemoteRefused(f"{self.remote}: bucket {self.bucket!r} does not exist; check checkpoint.remote "
                                 "or --remote")
        if code in ("AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return RemoteRefused(f"{self.remote}: not allowed to write there ({code}); the credentials need "
                                 "s3:PutObject, s3:GetObject, s3:DeleteObject and s3:ListBucket on this prefix")
        return RemoteRefused(f"{self.remote}: the store refused a test write ({code})")

    def abort_stale_uploads(self) -> int:
        """Abort the multipart uploads that an earlier process of this prefix recorded (MULTIPART) and never
        completed: a process killed mid-upload leaves its parts, which S3 bills until they are aborted. Only
        those, by their stored ids: never another tool's upload, nor one from before the records. Anything else
        is the bucket's lifecycle rule's (docs/aws.md)."""
        aborted = 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self.key(f"{MULTIPART}/"))
            records = [o["Key"] for page in pages for o in page.get("Contents", [])
                       if o["LastModified"] < self.created]  # not this process's own
            for record in records:
                body = self.client.get_object(Bucket=self.bucket, Key=record)["Body"].read()
                upload = json.loads(body) if body.startswith(b"{") else {}
                if str(upload.get("key", "")).startswith(self.key("")) and upload.get("upload_id"):
                    aborted += self._abort(upload["key"], upload["upload_id"])
                self.client.delete_object(Bucket=self.bucket, Key=record)
        except self.client.exceptions.ClientError as e:
            log.warning("%s: could not abort stale multipart uploads (%s); the bucket's "
                        "AbortIncompleteMultipartUpload lifecycle rule removes them", self.remote,
                        e.response["Error"]["Code"])
            return aborted
        if aborted:
            log.info("%s: aborted %d multipart upload(s) left unfinished by an earlier process", self.remote, aborted)
        return aborted

    def _abort(self, key: str, upload_id: str) -> int:
        """1 when the upload was aborted now, 0 when it had completed or was aborted already."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except self.client.exceptions.ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchUpload", "404"):
                return 0
            raise
        return 1


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
    entries = sorted((e for e in found if e["lineage"]["run_id"] == lineage["run_id"]), key=save_order)
    log.warning("%s/checkpoints/%s is gone, but %d checkpoint(s) of lineage %s remain: resuming from the newest "
                "that verifies, not from step 0", store.remote, MANIFEST, len(entries), lineage["run_id"])
    checkpoints = [{k: e[k] for k in ("file", "step", "epoch", "sha256", "size", "run_id") if k in e}
                   for e in entries]
    return {**checkpoints[-1], "lineage": lineage, "run_id": lineage["run_id"], "best": None,
            "checkpoints": checkpoints, "lineages": []}
