"""Durable voter state for workspace leases: one small file per workspace.

Owns `<data_dir>/leases/<workspace>.state` (and the `.lock` file beside it).
Each file is one JSON object, a `Promise`:

    {"v": 1, "workspace": str, "promised": int, "promised_to": str | null,
     "accepted": int, "epoch": int, "leader": str | null, "lease_s": float}

- `promised`/`promised_to`: the highest ballot this voter promised, and to
  whom (one candidate per ballot, so two candidates that picked the same
  number cannot both collect a majority).
- `accepted`/`epoch`/`leader`: the ballot, epoch (the leadership's fencing
  token) and holder of the last lease this voter granted (leader None once
  released).
- `lease_s`: the voter-side lease length of that grant, a *duration*. No wall
  clock time is stored: clocks of peers and of a rebooted host are not
  comparable, so after a restart the voter cannot know how much of the lease
  is left and must treat a recorded lease as live for the full `lease_s`
  from the moment it loads the file (see `lease.Voter`).

Invariants:
- `save` is atomic and durable before it returns: write a temporary file in
  the same directory, fdatasync it, rename it over the old one, fsync the
  directory. Readers see the old record or the new one, never a mix. The
  voter calls it before sending any reply that depends on the new state.
- The promised ballot and the accepted epoch of a workspace never decrease on disk (`save` is only
  called by the voter with a state derived from the current one; it is not
  checked here).
- A record that cannot be read or parsed makes `load_all` raise
  `PromiseError`: a voter that forgot a promise could grant one epoch to two
  candidates, so it must not start. Leftover temporary files are removed.
- One process at a time: the store holds an exclusive `flock` on
  `leases/.lock` until `close` (or process death).

Pure blocking file I/O; the voter runs `save` in a worker thread.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from backend.local import fsync_dir

log = logging.getLogger("agentmount.peer")

FORMAT_VERSION = 1
SUFFIX = ".state"
# Same rule as agentmount.config.WORKSPACE_NAME_RE (not imported: the peer package stays
# independent of the config layer). Names start with an alphanumeric, so the
# dot-prefixed temporary and lock files never collide with a state file.
WORKSPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_EPOCH = (1 << 63) - 1


class PromiseError(RuntimeError):
    """The durable lease state cannot be loaded or is held by another process."""


def check_workspace(name: object) -> str:
    """Return `name` if it is a valid workspace name, else raise ValueError."""
    if not isinstance(name, str) or not WORKSPACE_RE.match(name):
        raise ValueError(f"invalid workspace name {name!r}")
    return name


@dataclass(frozen=True, slots=True)
class Promise:
    """A voter's durable state for one workspace (see the module docstring)."""
    workspace: str
    promised: int = 0
    promised_to: str | None = None
    accepted: int = 0
    epoch: int = 0
    leader: str | None = None
    lease_s: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps({"v": FORMAT_VERSION, **asdict(self)}, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Promise":
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise PromiseError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or obj.get("v") != FORMAT_VERSION:
            raise PromiseError(f"{where}: not a version {FORMAT_VERSION} lease record")
        want = {"v", "workspace", "promised", "promised_to", "accepted", "epoch", "leader", "lease_s"}
        if set(obj) != want:
            raise PromiseError(f"{where}: keys {sorted(obj)} != {sorted(want)}")

        def epoch(k: str) -> int:
            v = obj[k]
            if type(v) is not int or not 0 <= v <= MAX_EPOCH:
                raise PromiseError(f"{where}: {k} must be a ballot/epoch number, got {v!r}")
            return v

        def name(k: str) -> str | None:
            v = obj[k]
            if v is not None and (not isinstance(v, str) or not v):
                raise PromiseError(f"{where}: {k} must be a peer name or null, got {v!r}")
            return v

        lease_s = obj["lease_s"]
        if type(lease_s) not in (int, float) or not math.isfinite(lease_s) or lease_s < 0:
            raise PromiseError(f"{where}: lease_s must be a duration, got {lease_s!r}")
        ws = obj["workspace"]
        if not isinstance(ws, str) or not WORKSPACE_RE.match(ws):
            raise PromiseError(f"{where}: bad workspace {ws!r}")
        p = cls(ws, epoch("promised"), name("promised_to"), epoch("accepted"), epoch("epoch"), name("leader"),
                float(lease_s))
        if not p.epoch <= p.accepted <= p.promised:
            raise PromiseError(f"{where}: needs epoch <= accepted <= promised, got {p.epoch}, {p.accepted}, "
                               f"{p.promised}")
        return p


class PromiseStore:
    """The `leases/` directory of one peer's data dir. Opening it takes the lock."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(data_dir) / "leases"
        created = not self.dir.is_dir()
        self.dir.mkdir(parents=True, exist_ok=True)
        if created:
            fsync_dir(self.dir.parent)
        self._lock_fd: int | None = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise PromiseError(f"{self.dir} is in use by another process") from None

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def path(self, workspace: str) -> Path:
        return self.dir / (check_workspace(workspace) + SUFFIX)

    def load_all(self) -> dict[str, Promise]:
        """Every recorded workspace state; raises `PromiseError` on any unreadable record."""
        out: dict[str, Promise] = {}
        for entry in sorted(self.dir.iterdir()):
            n = entry.name
            if n.startswith(".") and n.endswith(".tmp"):
                log.info("event=lease_tmp_removed path=%s", entry)
                entry.unlink(missing_ok=True)
                continue
            if n.startswith(".") or not n.endswith(SUFFIX):
                continue
            try:
                data = entry.read_bytes()
            except OSError as e:
                raise PromiseError(f"{entry}: {e}") from None
            p = Promise.from_json(data, str(entry))
            if p.workspace + SUFFIX != n:
                raise PromiseError(f"{entry}: records workspace {p.workspace!r}")
            out[p.workspace] = p
        return out

    def save(self, promise: Promise) -> None:
        """Atomically and durably replace the record of `promise.workspace` (blocking)."""
        final = self.path(promise.workspace)
        tmp = self.dir / f".{promise.workspace}{SUFFIX}.tmp"
        data = promise.to_json()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        fsync_dir(self.dir)
