"""Plain helpers shared by more than one test file: import them from here (`from helpers import ...`), never from
another test file or from conftest.py, which holds the fixtures only. tests/test_helpers_layout.py checks this."""
import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import numpy as np
import pytest
import torch
from PIL import Image

from resnet50_recipe.store.checkpoints import load_state, read_manifest

# ---------------------------------------------------------------------------------------------------------
# Recipes and ports


def tiny_overlay(data_dir, **extra) -> list[str]:
    """Shrinks any recipe to a 2-step, 32 px run on generated data: what the recipe tests train."""
    overrides = {
        "data.path": str(data_dir), "data.synthetic": "null", "data.workers": 0,
        "train.epochs": 1, "train.steps_per_epoch": 2, "train.batch_size": 4, "train.accum_steps": 1,
        "augment.train_size": 32, "augment.progressive": "null", "augment.eval_size": 32, "log.every_steps": 1,
        "train.device": "cpu",
    }
    overrides.update(extra)
    return [f"{k}={v}" for k, v in overrides.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remote_args(bucket, endpoint, run):
    return {"checkpoint.remote": f"s3://{bucket}/runs/{run}", "checkpoint.endpoint_url": endpoint}


# ---------------------------------------------------------------------------------------------------------
# Exact resume across real processes (test_resume, test_storage, test_lifecycle, test_ddp)

TIMING = {"img_per_s", "data_wait", "epoch_time_s", "peak_gpu_mem_gb"}


def overlay(data, **extra):
    """The smoke recipe, deterministic on CPU, 3 epochs of 24 steps, exercising every RNG stream."""
    settings = {
        "data.path": data, "data.synthetic": "null", "data.workers": 1, "train.device": "cpu",
        "train.deterministic": "true", "train.epochs": 3, "train.batch_size": 8, "augment.train_size": 32,
        "augment.eval_size": 32, "log.every_steps": 5, "checkpoint.every_epochs": 1, "checkpoint.keep_last": 2,
        "mixup.mixup_alpha": 0.2, "mixup.cutmix_alpha": 1.0, "augment.re_prob": 0.25, "model.drop_path": 0.1,
        "checkpoint.spot_notice": "off",
    }
    settings.update(extra)
    args = []
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args


def start(out, args, **popen):
    command = [sys.executable, "-m", "resnet50_recipe", "train", "smoke", "--output", str(out)] + args
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def last_step(out) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return -1
    steps = [json.loads(line)["global_step"] for line in lines if line.endswith("}")]
    return steps[-1] if steps else -1


def final_state(out) -> dict:
    folder = out / "checkpoints"
    return load_state(folder / read_manifest(folder)["file"])


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records if r.get("kind") != "start"]


def assert_same_tree(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ---------------------------------------------------------------------------------------------------------
# DDP through torchrun (test_ddp, test_lifecycle)

GLOBAL_BATCH = 8


def output_of(process, timeout):
    """The run's output; a run that hangs is killed, with its processes, and fails the test."""
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"still running after {timeout} s:\n{process.communicate()[0][-4000:]}")


def args_for(data, out, processes, **extra):
    """A norm-per-sample model (ConvNeXt's LayerNorm), so 2 x 4 images per step is the same math as 1 x 8."""
    settings = {"model.name": "test_convnext", "model.drop_path": 0.0, "data.path": data, "data.synthetic": "null",
                "data.workers": 0, "train.device": "cpu", "train.deterministic": "true", "train.epochs": 2,
                "train.steps_per_epoch": 10, "train.batch_size": GLOBAL_BATCH // processes,
                "augment.train_size": 32, "augment.eval_size": 32, "log.every_steps": 1,
                "checkpoint.every_epochs": 1, "checkpoint.spot_notice": "off", "train.stop_sync_every": 1,
                "export.enabled": "false"}
    settings.update(extra)
    command = ["train", "smoke", "--output", str(out)]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    return command


def worker_pids(root: int) -> dict[int, int]:
    """rank -> pid of the training workers below `root` (the CLI, then torchrun, then the workers)."""
    found, stack = {}, [root]
    while stack:
        pid = stack.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            stack.append(child)
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank and b"LOCAL_RANK=" in b"\0".join(env):
                found[int(rank[0][5:])] = child
    return found


# ---------------------------------------------------------------------------------------------------------
# The EC2 instance metadata service (test_resume, test_aws)


