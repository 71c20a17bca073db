"""File locks on a real mount, through the C extension's lock requests (fuse/_lowlevel.c),
and the suid/sgid semantics that come with FUSE_HANDLE_KILLPRIV_V2.

Other processes are real processes (python children driven line by line over pipes, and
flock(1)); "blocked" is observed through the daemon's own count of waiting requests, never
guessed with a sleep.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import NOBODY, run_as, wait_for

FSTATS = "user.agentmount.fuse"
FUSE_SETLK, FUSE_SETLKW = 32, 33
USERS_GID = 100


def stats(m) -> dict:
    return json.loads(os.getxattr(m.mp, FSTATS))


def waiting(m) -> int:
    return stats(m)["locks"]["waiting"]


def no_waiters(m) -> bool:
    s = stats(m)
    return s["locks"]["waiting"] == 0 and s["info"]["pending"] == 0


def wait_blocked(m, n: int = 1) -> None:
    wait_for(lambda: waiting(m) == n, timeout=10, interval=0.002, what=f"{n} waiting lock request(s)")


@pytest.fixture
def lockfile(shared_mount, request) -> Path:
    p = shared_mount.ws / f"lock-{request.node.name}"
    p.write_bytes(b"")
    yield p
    p.unlink(missing_ok=True)


# A child process that takes commands on stdin and answers one line each.
CHILD = r"""
import fcntl, os, sys
path = sys.argv[1]
fds = [os.open(path, os.O_RDWR)]
def rng(a):
    return int(a[1]), int(a[0])   # lockf(fd, cmd, len, start)
for line in sys.stdin:
    cmd, *a = line.split()
    try:
        out = "ok"
        if cmd == "lock":
            fcntl.lockf(fds[0], fcntl.LOCK_EX | fcntl.LOCK_NB, *rng(a))
        elif cmd == "lockw":
            fcntl.lockf(fds[0], fcntl.LOCK_EX, *rng(a))
        elif cmd == "unlock":
            fcntl.lockf(fds[0], fcntl.LOCK_UN, *rng(a))
        elif cmd == "flock":
            fcntl.flock(fds[0], fcntl.LOCK_EX)
        elif cmd == "open":
            fds.append(os.open(path, os.O_RDWR))
        elif cmd == "close":
            os.close(fds.pop())
        elif cmd == "pid":
            out = str(os.getpid())
        print(out, flush=True)
    except OSError as e:
        print("err", e.errno, flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


class Child:
    """A python child running CHILD on `path`."""

    def __init__(self, path: Path) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE)
        self.buf = b""
        self.pid = self.p.pid

    def send(self, cmd: str) -> None:
        self.p.stdin.write(cmd.encode() + b"\n")
        self.p.stdin.flush()

    def reply(self, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.p.stdout], [], [], left)[0]:
                raise AssertionError(f"child {self.pid}: no answer within {timeout}s")
            chunk = os.read(self.p.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"child {self.pid} exited ({self.p.wait()})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def do(self, cmd: str, timeout: float = 10.0) -> str:
        self.send(cmd)
        return self.reply(timeout)

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)
        self.p.stdin.close()
        self.p.stdout.close()


@pytest.fixture
def children():
    made: list[Child] = []

    def factory(path: Path) -> Child:
        c = Child(path)
        made.append(c)
        return c
    yield factory
    for c in made:
        c.close()


