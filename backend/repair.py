"""`RepairQueue`: the persistent list of writes and deletes each replica missed.

One append-only file per replica under `<data_dir>/repair/<store>.queue`,
lines `P <key>` (the replica lacks the object: copy it from another
replica) and `D <key>` (delete it there). The newest line for a key wins.
Appends are plain writes (they survive a killed process; `flush()` fsyncs
them); the file is rewritten atomically once entries have been drained.
A torn last line (a crash mid-append) is ignored.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict

log = logging.getLogger("agentmount.repair")

PUT = "P"
DELETE = "D"


class RepairQueue:
    """Pending repairs per replica name; see module docstring."""

    def __init__(self, root: str | None) -> None:
        self.root = root
        self._pending: dict[str, OrderedDict[str, str]] = {}
        self._fds: dict[str, int] = {}
        self._done_since_rewrite: dict[str, int] = {}
        if root:
            os.makedirs(root, exist_ok=True)

    def _path(self, store: str) -> str:
        assert self.root
        return os.path.join(self.root, f"{store}.queue")

    def load(self, store: str) -> None:
        """Read what a previous run left for `store`."""
        q = self._pending.setdefault(store, OrderedDict())
        if not self.root:
            return
        try:
            with open(self._path(store), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        for line in data.split(b"\n")[:-1]:   # the part after the last newline is a torn append
            op, _, key = line.decode("utf-8", "replace").partition(" ")
            if op in (PUT, DELETE) and key:
                q.pop(key, None)
                q[key] = op

    def add(self, store: str, key: str, op: str) -> None:
        q = self._pending.setdefault(store, OrderedDict())
        q.pop(key, None)
        q[key] = op
        if self.root:
            fd = self._fds.get(store)
            if fd is None:
                fd = self._fds[store] = os.open(self._path(store), os.O_WRONLY | os.O_CREAT | os.O_APPEND
                                                | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, f"{op} {key}\n".encode())
            except OSError as e:
                log.error("repair queue %s: cannot record %s %s: %s", store, op, key, e.strerror)

    def peek(self, store: str, n: int) -> list[tuple[str, str]]:
        q = self._pending.get(store)
        if not q:
            return []
        out = []
        for key, op in q.items():
            out.append((key, op))
            if len(out) >= n:
                break
        return out

    def done(self, store: str, key: str, op: str) -> None:
        """Drop an entry once carried out (unless a newer one replaced it meanwhile)."""
        q = self._pending.get(store)
        if q is not None and q.get(key) == op:
            del q[key]
            self._done_since_rewrite[store] = self._done_since_rewrite.get(store, 0) + 1
            if not q or self._done_since_rewrite[store] >= 1000:
                self.rewrite(store)

    def length(self, store: str) -> int:
        return len(self._pending.get(store) or ())

    def rewrite(self, store: str) -> None:
        """Replace the file with the entries still pending."""
        self._done_since_rewrite[store] = 0
        if not self.root:
            return
        q = self._pending.get(store) or OrderedDict()
        path = self._path(store)
        tmp = path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write("".join(f"{op} {key}\n" for key, op in q.items()).encode())
                f.flush()
                os.fdatasync(f.fileno())
            old = self._fds.pop(store, None)
            if old is not None:
                os.close(old)
            os.rename(tmp, path)
        except OSError as e:
            log.error("repair queue %s: cannot rewrite: %s", store, e.strerror)

    def flush(self) -> None:
        for store, fd in self._fds.items():
            try:
                os.fdatasync(fd)
            except OSError as e:
                log.error("repair queue %s: cannot sync: %s", store, e.strerror)

    def close(self) -> None:
        self.flush()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
