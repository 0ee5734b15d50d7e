"""One stop event, set by signals or by the EC2 spot interruption notice.

- SIGTERM, SIGINT and SIGUSR1 ask for a stop: the loop finishes its step, checkpoints and exits 75. Only a
  second SIGINT exits at once, whatever asked for the stop first: a Ctrl-C after a spot notice is the first
  Ctrl-C, a request to stop that is already under way.
- On EC2 a thread polls the instance metadata service (IMDSv2) every few seconds. AWS announces a spot
  interruption there two minutes ahead, while the OS only gets SIGTERM at the end of those two minutes. A
  rebalance recommendation (an earlier, softer warning) asks for an extra checkpoint instead of a stop.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request

from resnet50_recipe.errors import EXIT_INTERRUPTED

__all__ = ["IMDS_ENDPOINT", "StopControl", "install_signal_handlers", "restore_signal_handlers", "SpotWatcher",
           "on_ec2", "metadata_endpoint", "start_spot_watcher"]

log = logging.getLogger(__name__)

IMDS_ENDPOINT = "http://169.254.169.254"


class StopControl:
    """The stop event plus why it was set, and a separate request for an extra checkpoint.

    A stop's deadline is fixed once, when the stop is asked for: `timeout_s` (checkpoint.stop_timeout_s) from
    then, or a spot notice's time when that is earlier. Everything the stop does (the checkpoint's drain, the
    final sync, the exit) shares it, so that the whole stop ends inside systemd's TimeoutStopSec and torchrun's
    grace period; a deadline computed afresh at each wait would add the waits up."""

    def __init__(self, timeout_s: float = 100.0):
        self.stop = threading.Event()
        self.checkpoint_now = threading.Event()
        self.timeout_s = timeout_s  # seconds a stop may take from the moment it is asked for
        self.reason: str | None = None
        self.deadline: float | None = None  # epoch seconds by which the stop must be complete, once asked for
        self.interrupts = 0  # SIGINTs received: the second one exits at once

    def request_stop(self, reason: str, deadline: float | None = None) -> None:
        if not self.stop.is_set():
            own = time.time() + self.timeout_s
            self.reason, self.deadline = reason, own if deadline is None else min(deadline, own)
            log.warning("stop requested: %s", reason)
        elif deadline is not None and (self.deadline is None or deadline < self.deadline):
            self.deadline = deadline  # a spot notice after a signal: the earlier deadline is the one that holds
        self.stop.set()

    def stop_deadline(self) -> float:
        """Epoch seconds by which the stop must be complete: the one deadline fixed when it was asked for (a
        caller that asks before any stop gets `timeout_s` from now; a stop set on the event alone gets its
        deadline fixed at the first ask)."""
        if self.deadline is None and self.stop.is_set():
            self.deadline = time.time() + self.timeout_s
        return self.deadline if self.deadline is not None else time.time() + self.timeout_s


def install_signal_handlers(control: StopControl) -> dict:
    """Route SIGTERM, SIGINT and SIGUSR1 to the stop event; return the previous handlers for restoring."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # signal handlers can only be set from the main thread (e.g. not under some notebooks)

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            control.interrupts += 1
            if control.interrupts > 1:
                os._exit(EXIT_INTERRUPTED)  # the second Ctrl-C: the user wants out now, checkpoint or not
            if control.stop.is_set():
                log.warning("SIGINT received: already stopping (%s); press Ctrl-C again to exit at once, "
                            "without waiting for the checkpoint", control.reason)
        control.request_stop(f"{name} received")

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        previous[sig] = signal.signal(sig, on_signal)
    return previous