def can_flock(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def can_lockf(path: Path, start: int = 0, length: int = 0) -> bool:
    """Whether this process can take a write lock on the range (it takes and drops it)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
        return True
    except OSError as e:
        assert e.errno in (errno.EAGAIN, errno.EACCES), e
        return False
    finally:
        os.close(fd)


# -- the hooks are in place --------------------------------------------------------------
def test_mount_runs_through_the_extension(shared_mount, lockfile):
    info = stats(shared_mount)["info"]
    assert info["session_hooked"] and info["init_seen"] and info["lock_handler"], info
    before = stats(shared_mount)["ops"]
    assert subprocess.run(["flock", "-n", str(lockfile), "true"], timeout=30).returncode == 0
    after = stats(shared_mount)["ops"]
    sent = sum(after.get(str(o), 0) - before.get(str(o), 0) for o in (FUSE_SETLK, FUSE_SETLKW))
    assert sent >= 1, (before, after)   # the lock request reached the daemon (the unlock is the release)


# -- flock ------------------------------------------------------------------------------
def test_flock_nb_fails_while_held(shared_mount, lockfile, children):
    c = children(lockfile)
    assert c.do("flock") == "ok"
    r = subprocess.run(["flock", "-n", str(lockfile), "true"], timeout=30)
    assert r.returncode == 1
    assert not can_flock(lockfile)
    c.close()
    wait_for(lambda: can_flock(lockfile), timeout=10, what="flock released by the holder's exit")
    assert subprocess.run(["flock", "-n", str(lockfile), "true"], timeout=30).returncode == 0


def test_flock_command_blocks_until_release(shared_mount, lockfile):
    fd = os.open(lockfile, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        p = subprocess.Popen(["flock", str(lockfile), "true"])
        wait_blocked(shared_mount)
        assert p.poll() is None
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert p.wait(10) == 0
    finally:
        os.close(fd)


def test_blocking_flock_granted_right_after_release(shared_mount, lockfile):
    fd1, fd2 = os.open(lockfile, os.O_RDWR), os.open(lockfile, os.O_RDWR)
    lat = []
    try:
        for _ in range(50):
            fcntl.flock(fd1, fcntl.LOCK_EX)
            got: list[float] = []
            th = threading.Thread(target=lambda: (fcntl.flock(fd2, fcntl.LOCK_EX), got.append(time.perf_counter())))
            th.start()
            wait_blocked(shared_mount)
            t0 = time.perf_counter()
            fcntl.flock(fd1, fcntl.LOCK_UN)
            th.join(10)
            assert got, "the waiter was not granted"
            lat.append(got[0] - t0)
            fcntl.flock(fd2, fcntl.LOCK_UN)
    finally:
        os.close(fd1)
        os.close(fd2)
    lat.sort()
    p50, p95 = lat[len(lat) // 2], lat[int(len(lat) * 0.95) - 1]
    print(f"\nflock release -> waiter granted: p50 {p50 * 1e3:.2f} ms, p95 {p95 * 1e3:.2f} ms, "
          f"max {lat[-1] * 1e3:.2f} ms")
    assert p95 < 0.5


def test_flock_uncontended_cycles_per_second(shared_mount, lockfile):
    fd = os.open(lockfile, os.O_RDWR)
    try:
        n = 0
        t0 = time.perf_counter()
        while n < 20000 and time.perf_counter() - t0 < 1.0:
            fcntl.flock(fd, fcntl.LOCK_EX)
            fcntl.flock(fd, fcntl.LOCK_UN)
            n += 1
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    print(f"\nuncontended flock lock+unlock: {n / dt:.0f} cycles/s")
    assert n / dt > 100


def test_flock_shared_across_fork(shared_mount, lockfile):
    script = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
pid = os.fork()
if pid == 0:
    sys.stdin.readline()                 # the child holds the shared open file description
    if sys.stdin.readline().strip() == "unlock":
        fcntl.flock(fd, fcntl.LOCK_UN)   # unlocks it for both
        print("unlocked", flush=True)
        sys.stdin.readline()
    os._exit(0)
os.close(fd)                             # the parent's fd goes; the lock stays with the child's
print("closed", flush=True)
os.waitpid(pid, 0)
"""
    for how in ("exit", "unlock"):
        p = subprocess.Popen([sys.executable, "-c", script, str(lockfile)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "closed"
            assert not can_flock(lockfile)
            if how == "unlock":
                p.stdin.write("\nunlock\n")
                p.stdin.flush()
                assert p.stdout.readline().strip() == "unlocked"
                assert can_flock(lockfile)
            p.stdin.write("\n\n\n")
            p.stdin.flush()
            assert p.wait(10) == 0
            wait_for(lambda: can_flock(lockfile), timeout=10, what="flock released with the last fd")
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_sigkill_holder_releases_at_once(shared_mount, lockfile, children):
    c = children(lockfile)
    assert c.do("flock") == "ok"
    assert c.do("lock 0 10") == "ok"
    fd = os.open(lockfile, os.O_RDWR)
    got: list[float] = []
    th = threading.Thread(target=lambda: (fcntl.flock(fd, fcntl.LOCK_EX), got.append(time.perf_counter())))
    th.start()
    try:
        wait_blocked(shared_mount)
        assert not can_lockf(lockfile, 0, 10)
        t0 = time.perf_counter()
        os.kill(c.pid, signal.SIGKILL)
        th.join(10)
        assert got, "flock not granted after the holder was killed"
        c.p.wait(10)
        wait_for(lambda: can_lockf(lockfile, 0, 10), timeout=5, interval=0.005, what="POSIX lock of the dead holder")
        print(f"\nholder SIGKILLed -> flock granted in {(got[0] - t0) * 1e3:.1f} ms")
        assert got[0] - t0 < 2.0
    finally:
        os.close(fd)
        th.join(10)


def test_sigint_to_blocked_flock_returns_at_once(shared_mount, lockfile, children):
    fd = os.open(lockfile, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # A python waiter: flock() fails with EINTR, the handler raises KeyboardInterrupt.
        c = children(lockfile)
        c.send("flock")
        wait_blocked(shared_mount)
        t0 = time.monotonic()
        os.kill(c.pid, signal.SIGINT)
        assert c.reply(5) == "interrupted"
        dt_py = time.monotonic() - t0
        wait_for(lambda: no_waiters(shared_mount), timeout=5, what="no waiter left behind")
        # flock(1): SIGINT kills it; its request must not stay queued either.
        p = subprocess.Popen(["flock", str(lockfile), "true"])
        wait_blocked(shared_mount)
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        assert p.wait(5) == -signal.SIGINT
        dt_cmd = time.monotonic() - t0
        wait_for(lambda: no_waiters(shared_mount), timeout=5, what="no waiter left behind")
        print(f"\nSIGINT -> blocked flock returned in {dt_py * 1e3:.1f} ms (python), {dt_cmd * 1e3:.1f} ms (flock(1))")
        assert dt_py < 2 and dt_cmd < 2
        # Nobody got the lock behind our back: once released it is free.
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert can_flock(lockfile)
        assert c.do("pid") == str(c.pid)   # the child is fine and holds nothing
    finally:
        os.close(fd)


# -- fcntl (POSIX) byte ranges ---------------------------------------------------------------
def test_fcntl_ranges(shared_mount, lockfile, children):
    a, b = children(lockfile), children(lockfile)
    assert a.do("lock 0 10") == "ok"
    assert b.do("lock 10 10") == "ok"            # [10, 20) next to [0, 10): both held
    assert b.do("lock 5 10") == f"err {errno.EAGAIN}"     # overlaps a's
    assert a.do("lock 0 10") == "ok"             # own locks never conflict
    fd = os.open(lockfile, os.O_RDWR)
    try:
        q = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 5, 10, 0)
        typ, _, start, length, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, q))
        assert (typ, start, length, pid) == (fcntl.F_WRLCK, 0, 10, a.pid)
        q = struct.pack("hhqqi", fcntl.F_RDLCK, os.SEEK_SET, 30, 0, 0)
        assert struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, q))[0] == fcntl.F_UNLCK
    finally:
        os.close(fd)
    assert a.do("unlock 0 5") == "ok"            # split: [5, 10) stays a's
    assert can_lockf(lockfile, 0, 5) and not can_lockf(lockfile, 5, 1)


