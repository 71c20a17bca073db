"""Test harness for multi-peer mounts: several real `agentmount mount` daemons over one shared store.

`PeerCluster(root, names=("a", "b", "c"), ...)` gives every peer its own Curve key pair, a free
127.0.0.1 port, a mountpoint, data and cache dirs and a mount.conf that lists the other peers
(`[[peer]]`) and one shared local store (`root/store`). Options: lease timings (`lease`; None
leaves `[lease]` out, i.e. the daemon's defaults), per-peer lease overrides, `[fs]` keys, extra
TOML per peer, who lists whom (`peers_of`) and an "intruder" peer whose key nobody lists.

Every peer is a `Peer` (a `tests.helpers.Mount`): `.mount()`, `.umount()`, `.kill()`, `.ws`,
`.cli(...)`, plus `.stop()`/`.cont()` (SIGSTOP/SIGCONT of the daemon), `.status()` and
`.ws_status(ws)`. The cluster answers `leader_of(ws)` and `wait_leader(ws, ...)` from the
peers' status JSON, never touches a stopped peer (its control socket and its mount would
block), and `cleanup()` continues stopped daemons first, then unmounts every peer with bounded
waits and falls back to SIGKILL plus a lazy detach: no mount is left behind, also when a test
fails. Everything blocking on a possibly sick mount goes through `within()` (a deadline) and
workloads are `FileWriter` threads that record which closes succeeded.

`clusters(tmp_path)` backs the `peer_cluster` fixture of tests/test_peers.py: a factory of
clusters under tmp_path, all cleaned up at the end of the test.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from agentmount import control
from agentmount.peer import keys
from agentmount.procs import pid_alive, wait_exit
from tests.helpers import Mount, cli, wait_for

WS = "default"
# Short leases keep the suite fast; tests that need the shipped behaviour pass lease=None.
SHORT_LEASE = {"duration_s": 2.0, "renew_s": 0.5, "failover_timeout_s": 20.0}
# The daemon's documented defaults; only used for the tests' own bounds when [lease] is left out.
DEFAULT_LEASE = {"duration_s": 5.0, "renew_s": 1.5, "failover_timeout_s": 30.0, "invalidate_timeout_s": 2.0}
MARGIN_S = 15.0   # slack on top of protocol bounds before we call something a hang (2 slow cores)


def report(text: str) -> None:
    print(f"\n[peers] {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (int, float)):
        return repr(v)
    raise TypeError(f"no TOML rendering for {v!r}")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mounted(path: Path) -> bool:
    """Is `path` a mount point in this mount namespace (also a dead FUSE mount, which
    os.path.ismount reports as not mounted because stat fails with ENOTCONN)?"""
    target = os.path.abspath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                mp = line.split()[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
                if mp == target:
                    return True
    except OSError:
        pass
    return False


def detach(path: Path) -> None:
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if not mounted(path):
            return
        try:
            subprocess.run(cmd, capture_output=True, timeout=30)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue


def proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return None


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05,
               describe: Callable[[], Any] | None = None) -> Any:
    """Poll `cond()` until truthy or the deadline passes; the AssertionError carries
    `describe()` (the state at the deadline)."""
    return wait_for(cond, timeout, interval, what, describe)


class Hung(AssertionError):
    pass


def within(timeout: float, fn: Callable, *args, what: str | None = None, **kw):
    """Run fn(*args, **kw) in a daemon thread; return its value or re-raise its exception.
    Raise `Hung` if it has not returned after `timeout` seconds (the thread is left blocked;
    the cluster's cleanup unblocks it by unmounting)."""
    box: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["v"] = fn(*args, **kw)
        except BaseException as e:  # noqa: BLE001
            box["e"] = e
        finally:
            done.set()

    threading.Thread(target=run, daemon=True, name=f"within:{what or getattr(fn, '__name__', fn)}").start()
    if not done.wait(timeout):
        raise Hung(f"{what or getattr(fn, '__name__', repr(fn))} did not return within {timeout:g}s")
    if "e" in box:
        raise box["e"]
    return box["v"]


def attempt(timeout: float, fn: Callable, *args, what: str | None = None, **kw) -> tuple[bool, Any, float]:
    """Like `within`, but an OSError is a result: (ok, value or OSError, seconds). Anything
    else (another exception type, or a hang) fails the test."""
    t0 = time.monotonic()
    try:
        v = within(timeout, fn, *args, what=what, **kw)
        return True, v, time.monotonic() - t0
    except OSError as e:
        return False, e, time.monotonic() - t0


def write_file(path: Path, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
    """open/write/close (each close is the commit point other peers must see)."""
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise
    os.close(fd)


# -- one peer ----------------------------------------------------------------------------------

@dataclass
class Identity:
    name: str
    port: int
    public: str
    secret: str
    listed: bool = True      # False: the intruder, whose key nobody lists

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"


class Peer(Mount):
    """One agentmount peer: a `Mount` with an identity, status queries and SIGSTOP/SIGCONT."""

    def __init__(self, cluster: "PeerCluster", ident: Identity, conf_text: str, lease: dict) -> None:
        root = cluster.root / ident.name
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(root, conf_text=conf_text)
        self.cluster = cluster
        self.ident = ident
        self.name = ident.name
        self.store = cluster.store
        self.lease = lease                 # effective lease settings (for the tests' bounds)
        self.stopped = False
        self.killed_at: float | None = None

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else ("up" if self.pid else "down")
        return f"<Peer {self.name} {state} pid={self.pid}>"

    @property
    def endpoint(self) -> str:
        return self.ident.endpoint

    @property
    def public(self) -> str:
        return self.ident.public

    @property
    def secret(self) -> str:
        return self.ident.secret

    @property
    def failover_s(self) -> float:
        return float(self.lease["failover_timeout_s"])

    @property
    def log(self) -> Path:
        return self.data / "agentmount.log"

    @property
    def live(self) -> bool:
        return self.pid is not None and not self.stopped

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # -- lifecycle ----------------------------------------------------------------------------

    def mount(self) -> "Peer":
        """`agentmount mount` (AssertionError with the log's tail if it fails)."""
        try:
            super().mount()
        except BaseException:
            self._adopt_daemon()    # whatever it left running, cleanup stops
            raise
        self.killed_at = None
        return self

    def mount_cmd(self, timeout: float = 60.0) -> tuple[subprocess.CompletedProcess | None, float]:
        """Run `agentmount mount` and return (result or None if it did not return within
        `timeout`, seconds). On success the daemon's pid is recorded (so cleanup unmounts it)."""
        t0 = time.monotonic()
        try:
            r = cli("mount", str(self.mp), "-c", str(self.conf), timeout=timeout)
        except subprocess.TimeoutExpired:
            self._adopt_daemon()
            return None, time.monotonic() - t0
        dt = time.monotonic() - t0
        if r.returncode == 0:
            self.pid = int(within(30, os.getxattr, self.mp, "user.agentmount.pid"))
        else:
            self._adopt_daemon()
        return r, dt

    def umount(self, timeout: float = 120.0) -> None:
        """Unmount (waiting for the daemon to finish) and check its log for tracebacks."""
        if self.pid is None:
            return
        if self.stopped:
            self.cont()
        r = cli("umount", str(self.mp), "--timeout", str(timeout), timeout=timeout + 30)
        if r.returncode != 0:
            raise AssertionError(f"umount of {self.name} failed: {r.stderr}\n{self.log_tail()}")
        self.pid = None
        self.check_log()

    def check_log(self) -> None:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        for bad in ("daemon failed", "Traceback"):
            if bad in text:
                i = text.index(bad)
                raise AssertionError(f"{self.name}'s log has {bad!r}:\n{text[max(0, i - 1500):i + 2500]}")

    def kill(self) -> float:
        """SIGKILL the daemon and lazily detach its mount; returns time.monotonic() of the kill."""
        assert self.pid is not None, f"{self.name} is not running"
        if self.stopped:
            os.kill(self.pid, signal.SIGCONT)   # a stopped process dies on SIGKILL too; keep state tidy
            self.stopped = False
        t = time.monotonic()
        super().kill()
        self.killed_at = t
        return t

    def stop(self) -> float:
        """SIGSTOP the daemon (and wait until it is stopped); returns time.monotonic() of the signal."""
        assert self.pid is not None and not self.stopped
        t = time.monotonic()
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped = True
        wait_until(lambda: proc_state(self.pid) in ("T", "t", None), 10, f"{self.name} to stop")
        return t

    def cont(self) -> float:
        assert self.pid is not None
        t = time.monotonic()
        os.kill(self.pid, signal.SIGCONT)
        wait_until(lambda: proc_state(self.pid) not in ("T", "t"), 10, f"{self.name} to continue")
        self.stopped = False
        return t

    def _adopt_daemon(self) -> None:
        """Find the daemon of this peer's config from its data dir's lock file (pid), e.g. after
        a mount command that timed out: cleanup must stop it too."""
        try:
            pid = int((self.data / "lock").read_text().strip() or 0)
        except (OSError, ValueError):
            return
        if pid and pid != os.getpid() and pid_alive(pid) and self._is_ours(pid):
            self.pid = pid

    def _is_ours(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return str(self.conf).encode() in f.read()
        except OSError:
            return False

    def cleanup(self, timeout: float = 60.0) -> None:
        """Never leaves the mount or the daemon behind; bounded in time; never raises."""
        if self.pid is None:
            self._adopt_daemon()
        pid = self.pid
        if pid is not None:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.stopped = False
            try:
                cli("umount", str(self.mp), "--timeout", str(timeout), timeout=timeout + 15)
            except subprocess.TimeoutExpired:
                pass
            if not wait_exit(pid, 0.5):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                wait_exit(pid, 30)
            self.pid = None
        detach(self.mp)

    # -- status -------------------------------------------------------------------------------

    def cli_status(self, timeout: float = 30.0) -> dict | None:
        """`agentmount status --json` (None when it fails or does not answer in time)."""
        if self.stopped:
            return None
        try:
            r = self.cli("status", "--json", timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def status(self, timeout: float = 10.0) -> dict | None:
        """The running daemon's status: straight from its control socket (fast) when that has
        the multi-peer fields, else through `agentmount status --json`. None when not running
        or stopped (a stopped daemon would block the caller)."""
        if not self.live:
            return None
        try:
            resp = control.request(str(self.data), {"cmd": "status"}, timeout=timeout)
        except (OSError, ValueError):   # no answer in time (or a torn one): no status
            return None
        if resp is None:                # no daemon serving on this data dir
            return None
        if resp.get("ok") and isinstance(resp.get("result"), dict):
            out = {"node": self.name, "running": True, **resp["result"]}
            wss = out.get("workspaces")
            if "peers" in out and isinstance(wss, dict) and all(
                    isinstance(w, dict) and "role" in w for w in wss.values()):
                return out
        st = self.cli_status(timeout=timeout + 20)
        return st if st and st.get("running") else None

    def ws_status(self, ws: str = WS) -> dict | None:
        st = self.status()
        wss = (st or {}).get("workspaces")
        if isinstance(wss, dict):
            return wss.get(ws)
        return None

    def role(self, ws: str = WS) -> str | None:
        return (self.ws_status(ws) or {}).get("role")


# -- workloads ---------------------------------------------------------------------------------

@dataclass
class Op:
    name: str
    t_start: float
    t_end: float
    error: BaseException | None = None
    size: int = 0
    phase: str = ""          # where it failed: open, write or close

    def __str__(self) -> str:
        what = "ok" if self.ok else f"{self.phase} failed: {self.error!r}"
        return f"{self.name} ({self.size} B) {what} after {self.seconds:.2f}s"

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def seconds(self) -> float:
        return self.t_end - self.t_start


class FileWriter(threading.Thread):
    """Creates, writes and closes files `<prefix>-NNNNN` in `directory` until stopped, recording
    every attempt (`ops`) and each file whose close() returned successfully with its hash
    (`done`: name -> (sha256, size)). Errors are recorded, not raised; after one it backs off
    a little. `current` is the attempt in progress (name, start, phase) for hang reports."""

    def __init__(self, directory: Path, prefix: str, *, seed: int = 0, max_runtime: float = 240.0,
                 sizes: tuple[int, int] = (1, 48 << 10), big_every: int = 8, big: int = 300 << 10) -> None:
        super().__init__(daemon=True, name=f"writer:{prefix}")
        self.directory = directory
        self.prefix = prefix
        self.rng = random.Random(seed)
        self.max_runtime = max_runtime
        self.sizes = sizes
        self.big_every = big_every
        self.big = big
        self.ops: list[Op] = []
        self.done: dict[str, tuple[str, int]] = {}
        self.current: tuple[str, float, str] | None = None
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        deadline = time.monotonic() + self.max_runtime
        i = 0
        while not self.stopping.is_set() and time.monotonic() < deadline:
            name = f"{self.prefix}-{i:05d}"
            size = self.big if self.big_every and i % self.big_every == self.big_every - 1 else \
                self.rng.randint(*self.sizes)
            data = self.rng.randbytes(size)
            i += 1
            t0 = time.monotonic()
            err: BaseException | None = None
            fd = None
            try:
                self.current = (name, t0, "open")
                fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self.current = (name, t0, "write")
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                self.current = (name, t0, "close")
                f, fd = fd, None
                os.close(f)
            except BaseException as e:  # noqa: BLE001 - recorded, judged by the test
                err = e
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            op = Op(name, t0, time.monotonic(), err, size, self.current[2] if err is not None else "")
            self.current = None
            with self.lock:
                self.ops.append(op)
                if err is None:
                    self.done[name] = (sha(data), size)
            if err is not None:
                self.stopping.wait(0.05)

    # -- queries (thread-safe snapshots) --
    def snapshot(self) -> list[Op]:
        with self.lock:
            return list(self.ops)

    def files(self) -> dict[str, tuple[str, int]]:
        with self.lock:
            return dict(self.done)

    def successes(self, started_after: float = float("-inf")) -> list[Op]:
        return [o for o in self.snapshot() if o.ok and o.t_start >= started_after]

    def failures(self) -> list[Op]:
        return [o for o in self.snapshot() if not o.ok]

    def first_success_after(self, t: float) -> Op | None:
        """The first successful attempt that *started* after `t` (by completion time)."""
        ok = self.successes(started_after=t)
        return min(ok, key=lambda o: o.t_end) if ok else None

    def stop(self) -> None:
        self.stopping.set()

    def finish(self, timeout: float) -> None:
        """Stop and join; AssertionError (naming the blocked call) if it is still blocked."""
        self.stop()
        self.join(timeout)
        if self.is_alive():
            cur = self.current
            since = f"{time.monotonic() - cur[1]:.1f}s in {cur[2]} of {cur[0]}" if cur else "?"
            raise Hung(f"writer {self.prefix} still blocked after {timeout:g}s ({since})")


def verify_files(directory: Path, expected: dict[str, tuple[str, int]], timeout: float = 120.0) -> list[str]:
    """Problems found reading every expected file (name -> (sha256, size)) in `directory`."""
    def check() -> list[str]:
        bad = []
        for name, (digest, size) in sorted(expected.items()):
            try:
                data = (directory / name).read_bytes()
            except OSError as e:
                bad.append(f"{name}: {e!r}")
                continue
            if len(data) != size or sha(data) != digest:
                bad.append(f"{name}: {len(data)} bytes, expected {size}"
                           + (" (same size, other bytes)" if len(data) == size else ""))
        return bad
    return within(timeout, check, what=f"reading {len(expected)} files in {directory}")


# -- the cluster -------------------------------------------------------------------------------

class PeerCluster:
    """N peers (`names`) over one shared local store under `root`, plus an optional intruder.

    - lease: `[lease]` keys for every peer (None: no `[lease]` table, the daemon's defaults);
      lease_overrides: {peer: {key: value}} on top of it.
    - fs: `[fs]` keys for every peer; extra: TOML text appended to every peer's config (str) or
      per peer ({name: str}).
    - peers_of: {peer: [names it lists]}; default: every other real peer.
    - stores: TOML text of the `[[store]]`s (and `[replication]`) every peer uses instead of the
      shared local store (e.g. SeaweedFS S3 servers).
    - intruder: True or a name: one more peer (not mounted by mount_all) that lists the real
      peers with their real keys while none of them lists it.
    """

    def __init__(self, root: Path, names: Iterable[str] = ("a", "b", "c"), *, lease: dict | None = SHORT_LEASE,
                 lease_overrides: dict[str, dict] | None = None, fs: dict | None = None,
                 extra: str | dict[str, str] = "", peers_of: dict[str, list[str]] | None = None,
                 intruder: bool | str = False, workspaces: Iterable[str] = (WS,),
                 cache: dict | None = None, stores: str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = self.root / "store"
        self.store.mkdir(exist_ok=True)
        self.names = list(names)
        assert len(set(self.names)) == len(self.names), "peer names must be unique"
        self.lease = dict(lease) if lease is not None else None
        self.lease_overrides = lease_overrides or {}
        self.fs = dict(fs or {})
        self.extra = extra
        self.workspaces = tuple(workspaces)
        self.cache = cache or {"size_mb": 256, "memory_mb": 64}
        self.stores = stores   # TOML of the [[store]]s (and [replication]) instead of the local store
        self.intruder_name = (intruder if isinstance(intruder, str) else "x") if intruder else None
        all_names = self.names + ([self.intruder_name] if self.intruder_name else [])
        ports: set[int] = set()
        self.idents: dict[str, Identity] = {}
        for n in all_names:
            port = free_port()
            while port in ports:
                port = free_port()
            ports.add(port)
            pub, sec = keys.generate()
            self.idents[n] = Identity(n, port, pub, sec, listed=(n != self.intruder_name))
        self.peers_of = {n: [m for m in self.names if m != n] for n in all_names}
        for n, lst in (peers_of or {}).items():
            assert n in self.idents and all(m in self.idents and m != n for m in lst), (n, lst)
            self.peers_of[n] = list(lst)
        self.peers: dict[str, Peer] = {}
        for n in all_names:
            self.peers[n] = Peer(self, self.idents[n], self.render(n), self.effective_lease(n))
        self._writers: list[FileWriter] = []
        self._cleaned = False
        atexit.register(self.cleanup)

    # -- configuration ------------------------------------------------------------------------

    def effective_lease(self, name: str) -> dict:
        own = {**(self.lease or {}), **self.lease_overrides.get(name, {})}
        return {**DEFAULT_LEASE, **own}

    def render(self, name: str) -> str:
        """mount.conf text of peer `name`."""
        me = self.idents[name]
        base = self.root / name
        lines = ["[node]", f"name = {toml_value(name)}", f"data_dir = {toml_value(str(base / 'data'))}",
                 f"listen = {toml_value(me.endpoint)}", f"public_key = {toml_value(me.public)}",
                 f"secret_key = {toml_value(me.secret)}", ""]
        for other in self.peers_of[name]:
            o = self.idents[other]
            lines += ["[[peer]]", f"name = {toml_value(o.name)}", f"endpoint = {toml_value(o.endpoint)}",
                      f"public_key = {toml_value(o.public)}", ""]
        lease = {**(self.lease or {}), **self.lease_overrides.get(name, {})}
        if lease:
            lines += ["[lease]"] + [f"{k} = {toml_value(v)}" for k, v in lease.items()] + [""]
        if self.stores is not None:
            lines += [self.stores.strip(), ""]
        else:
            lines += ["[[store]]", 'name = "shared"', 'kind = "local"', f"path = {toml_value(str(self.store))}", ""]
        lines += ["[cache]", f"dir = {toml_value(str(base / 'cache'))}"]
        lines += [f"{k} = {toml_value(v)}" for k, v in self.cache.items()] + [""]
        if self.fs:
            lines += ["[fs]"] + [f"{k} = {toml_value(v)}" for k, v in self.fs.items()] + [""]
        for w in self.workspaces:
            lines += ["[[workspace]]", f"name = {toml_value(w)}", ""]
        extra = self.extra.get(name, "") if isinstance(self.extra, dict) else self.extra
        text = "\n".join(lines) + ("\n" + extra.strip() + "\n" if extra and extra.strip() else "")
        tomllib.loads(text)   # the harness never hands out invalid TOML
        return text

    # -- access -------------------------------------------------------------------------------

    def peer(self, name: str) -> Peer:
        return self.peers[name]

    __getitem__ = peer

    @property
    def real(self) -> list[Peer]:
        return [self.peers[n] for n in self.names]

    @property
    def intruder(self) -> Peer | None:
        return self.peers[self.intruder_name] if self.intruder_name else None

    def live(self) -> list[Peer]:
        """Mounted, not stopped peers (real ones and a mounted intruder)."""
        return [p for p in self.peers.values() if p.live]

    def _among(self, among: Iterable[str | Peer] | None) -> list[Peer]:
        if among is None:
            return [p for p in self.real if p.live]
        return [self.peers[a] if isinstance(a, str) else a for a in among]

    # -- lifecycle ----------------------------------------------------------------------------

    def mount(self, name: str) -> Peer:
        return self.peers[name].mount()

    def mount_all(self, names: Iterable[str] | None = None) -> list[Peer]:
        """Mount the given peers (default: every real one) one after the other."""
        return [self.mount(n) for n in (names if names is not None else self.names)]

    def kill(self, name: str) -> float:
        return self.peers[name].kill()

    def stop(self, name: str) -> float:
        return self.peers[name].stop()

    def cont(self, name: str) -> float:
        return self.peers[name].cont()

    def writer(self, peer: str | Peer, directory: Path, prefix: str | None = None, **kw) -> FileWriter:
        """A started FileWriter (stopped by cleanup if the test does not)."""
        p = self.peers[peer] if isinstance(peer, str) else peer
        w = FileWriter(directory, prefix or p.name, seed=len(self._writers) + 1, **kw)
        self._writers.append(w)
        w.start()
        return w

    def umount_all(self, check_logs: bool = True) -> None:
        """Unmount every running peer, followers before the leader, the intruder last; check
        their logs for tracebacks (all logs are checked even when one fails)."""
        leader = None
        try:
            leader = self.leader_of(WS) if self.workspaces else None
        except Exception:  # noqa: BLE001
            pass
        order = sorted((p for p in self.peers.values() if p.pid is not None),
                       key=lambda p: (not p.ident.listed, p.name == leader, p.name))
        problems = []
        for p in order:
            try:
                p.umount()
            except AssertionError as e:
                problems.append(str(e))
            except subprocess.TimeoutExpired as e:
                problems.append(f"umount of {p.name} hung: {e}")
        if not check_logs:
            return
        for p in self.peers.values():
            try:
                p.check_log()
            except AssertionError as e:
                if str(e) not in problems:
                    problems.append(str(e))
        assert not problems, "\n\n".join(problems)

    def fsck(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
        """`agentmount fsck` of the shared store (with the first real peer's config); every
        peer must be unmounted."""
        running = [p.name for p in self.peers.values() if p.pid is not None]
        assert not running, f"fsck with peers still mounted: {running}"
        return self.real[0].cli("fsck", *args, timeout=timeout)

    def cleanup(self) -> None:
        """Continue stopped daemons, stop workload threads, unmount every peer (bounded, with a
        SIGKILL + lazy detach fallback). Idempotent; never raises."""
        if self._cleaned:
            return
        self._cleaned = True
        for p in self.peers.values():
            if p.pid is not None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                p.stopped = False
        for w in self._writers:
            w.stop()
        leader = None
        try:
            leader = within(15, self.leader_of, WS, what="leader_of") if self.workspaces else None
        except Exception:  # noqa: BLE001
            pass
        for p in sorted(self.peers.values(), key=lambda p: (not p.ident.listed, p.name == leader, p.name)):
            try:
                p.cleanup()
            except Exception:  # noqa: BLE001 - one bad peer must not leave the others mounted
                try:
                    if p.pid is not None:
                        os.kill(p.pid, signal.SIGKILL)
                except (ProcessLookupError, TypeError):
                    pass
                p.pid = None
                detach(p.mp)
        for w in self._writers:
            w.join(5)
        try:
            atexit.unregister(self.cleanup)
        except Exception:  # noqa: BLE001
            pass

    # -- leadership ---------------------------------------------------------------------------

    def statuses(self, ws: str = WS, among: Iterable[str | Peer] | None = None) -> dict[str, dict | None]:
        return {p.name: p.ws_status(ws) for p in self._among(among)}

    def leader_of(self, ws: str = WS, among: Iterable[str | Peer] | None = None) -> str | None:
        """The leader of `ws` by the live peers' status: one that reports itself leader first,
        else the leader a follower names."""
        sts = self.statuses(ws, among)
        for n, s in sts.items():
            if s and s.get("role") == "leader":
                return n
        for s in sts.values():
            if s and s.get("leader"):
                return s["leader"]
        return None

    def wait_leader(self, ws: str = WS, not_name: str | None = None, timeout: float = 30.0,
                    min_epoch: int | None = None, among: Iterable[str | Peer] | None = None,
                    agree: bool = True) -> tuple[str, int]:
        """Wait until a peer (not `not_name`, with an epoch above `min_epoch`) reports itself
        leader of `ws` and, with `agree`, every other peer of `among` (default: the live real
        peers) names it as leader. Returns (leader name, its epoch)."""
        last: dict = {}

        def check():
            sts = self.statuses(ws, among)
            last.clear()
            last.update(sts)
            for n, s in sts.items():
                if not s or s.get("role") != "leader" or n == not_name:
                    continue
                if min_epoch is not None and not (isinstance(s.get("epoch"), int) and s["epoch"] > min_epoch):
                    continue
                if agree and not all(o and o.get("leader") == n for m, o in sts.items() if m != n):
                    continue
                return n, s["epoch"]
            return None

        def describe():
            return {n: ({k: s.get(k) for k in ("role", "leader", "epoch")} if s else None) for n, s in last.items()}

        what = f"a leader of {ws!r}" + (f" other than {not_name}" if not_name else "") + \
               (f" with epoch > {min_epoch}" if min_epoch is not None else "") + (" that all agree on" if agree else "")
        return wait_until(check, timeout, what, interval=0.1, describe=describe)

    def followers(self, ws: str = WS) -> list[Peer]:
        leader = self.leader_of(ws)
        return [p for p in self.real if p.live and p.name != leader]


def clusters(tmp_path: Path):
    """Generator behind the `peer_cluster` fixture (``yield from clusters(tmp_path)``): yields a
    factory peer_cluster(names=("a", "b", "c"), **options) -> PeerCluster (not mounted; call
    mount_all); every cluster made is cleaned up when the generator is closed, also when the
    test failed."""
    made: list[PeerCluster] = []

    def factory(names: Iterable[str] = ("a", "b", "c"), **kw) -> PeerCluster:
        c = PeerCluster(tmp_path / f"cluster{len(made)}", names, **kw)
        made.append(c)
        return c

    try:
        yield factory
    finally:
        for c in made:
            c.cleanup()