def restore_signal_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class SpotWatcher(threading.Thread):
    """Polls IMDSv2 for `spot/instance-action` and `events/recommendations/rebalance`.

    404 means "no notice". A token is fetched with `PUT /latest/api/token` and refreshed before it expires.
    """

    TOKEN_TTL_S = 21600

    def __init__(self, control: StopControl, endpoint: str = IMDS_ENDPOINT, interval_s: float = 5.0):
        super().__init__(name="spot-watcher", daemon=True)
        self.control, self.endpoint, self.interval_s = control, endpoint.rstrip("/"), interval_s
        self._token: str | None = None
        self._token_expires = 0.0
        self._halt = threading.Event()
        self.seen_rebalance: str | None = None

    def token(self, timeout: float = 2.0) -> str:
        if self._token is None or time.time() > self._token_expires - 60:
            request = urllib.request.Request(f"{self.endpoint}/latest/api/token", method="PUT",
                                             headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL_S)})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                self._token = response.read().decode()
            self._token_expires = time.time() + self.TOKEN_TTL_S
        return self._token

    def get(self, path: str) -> str | None:
        """The body at a metadata path, or None for 404 (no notice)."""
        request = urllib.request.Request(f"{self.endpoint}/latest/meta-data/{path}",
                                         headers={"X-aws-ec2-metadata-token": self.token()})
        try:
            with urllib.request.urlopen(request, timeout=2.0) as response:
                return response.read().decode()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            if e.code == 401:
                self._token = None  # expired or revoked: fetch a new one next time
            raise

    def poll_once(self) -> None:
        action = self.get("spot/instance-action")
        if action is not None:
            notice = json.loads(action)
            deadline = _parse_time(notice.get("time"))
            left = f", {deadline - time.time():.0f} s before the deadline" if deadline else ""
            self.control.request_stop(f"EC2 spot interruption notice ({notice.get('action')} at "
                                      f"{notice.get('time')}){left}", deadline)
            return
        rebalance = self.get("events/recommendations/rebalance")
        if rebalance is not None and rebalance != self.seen_rebalance:
            self.seen_rebalance = rebalance
            log.warning("EC2 rebalance recommendation %s: writing an extra checkpoint", rebalance.strip())
            self.control.checkpoint_now.set()

    def run(self) -> None:
        while not self._halt.is_set() and not self.control.stop.is_set():
            try:
                self.poll_once()
            except (OSError, ValueError) as e:  # a transient metadata hiccup must not end training
                log.debug("spot watcher: %s", e)
            self._halt.wait(self.interval_s)

    def halt(self) -> None:
        self._halt.set()


def on_ec2(endpoint: str = IMDS_ENDPOINT) -> bool:
    """True when an IMDSv2 endpoint answers a token request within a second: we are on EC2.

    Where the firmware tables say plainly that this is not an EC2 machine (a laptop, another cloud), the
    network probe is skipped, so that it cannot cost a second on networks that drop link-local packets.
    """
    if endpoint == IMDS_ENDPOINT and _firmware_says_not_ec2():
        return False
    try:
        SpotWatcher(StopControl(), endpoint).token(timeout=1.0)
        return True
    except (OSError, ValueError):
        return False


def _firmware_says_not_ec2() -> bool:
    hints = []
    for path in ("/sys/class/dmi/id/sys_vendor", "/sys/class/dmi/id/board_asset_tag", "/sys/hypervisor/uuid"):
        try:
            with open(path) as f:
                hints.append(f.read().strip().lower())
        except OSError:
            pass
    # Nitro instances report "Amazon EC2" as the vendor and the instance id as asset tag; Xen ones a uuid "ec2...".
    return bool(hints) and not any("amazon" in h or h.startswith(("ec2", "i-")) for h in hints)


def start_spot_watcher(control: StopControl, mode: str, endpoint: str | None, interval_s: float) -> SpotWatcher | None:
    """`mode`: auto (watch when on EC2), on, off. The endpoint defaults to botocore's override variable or the
    link-local IMDS address."""
    if mode == "off":
        return None
    endpoint = metadata_endpoint(endpoint)
    if mode == "auto" and not on_ec2(endpoint):
        return None
    watcher = SpotWatcher(control, endpoint, interval_s)
    watcher.start()
    log.info("watching %s for EC2 spot interruption notices every %.1f s", endpoint, interval_s)
    return watcher


def metadata_endpoint(endpoint: str | None = None) -> str:
    """The metadata service's address: the recipe's (checkpoint.imds_endpoint), botocore's override variable, or
    the link-local IMDS address."""
    return endpoint or os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or IMDS_ENDPOINT


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    from datetime import datetime
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