def test_fcntl_deadlock_gives_edeadlk(shared_mount, lockfile, children):
    a, b = children(lockfile), children(lockfile)
    assert a.do("lock 0 1") == "ok"
    assert b.do("lock 1 1") == "ok"
    a.send("lockw 1 1")                          # a waits for b
    wait_blocked(shared_mount)
    assert b.do("lockw 0 1") == f"err {errno.EDEADLK}"    # b would wait for a
    assert b.do("unlock 1 1") == "ok"
    assert a.reply() == "ok"                     # a got it
    assert waiting(shared_mount) == 0


def test_close_of_any_fd_drops_posix_locks(shared_mount, lockfile, children):
    c = children(lockfile)
    assert c.do("lock 0 10") == "ok"
    assert c.do("open") == "ok"                  # a second fd of the same file
    assert not can_lockf(lockfile, 0, 10)
    assert c.do("close") == "ok"                 # closing it drops the locks taken via the first
    assert can_lockf(lockfile, 0, 10)


def test_ofd_locks_per_open_file_and_released_on_close(shared_mount, lockfile):
    def ofd(fd, typ, cmd=fcntl.F_OFD_SETLK):
        return fcntl.fcntl(fd, cmd, struct.pack("hhqqi", typ, os.SEEK_SET, 0, 10, 0))
    fd1, fd2 = os.open(lockfile, os.O_RDWR), os.open(lockfile, os.O_RDWR)
    try:
        ofd(fd1, fcntl.F_WRLCK)
        with pytest.raises(BlockingIOError):
            ofd(fd2, fcntl.F_WRLCK)                  # same process, other open file: conflicts
        os.close(fd1)
        fd1 = -1
        wait_for(lambda: can_lockf(lockfile, 0, 10), timeout=5, what="OFD lock released by its last close")
        ofd(fd2, fcntl.F_WRLCK)
    finally:
        for fd in (fd1, fd2):
            if fd >= 0:
                os.close(fd)


COUNTER = r"""
import fcntl, os, sys
path, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_RDWR)
lock, unlock = ((lambda: fcntl.flock(fd, fcntl.LOCK_EX)), (lambda: fcntl.flock(fd, fcntl.LOCK_UN))) \
    if kind == "flock" else ((lambda: fcntl.lockf(fd, fcntl.LOCK_EX)), (lambda: fcntl.lockf(fd, fcntl.LOCK_UN)))
for _ in range(n):
    lock()
    v = int(os.pread(fd, 32, 0) or b"0")
    os.pwrite(fd, str(v + 1).encode(), 0)   # the number only grows: no truncate needed
    unlock()
"""