class FakeCost:
    """A cost source in place of budget.py's InstanceCost (monkeypatched into trainer/run.py): $0.10 more at every
    metrics line, at a known price, from $0 in every process. A budget then acts at the same epochs in every run,
    whatever the machine's speed."""
    price = 0.5

    def __init__(self, watcher, metrics_path, machines=1):
        self.cost = self.cost_at_epoch_start = 0.0

    def __call__(self) -> dict:
        self.cost += 0.10
        return {"price_usd_per_h": self.price, "cost_usd": self.cost}


class MetadataStandIn(BaseHTTPRequestHandler):
    """IMDSv2 as amazon-ec2-metadata-mock serves it: a token first, then 404 until a notice is posted.

    A subclass may also answer the instance's identity (`identity`: meta-data path -> text) and an instance
    role's credentials (`role`), as botocore reads them: the role's name at iam/security-credentials/, then its
    keys at iam/security-credentials/<role>. The first `stalls` credential requests hang `stall_s` seconds
    first, past botocore's default one-second metadata timeout, as a busy metadata service does."""
    token = "AQAEAtest-token=="
    notice: dict | None = None
    rebalance: dict | None = None
    identity: dict = {}
    role: str | None = None
    stalls = 0
    stall_s = 2.5
    requests: list = []

    def do_PUT(self):
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self._send(200, self.token)
        else:
            self._send(400, "missing X-aws-ec2-metadata-token-ttl-seconds")

    def do_GET(self):
        cls = type(self)
        cls.requests.append(self.path)
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            return self._send(401, "")
        path = self.path.removeprefix("/latest/meta-data/")
        if path.startswith("iam/security-credentials/") and cls.role is not None:
            return self._credentials(path.removeprefix("iam/security-credentials/"))
        if path in cls.identity:
            return self._send(200, cls.identity[path])
        body = {"spot/instance-action": cls.notice, "events/recommendations/rebalance": cls.rebalance}.get(path)
        self._send(200, json.dumps(body)) if body else self._send(404, "Not Found")

    def _credentials(self, name: str):
        cls = type(self)
        if cls.stalls > 0:
            cls.stalls -= 1
            time.sleep(cls.stall_s)
        if not name:
            return self._send(200, cls.role)
        if name != cls.role:
            return self._send(404, "Not Found")
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 6 * 3600))
        self._send(200, json.dumps({"Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": "ASIAROLE",
                                    "SecretAccessKey": "role-secret", "Token": "role-token", "Expiration": expires,
                                    "LastUpdated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))

    def _send(self, code, body):
        try:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())
        except OSError:  # the client gave up waiting (a stalled request): nothing to answer
            pass

    def log_message(self, *args):
        pass


# ---------------------------------------------------------------------------------------------------------
# The Hugging Face Hub's write API (test_hub, and end-to-end runs that push through HF_ENDPOINT)


class HubStandIn(BaseHTTPRequestHandler):
    """The Hub's write API, answered as the Hub does, for what huggingface_hub 2.x sends in create_repo(exist_ok=True),
    create_branch and upload_folder (with or without create_pr), repo_info and update_repo_settings too. Each repo's
    visibility is remembered (`private`, repo id -> bool): set at create_repo (public unless asked), answered by
    repo_info, changed by update_repo_settings; as on the Hub, create_repo of an existing repo changes nothing.
    A model repo's main branch is the
    folder root/OWNER/NAME, any other revision root/OWNER/NAME@REVISION (URL-quoted: me/x@refs%2Fpr%2F1). Every
    preupload is answered "regular", so each file comes inline, base64, in the commit: no LFS, no Xet. Any
    "Bearer hf_..." token is accepted; `refuse` (a status) answers every request with it; `delay_s` holds every
    commit that long first, as a large upload over a slow link does; `requests` records (method, path,
    Authorization, JSON body or None). start_hub gives each server a subclass, so these are its own."""

    protocol_version = "HTTP/1.1"
    root: Path
    refuse: int | None = None
    delay_s: float = 0.0
    requests: list = []
    private: dict = {}
    lock = threading.Lock()
    ROUTE = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+?)"
                       r"(?:/(?P<action>revision|branch|preupload|commit|discussions|settings)(?:/(?P<arg>[^/]+))?)?")

    def do_GET(self):
        self.answer()

    def do_POST(self):
        self.answer()

    def do_PUT(self):
        self.answer()

    def answer(self):
        url, body = urlsplit(self.path), self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = url.path
        payload = json.loads(body) if self.headers.get("Content-Type", "").startswith("application/json") else None
        auth, route = self.headers.get("Authorization"), self.ROUTE.fullmatch(path)
        if path == "/api/agent-harnesses":  # huggingface_hub's best-effort user-agent registry: none here
            return self.error(404, "Not Found")
        type(self).requests.append((self.command, path, auth, payload))
        if self.refuse or not (auth or "").startswith("Bearer hf_"):
            return self.error(self.refuse or 401, "Invalid credentials in Authorization header")
        if route and route["action"] == "commit":
            time.sleep(self.delay_s)  # outside the lock: a later push is not queued behind a held one
        with self.lock:
            if (self.command, path) == ("POST", "/api/repos/create"):
                return self.create_repo(payload)
            if (self.command, path) == ("POST", "/api/validate-yaml"):
                return self.send(200, {"errors": [], "warnings": []})
            if not route:
                return self.error(404, "Not Found")
            repo, action, arg = route["repo"], route["action"], unquote(route["arg"] or "main")
            if not self.folder(repo).is_dir():
                return self.error(404, "Repository not found", "RepoNotFound")
            if action == "branch":
                return self.create_branch(repo, arg)
            if action == "discussions":
                return self.pull_request(repo, None if self.command == "POST" else int(arg))
            if action == "settings" and self.command == "PUT":
                if "visibility" in payload:
                    type(self).private[repo] = payload["visibility"] == "private"
                return self.send(200, {})
            if not self.folder(repo, arg).is_dir():
                return self.error(404, f"Invalid rev id: {arg}", "RevisionNotFound")
            if action == "preupload":
                return self.send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                 for f in payload["files"]]})
            if action == "commit" and "create_pr=1" in url.query:  # without hf_xet: the commit opens the PR
                number = self.open_pull_request(repo)
                return self.commit(self.folder(repo, f"refs/pr/{number}"), repo, body,
                                   {"pullRequestUrl": f"http://{self.headers['Host']}/{repo}/discussions/{number}"})
            if action == "commit":
                return self.commit(self.folder(repo, arg), repo, body)
            files = sorted(p.relative_to(self.folder(repo, arg)).as_posix()
                           for p in self.folder(repo, arg).rglob("*") if p.is_file())
            self.send(200, {"id": repo, "modelId": repo, "sha": "0" * 40, "private": self.private.get(repo, False),
                            "siblings": [{"rfilename": f} for f in files]})

    def folder(self, repo: str, revision: str = "main") -> Path:
        return self.root / (repo if revision == "main" else f"{repo}@{quote(revision, safe='')}")

    def create_repo(self, payload: dict):
        if payload.get("type", "model") != "model" or not payload.get("organization"):
            return self.error(400, "the stand-in makes model repos named OWNER/NAME only")
        repo = f"{payload['organization']}/{payload['name']}"
        url = f"http://{self.headers['Host']}/{repo}"
        if self.folder(repo).is_dir():
            return self.error(409, "You already created this model repo", extra={"url": url})
        self.folder(repo).mkdir(parents=True)
        type(self).private[repo] = payload.get("visibility") == "private" or payload.get("private") is True
        self.send(200, {"url": url, "name": repo, "id": uuid.uuid4().hex[:24]})

    def create_branch(self, repo: str, branch: str):
        if self.folder(repo, branch).exists():
            return self.error(409, "Reference already exists")
        shutil.copytree(self.folder(repo), self.folder(repo, branch))
        self.send(200, {})

    def open_pull_request(self, repo: str) -> int:
        """Pull request N is the revision refs/pr/N, a copy of main."""
        number = 1 + len(list(self.root.glob(f"{repo}@refs%2Fpr%2F*")))
        shutil.copytree(self.folder(repo), self.folder(repo, f"refs/pr/{number}"))
        return number

    def pull_request(self, repo: str, number: int | None):
        """POST .../discussions opens a pull request (hf_xet's upload path); GET .../discussions/N describes it."""
        if number is None:
            return self.send(200, {"num": self.open_pull_request(repo), "pullRequest": True})
        self.send(200, {"num": number, "title": "", "status": "draft", "isPullRequest": True,
                        "createdAt": "2026-01-01T00:00:00.000Z", "repo": {"name": repo, "type": "model"},
                        "changes": {"base": "refs/heads/main"}, "filesWithConflicts": [], "events": []})

    def commit(self, folder: Path, repo: str, body: bytes, extra: dict | None = None):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return self.error(400, "the commit's first line must be its header")
        if any(line["key"] not in ("file", "deletedFile", "deletedFolder") for line in lines[1:]):
            return self.error(400, "the stand-in takes inline files and deletions only (it never asks for LFS)")
        folder = folder.resolve()
        for line in lines[1:]:
            target = (folder / line["value"]["path"]).resolve()
            if not target.is_relative_to(folder) or target == folder:
                return self.error(400, f"bad path {line['value']['path']!r}")
            if line["key"] == "file":
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(line["value"]["content"]))
            elif target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        oid = uuid.uuid4().hex + "0" * 8
        self.send(200, {"success": True, "commitOid": oid, "commitMessage": lines[0]["value"]["summary"],
                        "commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{oid}", "hookOutput": "",
                        **(extra or {})})

    def error(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
        self.send(status, {"error": message, **(extra or {})}, headers)

    def send(self, status: int, payload: dict, headers: dict | None = None):
        body = json.dumps(payload).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(body)),
                           **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def start_hub(root, refuse: int | None = None) -> tuple[ThreadingHTTPServer, str]:
    """A HubStandIn on 127.0.0.1, serving from a thread, with its own `requests` and `refuse`: (server, endpoint),
    the endpoint for HF_ENDPOINT (a subprocess) or huggingface_hub.constants.ENDPOINT (in process). The handler
    class is server.RequestHandlerClass; stop it with server.shutdown() and server.server_close()."""
    handler = type("HubStandIn", (HubStandIn,), {"root": Path(root), "refuse": refuse, "requests": [], "private": {}})
    Path(root).mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


