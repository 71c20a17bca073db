"""Distributed file locks across three peers (acceptance tests).

Three real `agentmount mount` daemons (tests/peers.py: PeerCluster) on 127.0.0.1 share the
workspace; its leader holds the lock table. Every test takes locks with plain flock(2),
fcntl(2) POSIX record locks, OFD locks and flock(1) on the peers' own mountpoints, and checks
that they conflict across peers exactly as between processes on one Linux host: LOCK_NB and
F_SETLK fail with EWOULDBLOCK/EAGAIN, F_GETLK reports the other peer's lock, a waiter is
granted right after the release (p95 latency measured), a counter incremented under a lock on
three peers loses no increment, a killed holder releases at once, a killed holder *peer*
releases after `[lease] lock_ttl_s` (never before), SIGINT ends a blocked flock with EINTR and
leaves no waiter behind, and F_SETLKW deadlocks across peers give EDEADLK.

How: locks are held by real processes, python children driven line by line over pipes (each
answer carries its CLOCK_MONOTONIC time, so grant times are measured by the process that got
the lock) and flock(1). "Blocked" is observed through the peer's own count of waiting lock
requests (the `user.agentmount.fuse` xattr of its mount root: JSON stats, locks.waiting), never
guessed with a sleep; every wait has a deadline. Some tests first make a check between two
processes of one peer, then across peers, so a failure points at the cross-peer part.

One cluster (lock_ttl_s = 4 s, short leases) serves the whole module, each test on its own
files; the peer-kill test runs last and mounts the killed peer again. Figures (grant latency,
counter run times, cycles/s) are printed with report() (run with -s).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.peers import WS, SHORT_LEASE, Peer, PeerCluster, clusters, report, wait_until, write_file
from tests.receiver import Receiver

FSTATS = "user.agentmount.fuse"
LOCK_TTL_S = 4.0
LEASE = {**SHORT_LEASE, "lock_ttl_s": LOCK_TTL_S}
BLOCKED_TIMEOUT_S = 10.0     # a waiter must show up in its peer's stats within this
FLOCK_FMT = "hhqqi"          # struct flock: l_type, l_whence, l_start, l_len, l_pid


# -- the cluster -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peer_cluster(tmp_path_factory):
    """Factory: peer_cluster(names=("a", "b", "c"), **PeerCluster options) -> PeerCluster (not
    mounted yet); all are cleaned up at the end of the module, also when a test fails. (The
    fixture of tests/test_peers.py, module-scoped.)"""
    yield from clusters(tmp_path_factory.mktemp("peers"))


@pytest.fixture(scope="module")
def cluster(peer_cluster) -> PeerCluster:
    """Three mounted peers with lock_ttl_s = 4 s, shared by the module's tests; unmounted at
    the end with a check of every daemon's log."""
    c = peer_cluster(lease=LEASE)
    c.mount_all()
    c.wait_leader(timeout=30)
    yield c
    c.umount_all()


def roles(c: PeerCluster) -> tuple[Peer, Peer, Peer]:
    """(leader, follower, other follower) of the workspace, once every peer agrees."""
    leader, _ = c.wait_leader(timeout=30)
    f1, f2 = sorted((p for p in c.real if p.name != leader), key=lambda p: p.name)
    return c[leader], f1, f2


def label(p: Peer) -> str:
    return f"{p.name} ({p.role() or '?'})"


@pytest.fixture
def shared_file(cluster, request) -> str:
    """Name (in the workspace) of an empty file of this test, created through the leader and
    visible on every peer."""
    return make_shared(cluster, f"lock-{request.node.name}")


def make_shared(c: PeerCluster, name: str) -> str:
    """Create the empty file `name` through the leader; returns once every peer sees it."""
    leader, _, _ = roles(c)
    write_file(leader.ws / name, b"")
    for p in c.real:
        wait_until(lambda: (p.ws / name).exists(), 10, f"{name} visible on {p.name}")
    return name


# -- observing a peer's lock requests ----------------------------------------------------------

def stats(p: Peer) -> dict:
    return json.loads(os.getxattr(p.mp, FSTATS))


def waiting(p: Peer) -> int:
    """Lock requests of processes on peer `p` currently waiting."""
    return stats(p)["locks"]["waiting"]


def wait_blocked(p: Peer, *returned: Callable[[], str | None]) -> None:
    """Wait until peer `p` counts one waiting lock request per waiter. Each `returned()` says
    how a waiter already returned (or None while it has not): that fails at once — the
    request was answered instead of blocking."""
    n = len(returned)

    def check() -> bool:
        for r in returned:
            how = r()
            if how is not None:
                raise AssertionError(f"a lock request on {label(p)} that should block returned: {how}")
        return waiting(p) == n

    wait_until(check, BLOCKED_TIMEOUT_S, f"{n} waiting lock request(s) on {p.name}", interval=0.002,
               describe=lambda: stats(p)["locks"])