@pytest.mark.parametrize("kind", ["flock", "fcntl"])
def test_counter_under_lock_is_exact(shared_mount, lockfile, kind):
    procs = [subprocess.Popen([sys.executable, "-c", COUNTER, str(lockfile), kind, "200"]) for _ in range(8)]
    t0 = time.perf_counter()
    try:
        for p in procs:
            assert p.wait(120) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    dt = time.perf_counter() - t0
    print(f"\n8 x 200 increments under {kind}: {dt:.2f} s ({1600 / dt:.0f} locked increments/s)")
    assert int(lockfile.read_bytes()) == 1600
    assert waiting(shared_mount) == 0


# -- suid/sgid with FUSE_HANDLE_KILLPRIV_V2 ---------------------------------------------------
def _run_as(uid: int, gid: int, groups: list[int], fn, *args):
    return run_as(uid, gid, fn, *args, groups=groups)


def _write(dfd, name):
    fd = os.open(name, os.O_WRONLY, dir_fd=dfd)
    os.write(fd, b"y")
    os.close(fd)


def _truncate(dfd, name):
    fd = os.open(name, os.O_WRONLY, dir_fd=dfd)
    os.ftruncate(fd, 3)
    os.close(fd)


def _open_trunc(dfd, name):
    os.close(os.open(name, os.O_WRONLY | os.O_TRUNC, dir_fd=dfd))


def _chown_none(dfd, name):
    os.chown(name, -1, -1, dir_fd=dfd)


def _chgrp(dfd, name):
    os.chown(name, -1, NOBODY, dir_fd=dfd)


SETID_OPS = {"write": _write, "truncate": _truncate, "open_trunc": _open_trunc, "chown": _chown_none,
             "chgrp": _chgrp}
# (mode, file group); the caller is root, or nobody (group nobody, and `users` in some cases)
SETID_FILES = [(0o6777, NOBODY), (0o6767, NOBODY), (0o4777, NOBODY), (0o2777, NOBODY), (0o2767, NOBODY),
               (0o2767, 0), (0o2777, 0), (0o2767, USERS_GID)]
CALLERS = {"root": (0, 0, []), "nobody": (NOBODY, NOBODY, []), "nobody+users": (NOBODY, NOBODY, [USERS_GID])}


def _setid_table(d: Path) -> dict:
    os.chmod(d, 0o777)
    out = {}
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for op, fn in SETID_OPS.items():
            for mode, gid in SETID_FILES:
                for who, (uid, ugid, groups) in CALLERS.items():
                    name = f"{op}-{mode:o}-{gid}-{who}"
                    p = d / name
                    p.write_bytes(b"0123456789")
                    os.chown(p, NOBODY, gid)
                    os.chmod(p, mode)
                    if uid == 0:
                        fn(dfd, name)
                    else:
                        _run_as(uid, ugid, groups, fn, dfd, name)
                    out[name] = oct(stat.S_IMODE(os.stat(p).st_mode))
                    p.unlink()
    finally:
        os.close(dfd)
    return out


def test_setid_semantics_match_linux(shared_mount, tmp_path):
    # With FUSE_HANDLE_KILLPRIV_V2 agentmount clears suid/sgid itself, without it the kernel
    # does: either way the outcome must be Linux's.
    v2 = stats(shared_mount)["info"]["killpriv_v2"]
    fs = shared_mount.ws / "setid"
    fs.mkdir()
    local = tmp_path / "setid"
    local.mkdir()
    os.chmod(tmp_path, 0o755)
    want, got = _setid_table(local), _setid_table(fs)
    diff = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
    assert not diff, f"(local dir, mount) differ with killpriv_v2={v2}: {diff}"
    # The rules themselves, as Linux has them (the local directory says the same):
    assert got["write-6777-65534-nobody"] == "0o777"       # non-root write: suid and sgid+g+x go
    assert got["write-6767-65534-nobody"] == "0o2767"      # sgid without g+x stays (caller in group)
    assert got["write-2767-0-nobody"] == "0o767"           # ... unless the caller is not in the group
    assert got["write-2767-100-nobody+users"] == "0o2767"  # supplementary groups count
    assert got["write-6777-65534-root"] == "0o6777"        # CAP_FSETID keeps them
    assert got["truncate-4777-65534-nobody"] == "0o777"
    assert got["open_trunc-4777-65534-nobody"] == "0o777"
    assert got["chgrp-6777-65534-nobody"] == "0o777"
    assert got["chown-6777-65534-root"] == "0o777"         # chown drops suid even for root
    assert got["chown-6767-65534-root"] == "0o2767"
    fs.rmdir()
