"""The AWS calls of the launcher: `Api` (boto3 clients, a dry run that records calls instead of making them),
error codes, tags, and `AwsError`."""

from __future__ import annotations

import json
import logging

__all__ = ["TAG_RUN", "TAG_REMOTE", "TAG_LAUNCHED", "SECRET", "AwsError", "Api", "error_code", "tag"]

TAG_RUN, TAG_REMOTE, TAG_LAUNCHED = "resnet50-recipe:run", "resnet50-recipe:remote", "resnet50-recipe:launched"


log = logging.getLogger(__name__)

# What the dry run shows in place of a secret (the Hub token), which it never reads.
SECRET = "<the Hugging Face token: HF_TOKEN or the huggingface_hub login, not shown>"


class AwsError(RuntimeError):
    """AWS said no, or would: quota exceeded, no capacity anywhere, a run that does not exist."""


def _boto3():
    try:
        import boto3
    except ImportError:
        raise AwsError("the aws commands need boto3: pip install 'resnet50-recipe[aws]'") from None
    return boto3


class Api:
    """One boto3 client per service, created on first use; in a dry run each call is printed and not made."""

    def __init__(self, region: str | None = None, dry_run: bool = False, out=print):
        from botocore.config import Config

        self.session = _boto3().session.Session(region_name=region)
        self.region = region or self.session.region_name or "us-east-1"
        self.dry_run, self.out = dry_run, out
        self.config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30)
        self.clients: dict = {}
        self.texts: list[tuple[str, str]] = []  # long arguments of a dry run's calls, printed at its end

    def client(self, service: str):
        if service not in self.clients:
            self.clients[service] = self.session.client(service, region_name=self.region, config=self.config)
        return self.clients[service]

    def __call__(self, service: str, operation: str, note: str | None = None, **params):
        if self.dry_run:
            self.out(f"{service}.{operation}({self.show(params)})" + (f"  # {note}" if note else ""))
            return None
        return getattr(self.client(service), operation)(**params)

    def show(self, params: dict) -> str:
        """Arguments as JSON; JSON-encoded documents decoded for reading, long texts listed after the calls."""
        shown = {}
        for key, value in params.items():
            if key == "Value" and value == SECRET:
                pass
            elif key in ("UserData", "Body") and (len(value) > 60 or "\n" in value):  # a short one is shown inline
                self.texts.append((key, value))
                value = f"<{key} {len(self.texts)}: {len(value.encode())} bytes, printed below>"
            elif isinstance(value, str) and value.startswith("{"):
                value = json.loads(value)
            shown[key] = value
        args = [f"{key}={json.dumps(value, default=str)}" for key, value in shown.items()]
        return ", ".join(args) if sum(map(len, args)) <= 90 else "\n    " + ",\n    ".join(args) + "\n"


def error_code(e: Exception) -> str | None:
    return getattr(e, "response", {}).get("Error", {}).get("Code")


def tag(resource: dict, key: str) -> str | None:
    return next((t["Value"] for t in resource.get("Tags", []) if t["Key"] == key), None)