def no_waiters(*peers: Peer) -> None:
    for p in peers:
        wait_until(lambda: waiting(p) == 0, 5, f"no waiting lock request left on {p.name}",
                   describe=lambda: stats(p)["locks"])


# -- lock helpers for this process ------------------------------------------------------------

def pack(typ: int, start: int, length: int) -> bytes:
    return struct.pack(FLOCK_FMT, typ, os.SEEK_SET, start, length, 0)


def getlk(path: Path, typ: int, start: int, length: int, cmd: int = fcntl.F_GETLK) -> tuple[int, int, int, int]:
    """F_GETLK (or F_OFD_GETLK) from this process: (l_type, l_start, l_len, l_pid) of a lock
    that conflicts with `typ` on [start, start+length), l_type F_UNLCK if none."""
    fd = os.open(path, os.O_RDWR)
    try:
        typ, _, start, length, pid = struct.unpack(FLOCK_FMT, fcntl.fcntl(fd, cmd, pack(typ, start, length)))
    finally:
        os.close(fd)
    return typ, start, length, pid


def flock_nb_errno(path: Path, op: int = fcntl.LOCK_EX) -> int | None:
    """flock(op | LOCK_NB) through a new open file description of `path`: None if it got the
    lock (and dropped it again), else the errno. The unlock is explicit: FUSE releases a
    flock on the last close asynchronously, after close() has returned."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


def ofd_setlk_errno(fd: int, start: int, length: int) -> int | None:
    """F_OFD_SETLK of a write lock on [start, start+length) through `fd`: None if granted, else the errno."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, pack(fcntl.F_WRLCK, start, length))
        return None
    except OSError as e:
        return e.errno


def flock_cmd_nb(path: Path) -> int:
    """Exit status of `flock -n PATH true` (0: got it, 1: held elsewhere)."""
    return subprocess.run(["flock", "-n", str(path), "true"], timeout=30).returncode


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))]


# -- child processes ---------------------------------------------------------------------------

# Commands (one per line) on one open file of argv[1]; one JSON answer per command, with the
# CLOCK_MONOTONIC time the call returned:
#   flock ex|sh|un [nb]       fcntl.flock
#   cflock ex                 flock(2) through libc: a signal makes it fail with EINTR (visible)
#   setlk w|r|u START LEN     F_SETLK          setlkw w|r START LEN    F_SETLKW
#   getlk w|r START LEN       F_GETLK -> "lock": [l_type, l_start, l_len, l_pid]
CHILD = r"""
import ctypes, fcntl, json, os, signal, struct, sys, time
signal.signal(signal.SIGINT, lambda *a: None)   # no SA_RESTART: a blocked call returns EINTR
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(sys.argv[1], os.O_RDWR)
TYPES = {"w": fcntl.F_WRLCK, "r": fcntl.F_RDLCK, "u": fcntl.F_UNLCK}
FLOCK = {"ex": fcntl.LOCK_EX, "sh": fcntl.LOCK_SH, "un": fcntl.LOCK_UN}
for line in sys.stdin:
    cmd, *a = line.split()
    out = {}
    try:
        if cmd == "flock":
            fcntl.flock(fd, FLOCK[a[0]] | (fcntl.LOCK_NB if a[1:] == ["nb"] else 0))
        elif cmd == "cflock":
            if libc.flock(fd, FLOCK[a[0]]) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        elif cmd in ("setlk", "setlkw", "getlk"):
            op = {"setlk": fcntl.F_SETLK, "setlkw": fcntl.F_SETLKW, "getlk": fcntl.F_GETLK}[cmd]
            res = fcntl.fcntl(fd, op, struct.pack("hhqqi", TYPES[a[0]], os.SEEK_SET, int(a[1]), int(a[2]), 0))
            if cmd == "getlk":
                typ, _, start, length, pid = struct.unpack("hhqqi", res)
                out["lock"] = [typ, start, length, pid]
        else:
            raise ValueError(cmd)
    except OSError as e:
        out["err"] = e.errno
    out["t"] = time.monotonic()
    print(json.dumps(out), flush=True)
"""


