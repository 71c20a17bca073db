"""`RepairQueue`: the persistent list of writes and deletes each replica missed.

One append-only file per replica under `<data_dir>/repair/<store>.queue`,
lines `P <key>` (the replica lacks the object: copy it from another
replica), `D <key>` (delete it there) and `X <key>` (done: forget the key).
The newest line for a key wins. Appends are plain writes on the caller's
thread (a few microseconds; they survive a killed process, and `flush()`
fsyncs them); once the file holds many more lines than pending entries,
`compact()` (run from a worker thread) rewrites it atomically. A torn last
line (a crash mid-append) is ignored.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict

import trio

log = logging.getLogger("agentmount.repair")

PUT = "P"
DELETE = "D"
DONE = "X"
_COMPACT_LINES = 4096


class RepairQueue:
    """Pending repairs per replica name; see module docstring."""

    def __init__(self, root: str | None) -> None:
        self.root = root
        self._pending: dict[str, OrderedDict[str, str]] = {}
        self._fds: dict[str, int] = {}
        self._lines: dict[str, int] = {}
        self._recording: dict[str, list[str]] = {}   # lines appended while a compaction runs
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
        lines = data.split(b"\n")[:-1]   # the part after the last newline is a torn append
        for line in lines:
            op, _, key = line.decode("utf-8", "replace").partition(" ")
            if not key:
                continue
            q.pop(key, None)
            if op in (PUT, DELETE):
                q[key] = op
        self._lines[store] = len(lines)

    def add(self, store: str, key: str, op: str) -> None:
        q = self._pending.setdefault(store, OrderedDict())
        q.pop(key, None)
        q[key] = op
        self._append(store, key, op)

    def _append(self, store: str, key: str, op: str) -> None:
        if self.root:
            self._lines[store] = self._lines.get(store, 0) + 1
            fd = self._fds.get(store)
            if fd is None:
                fd = self._fds[store] = os.open(self._path(store), os.O_WRONLY | os.O_CREAT | os.O_APPEND
                                                | os.O_CLOEXEC, 0o600)
            line = f"{op} {key}\n"
            rec = self._recording.get(store)
            if rec is not None:
                rec.append(line)
            try:
                os.write(fd, line.encode())
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
            self._append(store, key, DONE)

    def needs_compaction(self, store: str) -> bool:
        return self._lines.get(store, 0) > max(_COMPACT_LINES, 4 * self.length(store))

    def length(self, store: str) -> int:
        return len(self._pending.get(store) or ())

    async def compact(self, store: str) -> None:
        """Replace the file with the entries still pending. The snapshot is written and synced
        in a worker thread; lines appended meanwhile are recorded and added to the new file on
        this thread just before it replaces the old one, so none is lost."""
        if not self.root or store in self._recording:
            return
        q = OrderedDict(self._pending.get(store) or ())
        path = self._path(store)
        tmp = path + ".tmp"
        self._recording[store] = []

        def write() -> None:
            with open(tmp, "wb") as f:
                f.write("".join(f"{op} {key}\n" for key, op in q.items()).encode())
                f.flush()
                os.fdatasync(f.fileno())

        try:
            await trio.to_thread.run_sync(write)
            extra = self._recording[store]
            if extra:
                with open(tmp, "ab") as f:
                    f.write("".join(extra).encode())
            old = self._fds.pop(store, None)
            os.rename(tmp, path)
            self._lines[store] = len(q) + len(extra)
            if old is not None:
                os.close(old)
        except OSError as e:
            log.error("repair queue %s: cannot compact: %s", store, e.strerror)
        finally:
            del self._recording[store]

    def flush(self) -> None:
        for store, fd in list(self._fds.items()):
            try:
                os.fdatasync(fd)
            except OSError as e:
                log.error("repair queue %s: cannot sync: %s", store, e.strerror)

    def close(self) -> None:
        for store, fd in self._fds.items():
            if not self.length(store):
                try:
                    os.ftruncate(fd, 0)   # nothing pending: start the next run with an empty file
                    self._lines[store] = 0
                except OSError:
                    pass
        self.flush()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