# ---------------------------------------------------------------------------------------------------------
# Faults between a client and an HTTP server: a lost answer, a refused or hanging request, an error status
# (test_storage, test_aws; the journey harness)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of `target` (moto's server): each request is forwarded with http.client
    and its answer passed back, unless `fault(method, path, headers)` (path with its query) says otherwise:

      None           forward it, answer it
      "drop-answer"  forward it (the server applies it), then close the connection without answering: the
                     answer is lost on the way back
      "refuse"       reset the connection without forwarding it: the request never reached the server
      "hang"         hold the connection unanswered until `close()` (a server that accepts and never answers)
      an int         answer that HTTP status without forwarding it, with an S3-style XML error body

    `fault` may be replaced at any time; `requests` records (method, path, action) of every request. `endpoint`
    is the proxy's URL. Use it as a context manager, or call close()."""

    def __init__(self, target: str, fault=None):
        self.target, self.fault = urlsplit(target), fault
        self.requests: list[tuple[str, str, object]] = []
        self.released = threading.Event()  # lets the hanging requests go at close()
        handler = type("FaultProxyHandler", (_ProxyHandler,), {"proxy": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    proxy: FaultProxy

    def do_request(self):
        body = self._body()
        fault = self.proxy.fault
        action = fault(self.command, self.path, self.headers) if fault is not None else None
        self.proxy.requests.append((self.command, self.path, action))
        if action == "refuse":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            self.close_connection = True
            return
        if action == "hang":
            self.proxy.released.wait()
            self.close_connection = True
            return
        if isinstance(action, int):
            code = {500: "InternalError", 503: "SlowDown"}.get(action, f"Error{action}")
            error = f"<Error><Code>{code}</Code><Message>injected by FaultProxy</Message></Error>".encode()
            return self._answer(action, [("Content-Type", "application/xml")], error)
        status, headers, answer = self._forward(body)
        if action == "drop-answer":
            self.close_connection = True
            return
        self._answer(status, headers, answer)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_request

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return body
            body += self.rfile.read(size)
            self.rfile.readline()

    def _forward(self, body: bytes):
        import http.client

        target = self.proxy.target
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
        try:
            # The Host header goes on as the client signed it (SigV4 covers it).
            connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP | {"content-length"}:
                    connection.putheader(name, value)
            if body or self.headers.get("Content-Length") is not None or \
                    self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body or None)
            response = connection.getresponse()
            answer = response.read()
            headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            return response.status, headers, answer
        finally:
            connection.close()

    def _answer(self, status: int, headers, body: bytes) -> None:
        self.send_response_only(status)
        length = next((v for k, v in headers if k.lower() == "content-length"), None)
        for name, value in headers:
            if name.lower() != "content-length":
                self.send_header(name, value)
        # A HEAD's Content-Length is the object's size, and it has no body.
        self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, *args):
        pass


# ---------------------------------------------------------------------------------------------------------
# Generated archives (test_prepare, test_sources)


def jpeg_bytes(seed: int, size=(24, 20)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def tar_bytes(files: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            add_file(tar, name, data)
    return buf.getvalue()
