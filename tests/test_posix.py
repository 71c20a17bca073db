"""POSIX behaviour of the mount, checked against the same calls on a local directory.

Most tests run one function against both roots (`Roots.same`) and require the
same value or the same errno. Where the local result is not deterministic
(times, inode numbers) the test checks the property on both roots instead.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import re
import shutil
import stat
import time
from pathlib import Path

import pytest

from agentmount import control
from tests.helpers import NOBODY, run_as, wait_for

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
GiB = 1 << 30

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(ret: int, path) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))


def renameat2(src: Path, dst: Path, flags: int) -> None:
    _check(_libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)), src)


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _check(_libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0), path)


def outcome(fn, *args):
    """("ok", value) or ("err", errno name) of fn(*args)."""
    try:
        return "ok", fn(*args)
    except OSError as e:
        return "err", errno.errorcode.get(e.errno, e.errno)


class Roots:
    """A local directory and a mounted one, both fresh and empty, for the same test."""

    def __init__(self, local: Path, fs: Path) -> None:
        self.local = local
        self.fs = fs

    def each(self, fn):
        """(local outcome, fs outcome) of fn(root)."""
        return outcome(fn, self.local), outcome(fn, self.fs)

    def same(self, fn):
        """Run fn(root) on both; require the same value or errno; return the outcome."""
        loc, fs = self.each(fn)
        assert fs == loc, f"mount gave {fs!r}, local dir gave {loc!r}"
        return fs

    def both(self, fn) -> None:
        """Run fn(root) on both for its assertions (fn raising fails the test)."""
        for root in (self.local, self.fs):
            fn(root)


@pytest.fixture
def roots(shared_mount, tmp_path, request) -> Roots:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    fs = shared_mount.ws / name
    fs.mkdir()
    local = tmp_path / "local"
    local.mkdir()
    for d in (fs, local):
        os.chmod(d, 0o755)
    old = os.umask(0o022)
    yield Roots(local, fs)
    os.umask(old)


def err(e: int) -> tuple[str, str]:
    return "err", errno.errorcode[e]


def ok(v=None) -> tuple[str, object]:
    return "ok", v


def attrs(p: Path, follow: bool = True) -> dict:
    """The comparable part of stat (no times, no inode numbers, no dir sizes, no blocks)."""
    s = os.stat(p, follow_symlinks=follow)
    d = {"fmt": stat.S_IFMT(s.st_mode), "perm": stat.S_IMODE(s.st_mode), "nlink": s.st_nlink,
         "uid": s.st_uid, "gid": s.st_gid}
    if not stat.S_ISDIR(s.st_mode):
        d["size"] = s.st_size
    return d


def write(p: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def status(m) -> dict:
    resp = control.request(str(m.data), {"cmd": "status"})
    assert resp and resp["ok"], resp
    return resp["result"]["workspaces"]["default"]


# -- lookup / getattr / setattr ---------------------------------------------------------------

def test_lookup_getattr(roots):
    def f(r: Path):
        write(r / "f", b"hello")
        (r / "d").mkdir()
        return attrs(r / "f"), attrs(r / "d"), attrs(r)
    assert roots.same(f)[0] == "ok"
    assert roots.same(lambda r: os.stat(r / "missing")) == err(errno.ENOENT)
    assert roots.same(lambda r: os.stat(r / "f" / "x")) == err(errno.ENOTDIR)
    assert roots.same(lambda r: os.stat(r / "d" / ".." / "f").st_size) == ok(5)
    assert roots.same(lambda r: os.stat(r / "d" / "..").st_ino == os.stat(r).st_ino) == ok(True)


def test_chmod_chown(roots):
    def f(r: Path):
        write(r / "f", b"x")
        out = []
        for m in (0o640, 0o4755, 0o2755, 0o1777, 0o000, 0o7777):
            os.chmod(r / "f", m)
            out.append(attrs(r / "f"))
        os.chown(r / "f", 1234, 5678)
        out.append(attrs(r / "f"))
        os.chown(r / "f", -1, 42)
        out.append(attrs(r / "f"))
        (r / "d").mkdir()
        os.chmod(r / "d", 0o3711)
        out.append(attrs(r / "d"))
        return out
    assert roots.same(f)[0] == "ok"


def test_chown_clears_setid(roots):
    def f(r: Path):
        write(r / "f", b"x")
        os.chmod(r / "f", 0o6755)
        os.chown(r / "f", 1000, 1000)
        (r / "d").mkdir()
        os.chmod(r / "d", 0o2755)
        os.chown(r / "d", 1000, 1000)
        return stat.S_IMODE(os.stat(r / "f").st_mode), stat.S_IMODE(os.stat(r / "d").st_mode)
    assert roots.same(f) == ok((0o755, 0o2755))


def test_write_by_other_user_clears_setid(roots):
    def setup(r: Path):
        write(r / "f", b"x")
        os.chmod(r / "f", 0o6777)
    roots.same(setup)

    def w(fd):
        f = os.open("f", os.O_WRONLY | os.O_APPEND, dir_fd=fd)
        os.write(f, b"y")
        os.close(f)
    assert roots.same(as_nobody(w)) == ok(None)
    assert roots.same(lambda r: (stat.S_IMODE(os.stat(r / "f").st_mode), (r / "f").read_bytes())) == \
        ok((0o777, b"xy"))


def test_chmod_setgid_outside_group_is_dropped(roots):
    def setup(r: Path):
        write(r / "f", b"")
        os.chown(r / "f", NOBODY, 0)
    roots.same(setup)
    assert roots.same(as_nobody(lambda fd: os.chmod("f", 0o2755, dir_fd=fd))) == ok(None)
    assert roots.same(lambda r: stat.S_IMODE(os.stat(r / "f").st_mode)) == ok(0o755)


def test_symlink_own_attributes(roots):
    def f(r: Path):
        write(r / "t", b"")
        os.symlink("t", r / "l")
        os.chown(r / "l", 321, 654, follow_symlinks=False)
        os.utime(r / "l", ns=(7_000_000_001, 8_000_000_002), follow_symlinks=False)
        sl, st_ = os.lstat(r / "l"), os.stat(r / "t")
        return (sl.st_uid, sl.st_gid, sl.st_mtime_ns, st_.st_uid, st_.st_mtime_ns == 8_000_000_002)
    assert roots.same(f) == ok((321, 654, 8_000_000_002, 0, False))
    assert roots.same(lambda r: os.setxattr(r / "l", "user.x", b"1", follow_symlinks=False)) == err(errno.EPERM)


def test_mknod_device(roots):
    def f(r: Path):
        os.mknod(r / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.mknod(r / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 9))
        os.mknod(r / "sock", stat.S_IFSOCK | 0o600)
        return [(attrs(r / n), os.stat(r / n).st_rdev) for n in ("null", "blk", "sock")]
    res = roots.same(f)
    assert res[1][0][1] == os.makedev(1, 3) and stat.S_ISCHR(res[1][0][0]["fmt"])


def test_truncate_up_and_down(roots):
    def f(r: Path):
        p = r / "f"
        data = bytes(range(256)) * 40
        write(p, data)
        out = []
        for size in (5000, 100, 0, 3, 200000, 7):
            os.truncate(p, size)
            out.append((os.stat(p).st_size, p.read_bytes()))
        fd = os.open(p, os.O_RDWR)
        try:
            os.write(fd, b"abcdefghij")
            os.ftruncate(fd, 4)
            out.append((os.fstat(fd).st_size, os.pread(fd, 100, 0)))
            os.ftruncate(fd, 9000)
            os.pwrite(fd, b"Z", 8000)
            out.append((os.fstat(fd).st_size, os.pread(fd, 10000, 0)))
        finally:
            os.close(fd)
        out.append(p.read_bytes())
        return out
    assert roots.same(f)[0] == "ok"
    assert roots.same(lambda r: os.truncate(r / "missing", 0)) == err(errno.ENOENT)
    assert roots.same(lambda r: os.truncate(r, 0)) == err(errno.EISDIR)


def test_truncate_updates_mtime(roots):
    def f(r: Path):
        p = r / "f"
        write(p, b"0123456789")
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
        os.truncate(p, 3)
        s = os.stat(p)
        return s.st_mtime_ns > 1_000_000_000, s.st_ctime_ns > 1_000_000_000
    assert roots.same(f) == ok((True, True))


def test_utimens_nanoseconds(roots):
    def f(r: Path):
        p = r / "f"
        write(p, b"x")
        out = []
        for at, mt in ((1_234_567_890_123_456_789, 987_654_321_987_654_321), (1, 999_999_999), (0, 0),
                       (1_700_000_000_000_000_001, 1_700_000_000_000_000_002)):
            os.utime(p, ns=(at, mt))
            s = os.stat(p)
            out.append((s.st_atime_ns, s.st_mtime_ns))
        (r / "d").mkdir()
        os.utime(r / "d", ns=(5_000_000_007, 6_000_000_009))
        s = os.stat(r / "d")
        out.append((s.st_atime_ns, s.st_mtime_ns))
        return out
    assert roots.same(f)[0] == "ok"


def test_utimens_now_and_omit(roots):
    def f(r: Path):
        p = r / "f"
        write(p, b"x")
        os.utime(p, ns=(111_000_000_111, 222_000_000_222))
        utimensat(p, (0, UTIME_OMIT), (333, 444))
        s = os.stat(p)
        out = [(s.st_atime_ns, s.st_mtime_ns)]
        utimensat(p, (555, 666), (0, UTIME_OMIT))
        s = os.stat(p)
        out.append((s.st_atime_ns, s.st_mtime_ns))
        before = time.time_ns()
        utimensat(p, (0, UTIME_OMIT), (0, UTIME_NOW))
        s = os.stat(p)
        out.append((s.st_atime_ns, before - 50_000_000 <= s.st_mtime_ns <= time.time_ns() + 50_000_000))
        utimensat(p, (0, UTIME_NOW), (0, UTIME_OMIT))
        s2 = os.stat(p)
        out.append((before - 50_000_000 <= s2.st_atime_ns <= time.time_ns() + 50_000_000,
                    s2.st_mtime_ns == s.st_mtime_ns))
        os.utime(p)  # both now
        s3 = os.stat(p)
        out.append(s3.st_mtime_ns >= s.st_mtime_ns)
        return out
    assert roots.same(f) == ok([(111_000_000_111, 333 * 10**9 + 444), (555 * 10**9 + 666, 333 * 10**9 + 444),
                                (555 * 10**9 + 666, True), (True, True), True])


def test_times_with_unflushed_writes(roots):
    def f(r: Path):
        p = r / "f"
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        fd2 = -1
        try:
            os.write(fd, b"x" * 100)
            os.utime(p, ns=(5, 10**9 + 7))  # set while data is still buffered
            a = os.stat(p).st_mtime_ns
            fd2 = os.open(p, os.O_RDWR | os.O_APPEND)
            os.write(fd2, b"APP")
            b = os.stat(p).st_size
            os.ftruncate(fd, 50)
            os.write(fd2, b"Z")
            os.close(fd2)
            fd2 = -1
            os.utime(p, ns=(5, 10**9 + 9))
        finally:
            os.close(fd)
            if fd2 >= 0:
                os.close(fd2)
        s_ = os.stat(p)
        return a, b, s_.st_mtime_ns, s_.st_size, p.read_bytes()[-3:]
    assert roots.same(f) == ok((10**9 + 7, 103, 10**9 + 9, 51, b"xxZ"))


@pytest.mark.parametrize("op", ["chmod", "chown", "write", "link", "rename", "unlink_other_link", "setxattr",
                                "truncate", "utime"])
def test_ctime_updates(roots, op):
    def f(r: Path):
        p = r / "f"
        write(p, b"data")
        os.utime(p, ns=(10**9, 10**9))
        before = os.stat(p).st_ctime_ns
        if op == "chmod":
            os.chmod(p, 0o600)
        elif op == "chown":
            os.chown(p, 77, 77)
        elif op == "write":
            with open(p, "r+b") as fh:
                fh.write(b"DA")
        elif op == "link":
            os.link(p, r / "g")
        elif op == "rename":
            os.rename(p, r / "g")
            p = r / "g"
        elif op == "unlink_other_link":
            os.link(p, r / "g")
            before = os.stat(p).st_ctime_ns
            os.unlink(r / "g")
        elif op == "setxattr":
            os.setxattr(p, "user.k", b"v")
        elif op == "truncate":
            os.truncate(p, 1)
        elif op == "utime":
            os.utime(p, ns=(2 * 10**9, 2 * 10**9))
        return os.stat(p).st_ctime_ns > before
    assert roots.same(f) == ok(True)


def test_write_updates_mtime_and_dir_times(roots):
    def f(r: Path):
        p = r / "f"
        write(p, b"data")
        os.utime(p, ns=(10**9, 10**9))
        os.utime(r, ns=(10**9, 10**9))
        with open(p, "ab") as fh:
            fh.write(b"more")
        file_m = os.stat(p).st_mtime_ns > 10**9
        dir_m1 = os.stat(r).st_mtime_ns == 10**9
        (r / "new").touch()
        dir_m2 = os.stat(r).st_mtime_ns > 10**9
        out = [file_m, dir_m1, dir_m2]
        (r / "sub").mkdir()
        (r / "other").mkdir()
        for op in (lambda: os.unlink(r / "new"), lambda: os.rename(r / "f", r / "sub" / "f"),
                   lambda: os.rename(r / "sub" / "f", r / "sub" / "g"), lambda: os.rmdir(r / "other"),
                   lambda: os.link(r / "sub" / "g", r / "h"), lambda: os.symlink("x", r / "sub" / "s")):
            for d in (r, r / "sub"):
                os.utime(d, ns=(10**9, 10**9))
            before = [os.stat(d).st_ctime_ns for d in (r, r / "sub")]
            op()
            out.append([(os.stat(d).st_mtime_ns > 10**9, os.stat(d).st_ctime_ns > b)
                        for d, b in zip((r, r / "sub"), before)])
        return out
    t, f_ = (True, True), (False, False)
    assert roots.same(f) == ok([True, True, True, [t, f_], [t, t], [f_, t], [t, f_], [t, f_], [f_, t]])


# -- mknod / mkdir / rmdir / unlink -------------------------------------------------------------

def test_mknod_regular_and_fifo(roots):
    def f(r: Path):
        os.mknod(r / "reg", stat.S_IFREG | 0o640)
        os.mkfifo(r / "fifo", 0o600)
        out = [attrs(r / "reg"), attrs(r / "fifo"), stat.S_ISFIFO(os.stat(r / "fifo").st_mode)]
        rd = os.open(r / "fifo", os.O_RDONLY | os.O_NONBLOCK)
        wr = os.open(r / "fifo", os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(wr, b"through the pipe")
            out.append(os.read(rd, 100))
        finally:
            os.close(wr)
            os.close(rd)
        out.append((r / "reg").read_bytes())
        return out
    assert roots.same(f)[1][2] is True
    assert roots.same(lambda r: os.mknod(r / "reg", stat.S_IFREG | 0o600)) == err(errno.EEXIST)
    assert roots.same(lambda r: os.mkfifo(r / "fifo")) == err(errno.EEXIST)
    assert roots.same(lambda r: os.mknod(r / "nodir" / "x", stat.S_IFREG)) == err(errno.ENOENT)


def test_mkdir(roots):
    def f(r: Path):
        (r / "a").mkdir(0o750)
        (r / "a" / "b").mkdir()
        (r / "a" / "c").mkdir()
        return attrs(r / "a"), attrs(r / "a" / "b"), os.listdir(r / "a").__len__()
    assert roots.same(f) == ok(({"fmt": stat.S_IFDIR, "perm": 0o750, "nlink": 4, "uid": 0, "gid": 0},
                                {"fmt": stat.S_IFDIR, "perm": 0o755, "nlink": 2, "uid": 0, "gid": 0}, 2))
    assert roots.same(lambda r: os.mkdir(r / "a")) == err(errno.EEXIST)
    assert roots.same(lambda r: os.mkdir(r / "x" / "y")) == err(errno.ENOENT)
    write(roots.local / "file", b"")
    write(roots.fs / "file", b"")
    assert roots.same(lambda r: os.mkdir(r / "file" / "y")) == err(errno.ENOTDIR)
    assert roots.same(lambda r: os.mkdir(r / "file")) == err(errno.EEXIST)


def test_mkdir_setgid_inherits(roots):
    def f(r: Path):
        (r / "g").mkdir()
        os.chown(r / "g", 0, 4242)
        os.chmod(r / "g", 0o2775)
        (r / "g" / "sub").mkdir()
        write(r / "g" / "file", b"")
        return attrs(r / "g" / "sub"), attrs(r / "g" / "file")
    assert roots.same(f)[1][0]["gid"] == 4242


def test_rmdir(roots):
    def setup(r: Path):
        (r / "full").mkdir()
        write(r / "full" / "x", b"")
        (r / "empty").mkdir()
        write(r / "file", b"")
        return attrs(r)["nlink"]
    assert roots.same(setup) == ok(4)
    assert roots.same(lambda r: os.rmdir(r / "full")) == err(errno.ENOTEMPTY)
    assert roots.same(lambda r: os.rmdir(r / "file")) == err(errno.ENOTDIR)
    assert roots.same(lambda r: os.rmdir(r / "missing")) == err(errno.ENOENT)
    assert roots.same(lambda r: os.rmdir(os.path.join(r, "empty", "."))) == err(errno.EINVAL)
    assert roots.same(lambda r: os.rmdir(os.path.join(r, "empty", ".."))) == err(errno.ENOTEMPTY)
    assert roots.same(lambda r: os.rmdir(r / "file" / "x")) == err(errno.ENOTDIR)
    assert roots.same(lambda r: (os.rmdir(r / "empty"), attrs(r)["nlink"], os.path.exists(r / "empty"))) == \
        ok((None, 3, False))
    assert roots.same(lambda r: (os.unlink(r / "full" / "x"), os.rmdir(r / "full"), sorted(os.listdir(r)))) == \
        ok((None, None, ["file"]))


def test_unlink(roots):
    def setup(r: Path):
        (r / "d").mkdir()
        write(r / "f", b"x")
    roots.same(setup)
    assert roots.same(lambda r: os.unlink(r / "d")) == err(errno.EISDIR)
    assert roots.same(lambda r: os.unlink(r / "missing")) == err(errno.ENOENT)
    assert roots.same(lambda r: os.unlink(r / "f" / "x")) == err(errno.ENOTDIR)
    assert roots.same(lambda r: (os.unlink(r / "f"), os.path.lexists(r / "f"), os.listdir(r))) == \
        ok((None, False, ["d"]))
    assert roots.same(lambda r: os.unlink(r / "f")) == err(errno.ENOENT)


# -- symlinks ----------------------------------------------------------------------------------

def test_symlink_readlink(roots):
    def f(r: Path):
        write(r / "target", b"pointed at")
        os.symlink("target", r / "rel")
        os.symlink("does/not/exist", r / "dangling")
        os.symlink("x" * 1000, r / "long")
        (r / "d").mkdir()
        os.symlink("../target", r / "d" / "up")
        s = os.lstat(r / "rel")
        return [os.readlink(r / "rel"), os.readlink(r / "dangling"), os.readlink(r / "long"),
                stat.S_ISLNK(s.st_mode), stat.S_IMODE(s.st_mode), s.st_size, os.lstat(r / "long").st_size,
                (r / "rel").read_bytes(), (r / "d" / "up").read_bytes(), attrs(r / "rel"),
                os.path.exists(r / "dangling"), os.path.lexists(r / "dangling")]
    assert roots.same(f)[1][3] is True
    assert roots.same(lambda r: os.readlink(r / "target")) == err(errno.EINVAL)
    assert roots.same(lambda r: os.readlink(r / "missing")) == err(errno.ENOENT)
    assert roots.same(lambda r: os.symlink("x", r / "rel")) == err(errno.EEXIST)
    assert roots.same(lambda r: os.stat(r / "dangling")) == err(errno.ENOENT)
    assert roots.same(lambda r: open(r / "dangling" / "x")) == err(errno.ENOENT)
    assert roots.same(lambda r: (os.unlink(r / "rel"), (r / "target").read_bytes())) == ok((None, b"pointed at"))


# -- rename ------------------------------------------------------------------------------------

def test_rename_replace(roots):
    def f(r: Path):
        write(r / "a", b"AAA")
        write(r / "b", b"BBBBBB")
        ino = os.stat(r / "a").st_ino
        os.rename(r / "a", r / "b")
        return (sorted(os.listdir(r)), (r / "b").read_bytes(), os.stat(r / "b").st_ino == ino,
                attrs(r / "b"))
    assert roots.same(f) == ok((["b"], b"AAA", True,
                                {"fmt": stat.S_IFREG, "perm": 0o644, "nlink": 1, "uid": 0, "gid": 0, "size": 3}))
    assert roots.same(lambda r: os.rename(r / "missing", r / "c")) == err(errno.ENOENT)
    assert roots.same(lambda r: os.rename(r / "b", r / "nodir" / "c")) == err(errno.ENOENT)


def test_rename_replaced_file_stays_open(roots):
    def f(r: Path):
        write(r / "a", b"new")
        write(r / "b", b"old contents")
        fd = os.open(r / "b", os.O_RDONLY)
        try:
            os.rename(r / "a", r / "b")
            return os.fstat(fd).st_nlink, os.pread(fd, 100, 0), (r / "b").read_bytes()
        finally:
            os.close(fd)
    assert roots.same(f) == ok((0, b"old contents", b"new"))


def test_rename_noreplace(roots):
    def setup(r: Path):
        write(r / "a", b"A")
        write(r / "b", b"B")
    roots.same(setup)
    assert roots.same(lambda r: renameat2(r / "a", r / "b", RENAME_NOREPLACE)) == err(errno.EEXIST)
    assert roots.same(lambda r: ((r / "a").read_bytes(), (r / "b").read_bytes())) == ok((b"A", b"B"))
    assert roots.same(lambda r: (renameat2(r / "a", r / "c", RENAME_NOREPLACE), sorted(os.listdir(r)))) == \
        ok((None, ["b", "c"]))
    assert roots.same(lambda r: renameat2(r / "b", r / "c", RENAME_NOREPLACE | RENAME_EXCHANGE)) == \
        err(errno.EINVAL)


def test_rename_exchange(roots):
    def f(r: Path):
        write(r / "a", b"A")
        (r / "d").mkdir()
        write(r / "d" / "inner", b"I")
        (r / "e").mkdir()
        ia, idd = os.stat(r / "a").st_ino, os.stat(r / "d").st_ino
        renameat2(r / "a", r / "d", RENAME_EXCHANGE)
        out = [stat.S_ISDIR(os.stat(r / "a").st_mode), (r / "d").read_bytes(), (r / "a" / "inner").read_bytes(),
               os.stat(r / "a").st_ino == idd, os.stat(r / "d").st_ino == ia]
        # a directory swapped across directories changes both parents' link counts
        write(r / "e" / "f", b"F")
        renameat2(r / "a", r / "e" / "f", RENAME_EXCHANGE)
        out += [attrs(r)["nlink"], attrs(r / "e")["nlink"], (r / "a").read_bytes(),
                (r / "e" / "f" / "inner").read_bytes(), os.stat(r / "e" / "f" / "..").st_ino == os.stat(r / "e").st_ino]
        return out
    assert roots.same(f) == ok([True, b"A", b"I", True, True, 3, 3, b"F", b"I", True])
    assert roots.same(lambda r: renameat2(r / "a", r / "missing", RENAME_EXCHANGE)) == err(errno.ENOENT)
    assert roots.same(lambda r: renameat2(r / "e", r / "e" / "f" / "inner", RENAME_EXCHANGE)) == \
        err(errno.EINVAL)


def test_rename_directories(roots):
    def setup(r: Path):
        for d in ("src", "empty", "full", "src/sub"):
            (r / d).mkdir()
        write(r / "full" / "x", b"")
        write(r / "file", b"F")
        return attrs(r)["nlink"]
    assert roots.same(setup) == ok(5)
    assert roots.same(lambda r: os.rename(r / "file", r / "empty")) == err(errno.EISDIR)
    assert roots.same(lambda r: os.rename(r / "src", r / "file")) == err(errno.ENOTDIR)
    assert roots.same(lambda r: os.rename(r / "src", r / "src" / "sub" / "inside")) == err(errno.EINVAL)
    assert roots.same(lambda r: os.rename(r / "src", r / "src" / "inside")) == err(errno.EINVAL)
    assert roots.same(lambda r: os.rename(r / "src", r / "full")) == err(errno.ENOTEMPTY)
    assert roots.same(lambda r: os.rename(r / "full", r / "full" / "x")) == err(errno.EINVAL)
    assert roots.same(lambda r: (os.rename(r / "src", r / "empty"), sorted(os.listdir(r)),
                                 os.listdir(r / "empty"), attrs(r)["nlink"])) == \
        ok((None, ["empty", "file", "full"], ["sub"], 4))

    def move_down(r: Path):
        os.rename(r / "empty", r / "full" / "moved")
        return (attrs(r)["nlink"], attrs(r / "full")["nlink"],
                os.stat(r / "full" / "moved" / "..").st_ino == os.stat(r / "full").st_ino,
                os.listdir(r / "full" / "moved"))
    assert roots.same(move_down) == ok((3, 3, True, ["sub"]))

    def over_empty_elsewhere(r: Path):
        (r / "target").mkdir()
        os.rename(r / "full" / "moved" / "sub", r / "target")
        return (attrs(r)["nlink"], attrs(r / "full" / "moved")["nlink"],
                os.stat(r / "target" / "..").st_ino == os.stat(r).st_ino)
    assert roots.same(over_empty_elsewhere) == ok((4, 2, True))
    assert roots.same(lambda r: os.rename(r / "full" / "moved", r / "full" / "moved")) == ok(None)


def test_rename_hard_links_same_inode_is_noop(roots):
    def f(r: Path):
        write(r / "a", b"data")
        os.link(r / "a", r / "b")
        os.rename(r / "a", r / "b")
        return sorted(os.listdir(r)), os.stat(r / "a").st_nlink, (r / "b").read_bytes()
    assert roots.same(f) == ok((["a", "b"], 2, b"data"))


# -- hard links --------------------------------------------------------------------------------

def test_hard_links(roots):
    def f(r: Path):
        write(r / "a", b"shared")
        out = [os.stat(r / "a").st_nlink]
        os.link(r / "a", r / "b")
        (r / "d").mkdir()
        os.link(r / "a", r / "d" / "c")
        out.append(os.stat(r / "a").st_nlink)
        with open(r / "d" / "c", "ab") as fh:
            fh.write(b"+more")
        out.append((r / "b").read_bytes())
        os.unlink(r / "a")
        out.append((os.stat(r / "b").st_nlink, os.stat(r / "d" / "c").st_nlink))
        os.unlink(r / "b")
        out.append((os.stat(r / "d" / "c").st_nlink, (r / "d" / "c").read_bytes()))
        out.append(os.stat(r / "d" / "c").st_ino == os.stat(r / "d" / "c").st_ino)
        return out
    assert roots.same(f) == ok([1, 3, b"shared+more", (2, 2), (1, b"shared+more"), True])
    assert roots.same(lambda r: os.link(r / "d", r / "d2")) == err(errno.EPERM)
    assert roots.same(lambda r: os.link(r / "d" / "c", r / "d" / "c")) == err(errno.EEXIST)
    assert roots.same(lambda r: os.link(r / "missing", r / "x")) == err(errno.ENOENT)
    assert roots.same(lambda r: os.link(r / "d" / "c", r / "nodir" / "x")) == err(errno.ENOENT)


# -- open / create / read / write --------------------------------------------------------------

def test_open_create_flags(roots):
    def f(r: Path):
        fd = os.open(r / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, b"0123456789")
        os.close(fd)
        return attrs(r / "f")
    assert roots.same(f) == ok({"fmt": stat.S_IFREG, "perm": 0o640, "nlink": 1, "uid": 0, "gid": 0, "size": 10})
    assert roots.same(lambda r: os.open(r / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL)) == err(errno.EEXIST)
    (roots.local / "d").mkdir()
    (roots.fs / "d").mkdir()
    assert roots.same(lambda r: os.open(r / "d", os.O_WRONLY | os.O_CREAT | os.O_EXCL)) == err(errno.EEXIST)
    assert roots.same(lambda r: os.open(r / "d", os.O_RDWR)) == err(errno.EISDIR)
    assert roots.same(lambda r: os.open(r / "f", os.O_RDONLY | os.O_DIRECTORY)) == err(errno.ENOTDIR)
    assert roots.same(lambda r: os.open(r / "missing", os.O_RDONLY)) == err(errno.ENOENT)

    def trunc(r: Path):
        fd = os.open(r / "f", os.O_RDWR | os.O_TRUNC)
        try:
            size = os.fstat(fd).st_size
            os.write(fd, b"ab")
            return size, os.pread(fd, 100, 0)
        finally:
            os.close(fd)
    assert roots.same(trunc) == ok((0, b"ab"))

    def append(r: Path):
        fd = os.open(r / "f", os.O_WRONLY | os.O_APPEND)
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, b"cd")
            os.pwrite(fd, b"ef", 0)  # Linux: O_APPEND wins over pwrite's offset
            pos = os.lseek(fd, 0, os.SEEK_CUR)
        finally:
            os.close(fd)
        with open(r / "f", "ab") as fh:
            fh.write(b"gh")
        return pos, (r / "f").read_bytes()
    assert roots.same(append) == ok((4, b"abcdefgh"))

    def rdonly_trunc(r: Path):
        os.close(os.open(r / "f", os.O_RDONLY | os.O_TRUNC))  # Linux truncates even read-only opens
        return os.stat(r / "f").st_size
    assert roots.same(rdonly_trunc) == ok(0)
    write(roots.local / "f", b"abcdefgh")
    write(roots.fs / "f", b"abcdefgh")

    def create_existing(r: Path):
        fd = os.open(r / "f", os.O_RDWR | os.O_CREAT, 0o600)  # no O_EXCL: opens, keeps mode and data
        try:
            return os.pread(fd, 3, 0), attrs(r / "f")["perm"]
        finally:
            os.close(fd)
    assert roots.same(create_existing) == ok((b"abc", 0o640))


def test_read_write_offsets(roots):
    import random
    rnd = random.Random(7)
    ops = [(rnd.randrange(0, 300_000), rnd.randbytes(rnd.randrange(1, 20_000))) for _ in range(60)]

    def f(r: Path):
        fd = os.open(r / "f", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for off, data in ops:
                assert os.pwrite(fd, data, off) == len(data)
            size = os.fstat(fd).st_size
            reads = [os.pread(fd, n, off) for off, n in ((0, 10), (4095, 2), (size - 5, 100), (size, 10),
                                                          (size + 1000, 10), (123_456, 70_000))]
            full = os.pread(fd, size + 10, 0)
        finally:
            os.close(fd)
        return size, reads, full, (r / "f").read_bytes()
    assert roots.same(f)[0] == "ok"
    assert roots.same(lambda r: os.read(os.open(r / "missing", os.O_RDONLY), 1)) == err(errno.ENOENT)

    def bad_fd_mode(r: Path):
        fd = os.open(r / "f", os.O_RDONLY)
        try:
            return os.write(fd, b"x")
        finally:
            os.close(fd)
    assert roots.same(bad_fd_mode) == err(errno.EBADF)


def test_sparse_file(roots):
    def f(r: Path):
        fd = os.open(r / "f", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"start", 0)
            os.pwrite(fd, b"middle", 3 << 20)
            os.pwrite(fd, b"end", (70 << 20) + 11)  # past the first 64 MiB chunk
            size = os.fstat(fd).st_size
            out = [size, os.pread(fd, 10, 0), os.pread(fd, 4096, 1 << 20) == bytes(4096),
                   os.pread(fd, 16, (3 << 20) - 5), os.pread(fd, 8, (70 << 20) + 8),
                   os.pread(fd, 1 << 20, 64 << 20) == bytes(1 << 20)]
        finally:
            os.close(fd)
        os.truncate(r / "f", (80 << 20))
        with open(r / "f", "rb") as fh:
            fh.seek((70 << 20) + 11)
            out.append(fh.read(10))
        return out
    assert roots.same(f) == ok([(70 << 20) + 14, b"start\0\0\0\0\0", True, b"\0" * 5 + b"middle" + b"\0" * 5,
                                b"\0\0\0end", True, b"end" + b"\0" * 7])


def test_file_over_4gib(roots):
    off = 5 * GiB

    def f(r: Path):
        fd = os.open(r / "big", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"far away", off)
            out = [os.fstat(fd).st_size, os.pread(fd, 100, off), os.pread(fd, 8, off - 4),
                   os.pread(fd, 16, 4 * GiB - 8) == bytes(16), os.pread(fd, 64, 0) == bytes(64)]
            os.pwrite(fd, b"X", 4 * GiB)
            out.append(os.pread(fd, 3, 4 * GiB - 1))
        finally:
            os.close(fd)
        out.append(os.stat(r / "big").st_size)
        with open(r / "big", "rb") as fh:
            fh.seek(off - 2)
            out.append(fh.read())
        os.truncate(r / "big", 4 * GiB + 1)
        out.append((os.stat(r / "big").st_size, (r / "big").open("rb").read(0)))
        with open(r / "big", "rb") as fh:
            fh.seek(4 * GiB - 1)
            out.append(fh.read())
        return out
    assert roots.same(f) == ok([off + 8, b"far away", b"\0\0\0\0far ", True, True, b"\0X\0", off + 8,
                                b"\0\0far away", (4 * GiB + 1, b""), b"\0X"])


# -- flush / release / fsync / fsyncdir --------------------------------------------------------

def test_fsync_fsyncdir(roots):
    def f(r: Path):
        fd = os.open(r / "f", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"synced")
            os.fsync(fd)
            os.fdatasync(fd)
            os.write(fd, b"+again")
            os.fsync(fd)
        finally:
            os.close(fd)
        (r / "sub").mkdir()
        dfd = os.open(r, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
            os.fdatasync(dfd)
        finally:
            os.close(dfd)
        dup_a = os.open(r / "f", os.O_RDWR)
        dup_b = os.dup(dup_a)
        os.write(dup_a, b"XY")
        os.close(dup_a)  # flush on a dup: the data is visible, the other fd still works
        os.write(dup_b, b"Z")
        os.close(dup_b)
        return (r / "f").read_bytes()
    assert roots.same(f) == ok(b"XYZced+again")


def test_fsync_durable_across_crash(mount):
    fd = os.open(mount.ws / "f", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"durable bytes")
    os.fsync(fd)
    os.mkdir(mount.ws / "d")
    os.rename(mount.ws / "f", mount.ws / "d" / "g")
    dfd = os.open(mount.ws / "d", os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    mount.kill()
    with contextlib.suppress(OSError):  # the connection is gone
        os.close(fd)
    mount.mount()
    assert (mount.ws / "d" / "g").read_bytes() == b"durable bytes"
    assert os.listdir(mount.ws) == ["d"]


# -- readdir -----------------------------------------------------------------------------------

def _name(i: int, tag: str) -> str:
    return f"{tag}{i:04d}-" + "n" * 200  # long names: one getdents buffer holds only part of the dir


def test_readdir_stable_while_changing(roots):
    def f(r: Path):
        d = r / "big"
        d.mkdir()
        orig = {_name(i, "e") for i in range(300)}
        for n in orig:
            os.mknod(d / n)  # no open/close: close() waits for durability, mknod need not
        removed = {_name(i, "e") for i in range(0, 300, 3)}  # spread over read and unread parts
        seen: list[str] = []
        with os.scandir(d) as it:
            for i, e in enumerate(it):
                seen.append(e.name)
                if i == 60:
                    for n in removed:
                        os.unlink(d / n)
                    for j in range(100):
                        os.mknod(d / _name(j, "new"))
                if i == 150:
                    for j in range(100, 150):
                        os.mknod(d / _name(j, "new"))
        assert len(seen) == len(set(seen)), "duplicated entries"
        created = {_name(j, "new") for j in range(150)}
        assert set(seen) <= orig | created, "entries that never existed"
        missing = (orig - removed) - set(seen)
        assert not missing, f"{len(missing)} entries skipped"
        after = set(os.listdir(d))
        return len(missing), len(after), after == (orig - removed) | created
    assert roots.same(f) == ok((0, 350, True))


def test_readdir_contents(roots):
    def f(r: Path):
        (r / "d").mkdir()
        write(r / "f", b"")
        os.symlink("f", r / "l")
        os.mkfifo(r / "p")
        with os.scandir(r) as it:
            ents = sorted((e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False),
                           e.is_symlink(), e.inode() == os.lstat(e.path).st_ino) for e in it)
        return ents
    assert roots.same(f)[0] == "ok"
    assert roots.same(lambda r: os.listdir(r / "f")) == err(errno.ENOTDIR)
    assert roots.same(lambda r: os.listdir(r / "missing")) == err(errno.ENOENT)


# -- statfs ------------------------------------------------------------------------------------

def test_statvfs(roots):
    for p in (roots.fs, roots.fs.parent, roots.fs.parent.parent):
        s = os.statvfs(p)
        assert s.f_namemax == 255
        assert s.f_bsize > 0 and s.f_frsize > 0
        assert s.f_blocks >= s.f_bfree >= s.f_bavail >= 0 and s.f_blocks > 0
        assert s.f_files >= s.f_ffree >= 0 and s.f_files > 0
    s = os.statvfs(roots.local)
    assert roots.same(lambda r: os.statvfs(r / "missing")) == err(errno.ENOENT)
    assert s.f_namemax == os.statvfs(roots.fs).f_namemax

    def used_inodes(r: Path) -> int:
        v = os.statvfs(r)
        return v.f_files - v.f_ffree

    def grows(r: Path) -> int:
        before = used_inodes(r)
        for i in range(3):
            os.mknod(r / f"n{i}")
        return used_inodes(r) - before
    assert grows(roots.fs) == 3  # the local fs is shared with the whole host: not deterministic there


# -- xattrs ------------------------------------------------------------------------------------

def test_xattrs(roots):
    def f(r: Path):
        write(r / "f", b"")
        (r / "d").mkdir()
        out = []
        for p in (r / "f", r / "d"):
            os.setxattr(p, "user.a", b"1")
            os.setxattr(p, "user.b", b"")
            os.setxattr(p, "user.bin", bytes(range(256)) * 10)
            os.setxattr(p, "user.a", b"22")
            out.append((os.getxattr(p, "user.a"), os.getxattr(p, "user.b"), os.getxattr(p, "user.bin")[:300],
                        sorted(x for x in os.listxattr(p) if x.startswith("user."))))
            os.removexattr(p, "user.b")
            os.setxattr(p, "user.c", b"new", os.XATTR_CREATE)
            os.setxattr(p, "user.c", b"replaced", os.XATTR_REPLACE)
            out.append((os.getxattr(p, "user.c"), sorted(x for x in os.listxattr(p) if x.startswith("user."))))
        return out
    assert roots.same(f)[0] == "ok"
    assert roots.same(lambda r: os.setxattr(r / "f", "user.a", b"x", os.XATTR_CREATE)) == err(errno.EEXIST)
    assert roots.same(lambda r: os.setxattr(r / "f", "user.zz", b"x", os.XATTR_REPLACE)) == err(errno.ENODATA)
    assert roots.same(lambda r: os.getxattr(r / "f", "user.missing")) == err(errno.ENODATA)
    assert roots.same(lambda r: os.removexattr(r / "f", "user.missing")) == err(errno.ENODATA)
    assert roots.same(lambda r: os.setxattr(r / "f", "bogus.ns", b"x")) == err(errno.EOPNOTSUPP)
    assert roots.same(lambda r: (os.setxattr(r / "f", "trusted.t", b"root"), os.getxattr(r / "f", "trusted.t"))) \
        == ok((None, b"root"))
    assert roots.same(lambda r: os.removexattr(r / "f", "user.b")) == err(errno.ENODATA)
    assert roots.same(lambda r: os.getxattr(r / "missing", "user.a")) == err(errno.ENOENT)
    assert roots.same(lambda r: os.getxattr(r / "f", "user.a")) == ok(b"22")
    assert roots.same(lambda r: os.setxattr(r / "f", "user." + "k" * 251, b"v")) == err(errno.ERANGE)
    assert roots.same(lambda r: (os.setxattr(r / "f", "user." + "k" * 250, b"v"),
                                 os.getxattr(r / "f", "user." + "k" * 250))) == ok((None, b"v"))


def test_xattrs_survive_remount(mount):
    p = mount.ws / "f"
    write(p, b"")
    os.setxattr(p, "user.keep", b"value")
    os.setxattr(p, "user.gone", b"x")
    os.removexattr(p, "user.gone")
    mount.remount()
    assert os.getxattr(p, "user.keep") == b"value"
    assert sorted(os.listxattr(p)) == ["user.keep"]


# -- permissions for non-root users ------------------------------------------------------------

def as_nobody(fn):
    """A function of a root that runs fn(dir_fd of root) as nobody (the fd skips 0700 ancestors)."""
    def run(root: Path):
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return run_as(NOBODY, NOBODY, fn, fd)
        finally:
            os.close(fd)
    return run


def test_permissions_non_root(roots):
    def setup(r: Path):
        write(r / "secret", b"root only", 0o600)
        os.chmod(r / "secret", 0o600)
        write(r / "public", b"everyone", 0o644)
        (r / "rootdir").mkdir(0o755)
        (r / "sticky").mkdir()
        os.chmod(r / "sticky", 0o1777)
        write(r / "sticky" / "rootfile", b"")
        (r / "open").mkdir()
        os.chmod(r / "open", 0o777)
        write(r / "open" / "rootfile", b"")
        write(r / "world", b"", 0o666)
        os.chmod(r / "world", 0o666)
    roots.same(setup)

    def read(fd):
        return os.read(os.open("secret", os.O_RDONLY, dir_fd=fd), 100)
    assert roots.same(as_nobody(read)) == err(errno.EACCES)
    assert roots.same(as_nobody(lambda fd: os.read(os.open("public", os.O_RDONLY, dir_fd=fd), 100))) == \
        ok(b"everyone")
    assert roots.same(as_nobody(lambda fd: os.open("public", os.O_WRONLY, dir_fd=fd))) == err(errno.EACCES)
    assert roots.same(as_nobody(lambda fd: os.open("rootdir/new", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))) \
        == err(errno.EACCES)
    assert roots.same(as_nobody(lambda fd: os.mkdir("rootdir/new", dir_fd=fd))) == err(errno.EACCES)
    assert roots.same(as_nobody(lambda fd: os.unlink("public", dir_fd=fd))) == err(errno.EACCES)
    assert roots.same(as_nobody(lambda fd: os.rename("public", "moved", src_dir_fd=fd, dst_dir_fd=fd))) == \
        err(errno.EACCES)
    assert roots.same(as_nobody(lambda fd: os.chmod("public", 0o777, dir_fd=fd))) == err(errno.EPERM)
    assert roots.same(as_nobody(lambda fd: os.chown("public", NOBODY, NOBODY, dir_fd=fd))) == err(errno.EPERM)
    assert roots.same(as_nobody(lambda fd: os.utime("public", ns=(1, 1), dir_fd=fd))) == err(errno.EPERM)
    assert roots.same(as_nobody(lambda fd: os.utime("public", dir_fd=fd))) == err(errno.EACCES)
    assert roots.same(as_nobody(lambda fd: os.utime("world", dir_fd=fd))) == ok(None)
    assert roots.same(as_nobody(lambda fd: os.truncate(f"/proc/self/fd/{fd}/public", 0))) == err(errno.EACCES)
    assert roots.same(as_nobody(lambda fd: os.setxattr(f"/proc/self/fd/{fd}/public", "user.x", b"1"))) == \
        err(errno.EACCES)

    # sticky directory: others' files cannot be removed or renamed, one's own can
    assert roots.same(as_nobody(lambda fd: os.unlink("sticky/rootfile", dir_fd=fd))) == err(errno.EPERM)
    assert roots.same(as_nobody(lambda fd: os.rename("sticky/rootfile", "sticky/x", src_dir_fd=fd,
                                                     dst_dir_fd=fd))) == err(errno.EPERM)
    assert roots.same(as_nobody(lambda fd: os.unlink("open/rootfile", dir_fd=fd))) == ok(None)

    def own(fd):
        f = os.open("sticky/mine", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
        os.write(f, b"mine")
        os.close(f)
        st_ = os.stat("sticky/mine", dir_fd=fd)
        os.chmod("sticky/mine", 0o640, dir_fd=fd)
        os.rename("sticky/mine", "sticky/mine2", src_dir_fd=fd, dst_dir_fd=fd)
        os.unlink("sticky/mine2", dir_fd=fd)
        return st_.st_uid, st_.st_gid, stat.S_IMODE(st_.st_mode)
    assert roots.same(as_nobody(own)) == ok((NOBODY, NOBODY, 0o600))

    def w(fd):
        f = os.open("world", os.O_WRONLY, dir_fd=fd)
        try:
            return os.write(f, b"nobody was here")
        finally:
            os.close(f)
    assert roots.same(as_nobody(w)) == ok(15)
    assert roots.same(lambda r: ((r / "world").read_bytes(), attrs(r / "world")["uid"])) == \
        ok((b"nobody was here", 0))


def test_access_results(roots):
    modes = (0o000, 0o400, 0o600, 0o644, 0o666, 0o755, 0o711, 0o604, 0o060, 0o007)

    def setup(r: Path):
        for m in modes:
            write(r / f"m{m:o}", b"")
            os.chmod(r / f"m{m:o}", m)
        (r / "locked").mkdir()
        os.chmod(r / "locked", 0o700)
        write(r / "locked" / "inside", b"", 0o666)
        os.chmod(r / "locked" / "inside", 0o666)
    roots.same(setup)

    def check(fd):
        out = {}
        for m in modes:
            out[m] = [os.access(f"m{m:o}", a, dir_fd=fd) for a in (os.F_OK, os.R_OK, os.W_OK, os.X_OK)]
        out["locked"] = os.access("locked/inside", os.R_OK, dir_fd=fd)
        return out
    res = roots.same(as_nobody(check))
    assert res[1][0o644] == [True, True, False, False] and res[1][0o007] == [True, True, True, True]
    assert res[1]["locked"] is False

    def as_root(r: Path):
        return {m: [os.access(r / f"m{m:o}", a) for a in (os.R_OK, os.W_OK, os.X_OK)] for m in modes}
    res = roots.same(as_root)
    assert res[1][0o000] == [True, True, False] and res[1][0o711] == [True, True, True]
    assert roots.same(as_nobody(lambda fd: os.open("locked/inside", os.O_RDONLY, dir_fd=fd))) == \
        err(errno.EACCES)
    assert roots.same(as_nobody(lambda fd: os.listdir(os.open("locked", os.O_RDONLY, dir_fd=fd)))) == \
        err(errno.EACCES)


# -- name length -------------------------------------------------------------------------------

def test_name_lengths(roots):
    n255, n256 = "a" * 255, "b" * 256
    u255 = "é" * 127 + "x"  # 255 bytes of UTF-8

    def ok255(r: Path):
        write(r / n255, b"long")
        (r / u255).mkdir()
        (r / "d").mkdir()
        os.rename(r / n255, r / "d" / ("c" * 255))
        os.symlink("t", r / ("s" * 255))
        os.link(r / "d" / ("c" * 255), r / ("h" * 255))
        return sorted(len(os.fsencode(n)) for n in os.listdir(r)), (r / ("h" * 255)).read_bytes()
    assert roots.same(ok255) == ok(([1, 255, 255, 255], b"long"))
    assert roots.same(lambda r: os.open(r / n256, os.O_WRONLY | os.O_CREAT)) == err(errno.ENAMETOOLONG)
    assert roots.same(lambda r: os.mkdir(r / n256)) == err(errno.ENAMETOOLONG)
    assert roots.same(lambda r: os.rename(r / ("h" * 255), r / n256)) == err(errno.ENAMETOOLONG)
    assert roots.same(lambda r: os.stat(r / n256)) == err(errno.ENAMETOOLONG)
    assert roots.same(lambda r: os.symlink("t", r / n256)) == err(errno.ENAMETOOLONG)
    assert roots.same(lambda r: os.link(r / ("h" * 255), r / n256)) == err(errno.ENAMETOOLONG)
    assert roots.same(lambda r: os.mknod(r / n256)) == err(errno.ENAMETOOLONG)
    assert roots.same(lambda r: os.unlink(r / n256)) == err(errno.ENAMETOOLONG)
    assert roots.same(lambda r: os.stat(r / ("é" * 128))) == err(errno.ENAMETOOLONG)


# -- unlinked while open -----------------------------------------------------------------------

def test_unlinked_open_file(roots):
    def f(r: Path):
        write(r / "f", b"before unlink")
        fd = os.open(r / "f", os.O_RDWR)
        fd2 = os.open(r / "f", os.O_RDONLY)
        try:
            os.unlink(r / "f")
            out = [os.path.exists(r / "f"), os.fstat(fd).st_nlink, os.pread(fd, 100, 0)]
            os.pwrite(fd, b"AFTER", 0)
            os.pwrite(fd, b"!", 200)
            os.fsync(fd)
            out += [os.pread(fd2, 300, 0), os.fstat(fd2).st_size]
            os.ftruncate(fd, 6)
            out.append(os.pread(fd2, 300, 0))
            os.close(fd)
            fd = -1
            out += [os.pread(fd2, 300, 0), os.listdir(r)]
            write(r / "f", b"new file")  # the name is free for a new inode
            out.append((os.pread(fd2, 300, 0), (r / "f").read_bytes()))
            return out
        finally:
            if fd >= 0:
                os.close(fd)
            os.close(fd2)
    assert roots.same(f) == ok([False, 0, b"before unlink", b"AFTERe unlink" + bytes(187) + b"!", 201,
                                b"AFTERe", b"AFTERe", [], (b"AFTERe", b"new file")])


def test_removed_directory_still_referenced(roots):
    def f(r: Path):
        (r / "d").mkdir()
        (r / "c").mkdir()
        fd = os.open(r / "d", os.O_RDONLY | os.O_DIRECTORY)
        old = os.getcwd()
        os.chdir(r / "c")
        try:
            os.rmdir(r / "d")
            os.rmdir(r / "c")
            out = [os.fstat(fd).st_nlink, stat.S_ISDIR(os.fstat(fd).st_mode), os.listdir(fd),
                   outcome(os.fsync, fd), outcome(os.fchmod, fd, 0o700),
                   stat.S_IMODE(os.fstat(fd).st_mode), outcome(os.getxattr, fd, "user.x"),
                   outcome(lambda: os.open("x", os.O_CREAT | os.O_WRONLY, dir_fd=fd)),
                   os.stat(".").st_nlink, os.listdir("."), outcome(os.mkdir, "sub"), sorted(os.listdir(r))]
        finally:
            os.chdir(old)
            os.close(fd)
        return out
    assert roots.same(f) == ok([0, True, [], ok(None), ok(None), 0o700, err(errno.ENODATA), err(errno.ENOENT),
                                0, [], err(errno.ENOENT), []])


def test_unlinked_file_via_o_path_fd(roots):
    def f(r: Path):
        write(r / "f", b"abc")
        fd = os.open(r / "f", os.O_PATH)
        try:
            os.unlink(r / "f")
            s = os.fstat(fd)
            return s.st_nlink, s.st_size
        finally:
            os.close(fd)
    assert roots.same(f) == ok((0, 3))


def test_unlinked_open_file_freed_on_last_close(make_mount):
    m = make_mount(fs={"gc_grace_s": 0})

    def blocks() -> int:
        return sum(len(fs) for _, _, fs in os.walk(m.store / "ws" / "default" / "blocks"))
    base_inodes = status(m)["inodes"]
    base_blocks = blocks()
    p = m.ws / "f"
    data = os.urandom(3 << 20)
    write(p, data)
    assert status(m)["inodes"] == base_inodes + 1
    assert blocks() > base_blocks
    fd = os.open(p, os.O_RDWR)
    os.unlink(p)
    assert os.pread(fd, len(data), 0) == data
    os.pwrite(fd, b"still writable", 1 << 20)
    os.fsync(fd)
    assert os.pread(fd, 14, 1 << 20) == b"still writable"
    assert status(m)["inodes"] == base_inodes + 1  # kept while open
    os.close(fd)
    wait_for(lambda: status(m)["inodes"] == base_inodes, 10, what="orphan inode freed")
    wait_for(lambda: blocks() == base_blocks, 20, what="orphan blocks deleted")
    # a removed tree is freed as soon as the kernel forgets its inodes, without a close or remount
    tree = m.ws / "tree"
    for i in range(5):
        (tree / f"d{i}").mkdir(parents=True)
        for j in range(4):
            write(tree / f"d{i}" / f"f{j}", b"x")
        os.link(tree / f"d{i}" / "f0", tree / f"d{i}" / "hard")
        os.symlink("f0", tree / f"d{i}" / "sym")
    assert sum(len(fs) + len(ds) for _, ds, fs in os.walk(tree)) == 35
    shutil.rmtree(tree)
    wait_for(lambda: status(m)["inodes"] == base_inodes, 10, what="removed tree freed")
    m.remount()
    assert status(m)["inodes"] == base_inodes
    assert os.listdir(m.ws) == []
    r = m.cli("fsck")
    assert r.returncode == 0, r.stdout + r.stderr


# -- mmap --------------------------------------------------------------------------------------

def test_shared_writable_mmap(roots):
    def f(r: Path):
        write(r / "f", b"." * 10000)
        fd = os.open(r / "f", os.O_RDWR)
        try:
            mm = mmap.mmap(fd, 10000, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            mm[0:5] = b"hello"
            mm[8190:8200] = b"0123456789"  # across a page boundary
            mm.flush()
            mm.close()
            got = os.pread(fd, 10000, 0)
        finally:
            os.close(fd)
        return got, (r / "f").read_bytes()
    assert roots.same(f)[1][0][:5] == b"hello"


def test_shared_writable_mmap_survives_remount(mount):
    p = mount.ws / "f"
    write(p, bytes(20000))
    fd = os.open(p, os.O_RDWR)
    mm = mmap.mmap(fd, 20000, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    mm[100:105] = b"mmap!"
    mm[12286:12290] = b"edge"
    mm.flush()
    mm[19996:20000] = b"tail"  # written after msync: must reach the fs by close
    mm.close()
    os.close(fd)
    expect = bytearray(20000)
    expect[100:105] = b"mmap!"
    expect[12286:12290] = b"edge"
    expect[19996:20000] = b"tail"
    assert p.read_bytes() == expect
    mount.remount()
    assert p.read_bytes() == expect
    assert os.stat(p).st_size == 20000