class Child:
    """A python child running CHILD on `path` of peer `peer` (one open file description)."""

    def __init__(self, peer: Peer, path: Path) -> None:
        self.peer = peer
        self.p = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE)
        self.pid = self.p.pid
        self.buf = b""

    def __str__(self) -> str:
        return f"process {self.pid} on {self.peer.name}"

    def send(self, cmd: str) -> None:
        self.p.stdin.write(cmd.encode() + b"\n")
        self.p.stdin.flush()

    def _fill(self, timeout: float) -> bool:
        """Read what the child wrote, waiting at most `timeout`; whether a whole answer is there."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if not select.select([self.p.stdout], [], [], max(0.0, left))[0]:
                return False
            chunk = os.read(self.p.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"{self} exited ({self.p.wait()})")
            self.buf += chunk
        return True

    def reply(self, timeout: float = 10.0) -> dict:
        if not self._fill(timeout):
            raise AssertionError(f"{self}: no answer within {timeout:g}s")
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def answered(self) -> str | None:
        """How the pending command ended, if the child answered already (for wait_blocked)."""
        if not self._fill(0):
            return None
        r = json.loads(self.buf.split(b"\n", 1)[0])
        return f"{self} failed with {errno.errorcode.get(r['err'], r['err'])}" if "err" in r else f"{self} got it"

    def do(self, cmd: str, timeout: float = 10.0) -> dict:
        self.send(cmd)
        return self.reply(timeout)

    def ok(self, cmd: str, timeout: float = 10.0) -> float:
        """Run `cmd`, which must succeed; the time it returned."""
        self.send(cmd)
        return self.granted(cmd, timeout)

    def granted(self, cmd: str, timeout: float) -> float:
        """Read the answer to `cmd` (sent earlier), which must be a success; the time it returned."""
        r = self.reply(timeout)
        assert "err" not in r, f"{self}: {cmd!r} failed with {errno.errorcode.get(r['err'], r['err'])}"
        return r["t"]

    def fails(self, cmd: str, err: int, why: str) -> None:
        r = self.do(cmd)
        got = errno.errorcode.get(r["err"], r["err"]) if "err" in r else "success"
        assert r.get("err") == err, f"{self}: {cmd!r} gave {got}, expected {errno.errorcode[err]} ({why})"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.p.poll() is None:
            os.kill(self.pid, sig)

    def close(self) -> None:
        self.kill()
        self.p.wait(10)
        self.p.stdin.close()
        self.p.stdout.close()


@pytest.fixture
def children(cluster, shared_file):
    """Factory: children(peer) -> a Child with the test's file open on that peer's mount;
    all are killed at the end of the test."""
    made: list[Child] = []

    def factory(peer: Peer) -> Child:
        c = Child(peer, peer.ws / shared_file)
        made.append(c)
        return c

    yield factory
    for c in made:
        c.close()


def first_answer(waiters: list[Child], timeout: float) -> Child:
    """The first of `waiters` to answer (its answer stays to be read)."""
    deadline = time.monotonic() + timeout
    while True:
        for w in waiters:
            if w.answered() is not None:
                return w
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"none of {', '.join(map(str, waiters))} answered within {timeout:g}s")
        select.select([w.p.stdout for w in waiters], [], [], left)


# -- flock conflicts and grant latency ------------------------------------------------------

def test_flock_conflicts_across_peers_and_waiter_granted_at_once(cluster, shared_file, children):
    """A process on follower A holds LOCK_EX: LOCK_NB on follower B fails with EWOULDBLOCK
    (also through flock -n), a blocking flock(1) on B returns once A unlocks. Then 40 rounds of
    hold-on-A / block-on-B / unlock-on-A: the latency from A's unlock returning to B's flock
    returning (p95 target 50 ms)."""
    _, a, b = roles(cluster)
    pa, pb = a.ws / shared_file, b.ws / shared_file
    holder = children(a)
    holder.ok("flock ex")
    assert flock_cmd_nb(pa) == 1, f"flock -n on {a.name} got the lock held by {holder} on the same peer"
    err = flock_nb_errno(pb)
    assert err == errno.EWOULDBLOCK, f"LOCK_EX|LOCK_NB on {label(b)} gave {errno.errorcode.get(err, 'success')} " \
        f"while {holder} holds LOCK_EX"
    assert flock_cmd_nb(pb) == 1, f"flock -n on {b.name} got the lock held by {holder} on {a.name}"

    waiter = subprocess.Popen(["flock", str(pb), "true"])
    try:
        wait_blocked(b, lambda: None if waiter.poll() is None else f"flock(1) exited {waiter.returncode}")
        holder.ok("flock un")
        assert waiter.wait(10) == 0, f"flock(1) on {b.name} failed after {a.name}'s unlock"
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()

    after_return, after_call = grant_latencies(pa, pb, b, rounds=40)
    p50, p95 = percentile(after_return, 0.5), percentile(after_return, 0.95)
    report(f"flock grant {a.name} -> {b.name} (followers, leader elsewhere), 40 rounds: from the unlock "
           f"returning p50 {p50 * 1e3:.1f} ms, p95 {p95 * 1e3:.1f} ms, max {after_return[-1] * 1e3:.1f} ms; "
           f"from the unlock call p50 {percentile(after_call, 0.5) * 1e3:.1f} ms, "
           f"p95 {percentile(after_call, 0.95) * 1e3:.1f} ms")
    assert p95 <= 0.05, f"p95 grant latency {p95 * 1e3:.1f} ms > 50 ms (p50 {p50 * 1e3:.1f} ms)"
    no_waiters(a, b)


def grant_latencies(holder_path: Path, waiter_path: Path, waiter_peer: Peer, rounds: int) -> tuple[list, list]:
    """`rounds` times: LOCK_EX on holder_path, a thread blocks in LOCK_EX on waiter_path (another
    peer's mount), unlock. Returns the sorted latencies (s) from the unlock returning, and
    from the unlock call, to the waiter's flock returning."""
    hfd, wfd = os.open(holder_path, os.O_RDWR), os.open(waiter_path, os.O_RDWR)
    from_return, from_call = [], []
    try:
        for i in range(rounds):
            fcntl.flock(hfd, fcntl.LOCK_EX)
            granted: list[float] = []
            th = threading.Thread(target=lambda: (fcntl.flock(wfd, fcntl.LOCK_EX),
                                                  granted.append(time.perf_counter())), daemon=True)
            th.start()
            wait_blocked(waiter_peer, lambda: "granted while held" if granted else None)
            t_call = time.perf_counter()
            fcntl.flock(hfd, fcntl.LOCK_UN)
            t_ret = time.perf_counter()
            th.join(10)
            assert granted, f"round {i}: the waiter on {waiter_peer.name} was not granted within 10 s of the unlock"
            from_return.append(granted[0] - t_ret)
            from_call.append(granted[0] - t_call)
            fcntl.flock(wfd, fcntl.LOCK_UN)
    finally:
        os.close(hfd)
        os.close(wfd)
    return sorted(from_return), sorted(from_call)


def test_shared_flocks_coexist_across_peers(cluster, shared_file, children):
    """LOCK_SH on two peers at once; LOCK_EX|LOCK_NB on the third fails with EWOULDBLOCK
    until both shared locks are gone."""
    leader, f1, f2 = roles(cluster)
    r1, r2 = children(f1), children(f2)
    r1.ok("flock sh")
    r2.ok("flock sh nb")
    assert flock_nb_errno(leader.ws / shared_file, fcntl.LOCK_SH) is None, \
        f"LOCK_SH|LOCK_NB on {leader.name} refused while only shared locks are held"
    err = flock_nb_errno(leader.ws / shared_file)
    assert err == errno.EWOULDBLOCK, \
        f"LOCK_EX|LOCK_NB on {leader.name} gave {errno.errorcode.get(err, 'success')} while {r1} and {r2} hold LOCK_SH"
    r1.ok("flock un")
    err = flock_nb_errno(leader.ws / shared_file)
    assert err == errno.EWOULDBLOCK, \
        f"LOCK_EX|LOCK_NB on {leader.name} gave {errno.errorcode.get(err, 'success')} while {r2} holds LOCK_SH"
    r2.ok("flock un")
    assert flock_nb_errno(leader.ws / shared_file) is None, \
        f"LOCK_EX|LOCK_NB on {leader.name} refused after both shared locks were released"


# -- a counter incremented under a lock on three peers -------------------------------------

# argv: lock file, counter file, "flock" | "fcntl", increments. The counter is opened after the
# lock is taken and closed (committed) before it is released: agentmount promises
# close-to-open for data, so each increment reads the bytes the previous holder closed. The
# lock lives on its own file: closing the counter drops no POSIX lock that way.
COUNTER = r"""
import fcntl, os, struct, sys
lock_path, counter_path, kind, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
WRLCK = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
UNLCK = struct.pack("hhqqi", fcntl.F_UNLCK, os.SEEK_SET, 0, 1, 0)
lfd = os.open(lock_path, os.O_RDWR)
for _ in range(n):
    if kind == "flock":
        fcntl.flock(lfd, fcntl.LOCK_EX)
    else:
        fcntl.fcntl(lfd, fcntl.F_SETLKW, WRLCK)
    fd = os.open(counter_path, os.O_RDWR)
    value = int(os.read(fd, 32) or b"0")
    os.pwrite(fd, str(value + 1).encode(), 0)   # the number only grows: no truncate needed
    os.close(fd)
    if kind == "flock":
        fcntl.flock(lfd, fcntl.LOCK_UN)
    else:
        fcntl.fcntl(lfd, fcntl.F_SETLK, UNLCK)
os.close(lfd)
"""
INCREMENTS = 200
COUNTER_DEADLINE_S = 150.0


def run_counter(procs_on: list[Peer], lock_name: str, counter_name: str, kind: str) -> float:
    """Run one COUNTER process per entry of `procs_on` (on that peer's mount) at once; wait
    for all (each must exit 0); the seconds the run took."""
    procs = [(p, subprocess.Popen([sys.executable, "-c", COUNTER, str(p.ws / lock_name), str(p.ws / counter_name),
                                   kind, str(INCREMENTS)], stderr=subprocess.PIPE, text=True)) for p in procs_on]
    t0 = time.monotonic()
    try:
        for p, proc in procs:
            left = COUNTER_DEADLINE_S - (time.monotonic() - t0)
            try:
                rc = proc.wait(max(0.1, left))
            except subprocess.TimeoutExpired:
                running = [f"{q.name}:{pr.pid}" for q, pr in procs if pr.poll() is None]
                raise AssertionError(f"{kind} counter: processes {running} still running after "
                                     f"{COUNTER_DEADLINE_S:g} s") from None
            assert rc == 0, f"{kind} counter process on {p.name} exited {rc}: {proc.stderr.read()[-2000:]}"
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stderr.close()
    return time.monotonic() - t0


@pytest.mark.parametrize("kind", ["flock", "fcntl"])
def test_counter_under_lock_on_three_peers_is_exact(cluster, kind):
    """8 processes (3 on each follower, 2 on the leader) each increment a shared counter
    200 times under flock(LOCK_EX), resp. an F_SETLKW write lock on [0, 1): the count ends
    at exactly 1600 on every peer."""
    leader, f1, f2 = roles(cluster)
    lock_name, counter_name = f"counter-{kind}.lock", f"counter-{kind}"
    write_file(leader.ws / lock_name, b"")
    write_file(leader.ws / counter_name, b"0")
    placement = [f1, f1, f1, f2, f2, f2, leader, leader]
    dt = run_counter(placement, lock_name, counter_name, kind)
    total = len(placement) * INCREMENTS
    counts = {p.name: (p.ws / counter_name).read_bytes().decode() for p in cluster.real}
    report(f"counter under {kind}: {len(placement)} processes x {INCREMENTS} increments over 3 peers in "
           f"{dt:.1f} s ({total / dt:.0f} locked increments/s)")
    assert all(v == str(total) for v in counts.values()), \
        f"counter under {kind} reads {counts} on the peers, expected {total} everywhere (lost increments: " \
        f"the lock did not exclude processes on other peers)"
    no_waiters(*cluster.real)


# -- byte ranges, OFD locks, unlock of nothing ---------------------------------------------

def test_fcntl_byte_ranges_across_peers(cluster, shared_file, children):
    """Write locks [0,100) on A and [100,200) on B coexist; C's F_SETLK on [50,150) fails
    EAGAIN and its F_GETLK over [50,60) reports A's write lock [0,100); read locks of two
    peers on one range coexist, and a write lock conflicts with them."""
    leader, f1, f2 = roles(cluster)
    a, b, c = children(f1), children(f2), children(leader)
    a.ok("setlk w 0 100")
    children(f1).fails("setlk w 50 100", errno.EAGAIN, f"{a} holds [0,100) on the same peer")
    b.ok("setlk w 100 100")
    c.fails("setlk w 50 100", errno.EAGAIN, f"{a} holds [0,100) on {f1.name}, {b} [100,200) on {f2.name}")
    c.fails("setlk r 0 1", errno.EAGAIN, f"{a} holds a write lock on [0,100) on {f1.name}")
    c.ok("setlk w 200 100")                         # [200,300) is free
    r = c.do("getlk w 50 10")
    typ, start, length, pid = r["lock"]
    report(f"F_GETLK on {leader.name} over [50,60): type {typ}, start {start}, len {length}, pid {pid} "
           f"(holder: process {a.pid} on {f1.name})")
    assert (typ, start, length) == (fcntl.F_WRLCK, 0, 100), \
        f"F_GETLK on {leader.name} over [50,60) gave type {typ} [{start}, +{length}), expected {a}'s write lock [0,100)"
    assert pid != 0, f"F_GETLK reports pid 0 for {a}'s lock"
    typ, start, length, _ = c.do("getlk w 150 10")["lock"]
    assert (typ, start, length) == (fcntl.F_WRLCK, 100, 100), \
        f"F_GETLK over [150,160) gave type {typ} [{start}, +{length}), expected {b}'s write lock [100,200)"
    assert c.do("getlk w 300 50")["lock"][0] == fcntl.F_UNLCK, "F_GETLK over free [300,350) reported a lock"

    a.ok("setlk u 0 100")
    b.ok("setlk u 100 100")
    a.ok("setlk r 0 100")
    b.ok("setlk r 0 100")                           # two peers read-lock one range
    c.ok("setlk r 50 10")                           # and a third
    c.fails("setlk w 0 100", errno.EAGAIN, f"{a} and {b} hold read locks on [0,100)")
    typ, start, length, _ = getlk(f2.ws / shared_file, fcntl.F_WRLCK, 0, 100)
    assert typ == fcntl.F_RDLCK, f"F_GETLK for a write lock over read-locked [0,100) gave type {typ}"
    no_waiters(*cluster.real)


def test_ofd_locks_conflict_across_peers(cluster, shared_file):
    """OFD write lock [0,10) through a follower: the leader's F_OFD_SETLK on [5,15) fails
    EAGAIN, on [10,20) succeeds, its F_OFD_GETLK reports the follower's lock; the follower's
    close releases it."""
    leader, f1, _ = roles(cluster)
    fa, fb = os.open(f1.ws / shared_file, os.O_RDWR), os.open(leader.ws / shared_file, os.O_RDWR)
    try:
        assert ofd_setlk_errno(fa, 0, 10) is None, f"OFD write lock [0,10) on {f1.name} of a fresh file refused"
        err = ofd_setlk_errno(fb, 5, 10)
        assert err == errno.EAGAIN, f"OFD write lock [5,15) on {leader.name} gave " \
            f"{errno.errorcode.get(err, 'success')} while {f1.name} holds [0,10)"
        assert ofd_setlk_errno(fb, 10, 10) is None, f"OFD write lock [10,20) on {leader.name} refused (free range)"
        typ, start, length, _ = getlk(leader.ws / shared_file, fcntl.F_WRLCK, 0, 5, cmd=fcntl.F_OFD_GETLK)
        assert (typ, start, length) == (fcntl.F_WRLCK, 0, 10), \
            f"F_OFD_GETLK on {leader.name} over [0,5) gave type {typ} [{start}, +{length}), " \
            f"expected [0,10) of {f1.name}"
        os.close(fa)
        fa = -1
        wait_until(lambda: ofd_setlk_errno(fb, 0, 10) is None, 5, f"{f1.name}'s OFD lock released by its close")
    finally:
        for fd in (fa, fb):
            if fd >= 0:
                os.close(fd)


def test_unlocking_what_is_not_held_is_a_noop(cluster, shared_file, children):
    """flock LOCK_UN and F_SETLK F_UNLCK by processes holding nothing return 0 and leave
    another peer's locks in place."""
    leader, f1, f2 = roles(cluster)
    holder, other = children(f1), children(f2)
    other.ok("flock un")                            # nothing held anywhere yet
    other.ok("setlk u 0 0")
    holder.ok("flock ex")
    holder.ok("setlk w 0 10")
    assert holds_both(leader.ws / shared_file), f"{holder}'s locks are not seen from {leader.name}"
    other.ok("flock un")                            # held by someone else: still a no-op
    other.ok("setlk u 0 0")
    assert holds_both(leader.ws / shared_file), \
        f"{holder}'s flock or write lock [0,10) is gone after {other}, holding nothing, unlocked"


def holds_both(path: Path) -> bool:
    """Does someone hold LOCK_EX and a write lock on [0,10) of `path` (as seen from this process)?"""
    return flock_nb_errno(path) == errno.EWOULDBLOCK and getlk(path, fcntl.F_WRLCK, 0, 10)[0] == fcntl.F_WRLCK


# -- SIGKILL of the holding process ---------------------------------------------------------

def holder_and_two_waiters(children, leader: Peer, a: Peer, b: Peer) -> tuple[Child, Child, Child]:
    """A process on `a` holding flock LOCK_EX and a write lock [0,10); a flock LOCK_EX waiter
    blocked on `b` and an F_SETLKW waiter on the leader."""
    holder = children(a)
    holder.ok("flock ex")
    holder.ok("setlk w 0 10")
    flocker, posixer = children(b), children(leader)
    flocker.send("flock ex")
    posixer.send("setlkw w 0 10")
    wait_blocked(b, flocker.answered)
    wait_blocked(leader, posixer.answered)
    return holder, flocker, posixer


def test_sigkill_of_holder_process_releases_at_once(cluster, shared_file, children):
    """The holder (flock LOCK_EX and a write lock [0,10)) on A is SIGKILLed while a flock
    waiter blocks on B and an F_SETLKW waiter on the leader: both are granted within 2 s."""
    leader, a, b = roles(cluster)
    holder, flocker, posixer = holder_and_two_waiters(children, leader, a, b)
    t_kill = time.monotonic()
    holder.kill()
    t_flock, t_posix = flocker.granted("flock ex", 5), posixer.granted("setlkw w 0 10", 5)
    report(f"holder process on {a.name} SIGKILLed: flock on {b.name} granted after {(t_flock - t_kill) * 1e3:.0f} ms, "
           f"F_SETLKW on {leader.name} after {(t_posix - t_kill) * 1e3:.0f} ms")
    assert t_flock - t_kill < 2.0 and t_posix - t_kill < 2.0, \
        f"grants after the holder's SIGKILL took {t_flock - t_kill:.2f} s (flock), {t_posix - t_kill:.2f} s (fcntl)"
    no_waiters(*cluster.real)


# -- SIGINT to a blocked flock --------------------------------------------------------------

def test_sigint_to_blocked_flock_on_follower_leaves_no_waiter(cluster, shared_file, children):
    """The leader's process holds LOCK_EX. A flock blocked on a follower gets SIGINT: it
    returns EINTR within 1 s (a python process calling flock(2) through libc; then flock(1),
    which SIGINT ends) and the follower counts no waiter afterwards. When the holder unlocks,
    LOCK_NB on the other follower succeeds at once: no withdrawn request was left queued at the
    leader to be granted instead."""
    leader, f1, f2 = roles(cluster)
    fd = os.open(leader.ws / shared_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        waiter = children(f1)
        waiter.send("cflock ex")
        wait_blocked(f1, waiter.answered)
        t0 = time.monotonic()
        waiter.kill(signal.SIGINT)
        r = waiter.reply(5)
        dt_child = r["t"] - t0
        assert r.get("err") == errno.EINTR, \
            f"flock(2) on {f1.name} interrupted by SIGINT gave " \
            f"{errno.errorcode.get(r.get('err'), 'success')}, not EINTR"
        no_waiters(f1)

        cmd = subprocess.Popen(["flock", str(f1.ws / shared_file), "true"])
        try:
            wait_blocked(f1, lambda: None if cmd.poll() is None else f"flock(1) exited {cmd.returncode}")
            t0 = time.monotonic()
            cmd.send_signal(signal.SIGINT)
            rc = cmd.wait(5)
            dt_cmd = time.monotonic() - t0
        finally:
            if cmd.poll() is None:
                cmd.kill()
                cmd.wait()
        assert rc == -signal.SIGINT, f"flock(1) blocked on {f1.name} exited {rc} on SIGINT"
        no_waiters(f1)
        report(f"SIGINT -> blocked flock on follower {f1.name} returned EINTR after {dt_child * 1e3:.0f} ms "
               f"(python), flock(1) ended after {dt_cmd * 1e3:.0f} ms")
        assert dt_child < 1.0 and dt_cmd < 1.0, \
            f"interrupted flock returned after {dt_child:.2f} s (python), {dt_cmd:.2f} s (flock(1)); expected < 1 s"

        fcntl.flock(fd, fcntl.LOCK_UN)
        err = flock_nb_errno(f2.ws / shared_file)
        assert err is None, f"LOCK_NB on {f2.name} right after the holder's unlock gave {errno.errorcode[err]}: " \
                            f"an interrupted request of {f1.name} was granted instead"
        waiter.ok("flock ex nb")            # the interrupted process locks normally afterwards
        waiter.ok("flock un")
    finally:
        os.close(fd)
    no_waiters(*cluster.real)


# -- deadlock across peers ------------------------------------------------------------------

def test_fcntl_deadlock_across_peers_gives_edeadlk(cluster, shared_file, children):
    """P on one follower holds byte 0 and waits (F_SETLKW) for byte 1, which Q on the other
    follower holds; Q's F_SETLKW on byte 0 closes the cycle: one of them gets EDEADLK while the
    other still waits, and once the loser unlocks, the other is granted."""
    _, f1, f2 = roles(cluster)
    p, q = children(f1), children(f2)
    p.ok("setlk w 0 1")
    q.ok("setlk w 1 1")
    p.send("setlkw w 1 1")
    wait_blocked(f1, p.answered)
    q.send("setlkw w 0 1")
    loser = first_answer([p, q], timeout=10)
    winner, contested = (q, "0 1") if loser is p else (p, "1 1")   # the loser's byte, which the winner waits for
    r = loser.reply(0)
    assert r.get("err") == errno.EDEADLK, \
        f"{loser}'s F_SETLKW in the cycle gave {errno.errorcode.get(r.get('err'), 'success')}, not EDEADLK"
    assert winner.answered() is None and waiting(winner.peer) == 1, \
        f"{winner} should still wait when {loser} gets EDEADLK (answered: {winner.answered()})"
    report(f"F_SETLKW cycle between {f1.name} and {f2.name}: EDEADLK for the request of {loser}")
    loser.ok(f"setlk u {contested}")
    winner.granted(f"setlkw w {contested}", 5)
    no_waiters(f1, f2)


# -- uncontended speed ----------------------------------------------------------------------

def flock_cycles_per_s(path: Path, seconds: float = 2.0) -> float:
    """LOCK_EX + LOCK_UN cycles per second on one open fd of `path`, for `seconds`."""
    fd = os.open(path, os.O_RDWR)
    try:
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fcntl.flock(fd, fcntl.LOCK_EX)
            fcntl.flock(fd, fcntl.LOCK_UN)
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        os.close(fd)


def test_uncontended_flock_cycles_per_second(cluster, shared_file):
    """Uncontended LOCK_EX/LOCK_UN on one fd, 2 s through the leader's mount and 2 s through
    a follower's: both above 50 cycles/s (figures printed)."""
    leader, f1, _ = roles(cluster)
    on_leader = flock_cycles_per_s(leader.ws / shared_file)
    on_follower = flock_cycles_per_s(f1.ws / shared_file)
    report(f"uncontended flock: {on_leader:.0f} cycles/s through the leader {leader.name}, "
           f"{on_follower:.0f} cycles/s through the follower {f1.name}")
    assert on_leader > 50 and on_follower > 50, \
        f"uncontended flock cycles/s: leader {on_leader:.0f}, follower {on_follower:.0f}; expected > 50 each"


# -- SIGKILL of the holder's peer (last: it kills and remounts a peer) ---------------------

def test_sigkill_of_holder_peer_releases_after_lock_ttl(cluster, shared_file, children, tmp_path):
    """A process on follower A holds flock LOCK_EX and a write lock [0,10); a flock waiter
    blocks on follower B and an F_SETLKW waiter on the leader. SIGKILL of A's daemon: both are
    granted lock_ttl_s (4 s) after the kill, never before (>= ttl - 0.5 s: the leader counts
    from the last ping A answered, sent at most 0.5 s before the kill), and within ttl + 10 s.
    A webhook subscribed to lock events gets fs.lock.revoked for A's two locks.
    A is mounted again afterwards."""
    leader, a, b = roles(cluster)
    rx = Receiver(tmp_path / "receiver").start()
    r = leader.cli("webhook", "add", WS, rx.url, "--allow-private", "--event", "fs.lock.acquired",
                   "--event", "fs.lock.revoked")
    assert r.returncode == 0, r.stderr
    sid = r.stdout.split()[1]

    def delivering() -> bool:
        subs = json.loads(leader.cli("webhook", "list", WS, "--json").stdout)
        return any(s["id"] == sid and s.get("delivery") for s in subs)

    wait_until(delivering, 20, f"the leader {leader.name} delivering to the new subscription")
    holder, flocker, posixer = holder_and_two_waiters(children, leader, a, b)
    try:
        t_kill = a.kill()
        t_flock = flocker.granted("flock ex", LOCK_TTL_S + 15)
        t_posix = posixer.granted("setlkw w 0 10", LOCK_TTL_S + 15)
        report(f"daemon of holder peer {a.name} SIGKILLed (lock_ttl_s {LOCK_TTL_S:g}): flock on {b.name} granted "
               f"after {t_flock - t_kill:.2f} s, F_SETLKW on {leader.name} after {t_posix - t_kill:.2f} s")
        for what, t in (("flock", t_flock), ("F_SETLKW", t_posix)):
            assert t - t_kill >= LOCK_TTL_S - 0.5, \
                f"{what} waiter granted {t - t_kill:.2f} s after {a.name}'s daemon was killed: before lock_ttl_s"
            assert t - t_kill <= LOCK_TTL_S + 10, \
                f"{what} waiter granted only {t - t_kill:.2f} s after {a.name}'s daemon was killed"
        no_waiters(b, leader)

        def revoked(reqs: list[dict]) -> list[dict]:
            return [d["payload"]["data"] for d in reqs if d["payload"]["type"] == "fs.lock.revoked"]

        def acquired(reqs: list[dict]) -> list[dict]:
            return [d["payload"]["data"] for d in reqs if d["payload"]["type"] == "fs.lock.acquired"]

        # One acquired event per lock owner when it first holds something on the file, one
        # revoked per owner of A's when its session lapsed.
        rx.wait_for(lambda _: revoked(rx.deliveries()) and {e["actor"]["peer"] for e in acquired(rx.deliveries())}
                    >= {a.name, b.name, leader.name}, 20, what="fs.lock.revoked for A's locks, then the grants")
        got, acq = revoked(rx.deliveries()), acquired(rx.deliveries())
        assert all(e["path"] == f"/{shared_file}" and e["actor"]["peer"] == a.name for e in got), got
        assert len(got) == len([e for e in acq if e["actor"]["peer"] == a.name]), (got, acq)
    finally:
        holder.close()
        leader.cli("webhook", "remove", WS, sid)
        rx.stop()
        if a.pid is None:
            cluster.mount(a.name)
            cluster.wait_leader(timeout=30)
