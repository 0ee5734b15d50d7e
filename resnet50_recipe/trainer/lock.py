"""The run-directory lock: one trainer per run directory, held with `flock` on `<run>/.lock`, naming its holder in
a refusal; a dead holder's lock is taken over, and forked children (loader workers) do not keep it."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from resnet50_recipe.errors import UserError

__all__ = ["RunLocked", "RunLock"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# 2. Opening the run


class RunLocked(UserError, FileExistsError):
    """Another live trainer holds the run directory: bad input (the run directory the user named is in use)."""


# Descriptors of the run locks this process holds. A forked child (a DataLoader worker) would share the lock
# through its copy of the descriptor and keep it alive after the trainer itself was killed, so that the restart
# found the run "in use" until the orphaned workers noticed: each child closes its copies at once. Closing a
# copy never releases the parent's lock; only LOCK_UN or the last copy's close does.
_held_lock_fds: set[int] = set()


def _close_lock_fds_in_child() -> None:
    for fd in _held_lock_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_lock_fds.clear()

os.register_at_fork(after_in_child=_close_lock_fds_in_child)


class RunLock:
    """An OS lock (flock) on `<run dir>/.lock`, held for the whole run by the process that writes the directory.

    The kernel drops the lock when its holder dies, however it dies (forked children keep no copy of it), so a
    lock file left by a killed process is stale and simply taken over. The file names its holder (pid, host,
    start time) for the refusal message, and it is removed on release, so a refused or failed start leaves the
    directory's files as they were.
    """

    def __init__(self, out: Path):
        self.path = out / ".lock"
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunLocked(f"{self.path.parent}: another trainer is using this run directory (pid "
                                f"{holder.get('pid', '?')} on host {holder.get('host', '?')}, since "
                                f"{holder.get('since', '?')}); wait for it, stop it, or pass --output DIR for a "
                                "separate run") from None
            try:  # a holder that released between our open and our flock has unlinked the file: start again
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        stale = _holder(fd)
        if stale:
            log.warning("taking over the lock of %s: pid %s on host %s is no longer running there", self.path,
                        stale.get("pid"), stale.get("host"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self.fd = fd
        _held_lock_fds.add(fd)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        _held_lock_fds.discard(self.fd)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
