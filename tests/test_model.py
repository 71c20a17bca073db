"""Model test: random operation sequences on the mount and on a local directory, side by side.

Every operation runs twice: once in a fresh subdirectory of the agentmount
workspace and once in a plain local directory (the reference model). Each
pair must give the same result: the same return value (byte counts, data
read, stat fields, listings, link targets, xattrs, offsets), or the same
errno. At checkpoints (every CHECK_EVERY steps, after every remount and at
the end) the two trees must be identical: names, types, full modes, nlink,
sizes, file contents (read with the mount's page cache dropped), symlink
targets, xattrs and hard-link groups. After each write the mount's mtime
must not have gone back. Timestamps are otherwise not compared, except the
ones utime sets explicitly.

Operations: open (O_CREAT, O_EXCL, O_TRUNC, O_APPEND, all access modes),
close, pwrite/pread at random offsets (near block boundaries, far ones that
leave holes, sizes spanning several blocks), write/read/lseek at the file
position, ftruncate/truncate up and down, fsync, fstat, mmap writes, rename
(plain, RENAME_NOREPLACE, RENAME_EXCHANGE; over files and directories, into
subdirectories), link, unlink, mkdir, rmdir, rm -r, symlink, readlink,
chmod, utime, stat/lstat, listdir, xattrs, and remount (about 1 step in 150).
Open descriptors live in SLOTS slots across steps and are all closed before
each remount.

Names come from a small pool (a, b, c and a/x, a/y, b/x, b/y) so operations
collide often; symlink targets are relative and never leave the tree. The
sequence is a pure function of the seed and of the reference tree so far
(`gen_ops` looks at it to prefer paths that exist, or that do not when
creating), and the yielded operations are plain data: a failure writes the
sequence to a JSON file which `run_ops` replays as a list. Hypothesis only
picks the seeds (derandomized, no shrinking phase: a failure reports the
seed, the last operations and that file).
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import random
import stat
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as hst

KiB = 1024
MiB = 1024 * KiB

TOP = ["a", "b", "c"]
PATHS = TOP + ["a/x", "a/y", "b/x", "b/y"]
LINK_TARGETS = ["a", "b", "c", "x", "y", "a/x", "b/y", "nope", ".", "a/y/z"]
CREATE_MODES = [0o644, 0o600, 0o755, 0o000, 0o666]
CHMOD_MODES = [0o644, 0o600, 0o755, 0o000, 0o777, 0o444, 0o1777, 0o2755, 0o4755, 0o700]
DIR_MODES = [0o755, 0o700, 0o777, 0o1777, 0o2755]
SLOTS = 4
CHECK_EVERY = 20

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)


def _renameat2(src: str, dst: str, flags: int) -> None:
    r = _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags))
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src)


# --------------------------------------------------------------------------------------
# generation: a pure function of (seed, n, block size)
# --------------------------------------------------------------------------------------
OPEN_FLAGS = [
    os.O_RDONLY,
    os.O_WRONLY,
    os.O_RDWR,
    os.O_RDWR | os.O_CREAT,
    os.O_RDWR | os.O_CREAT,
    os.O_WRONLY | os.O_CREAT,
    os.O_RDWR | os.O_CREAT | os.O_EXCL,
    os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    os.O_RDWR | os.O_TRUNC,
    os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    os.O_RDWR | os.O_APPEND,
    os.O_WRONLY | os.O_CREAT | os.O_APPEND,
]

WEIGHTS = {
    "open": 14, "close": 6, "pwrite": 16, "pread": 9, "ftruncate": 4, "truncate": 3, "fsync": 3, "fstat": 4,
    "rename": 8, "link": 4, "unlink": 6, "mkdir": 6, "rmdir": 4, "symlink": 4, "readlink": 2, "chmod": 3,
    "stat": 4, "listdir": 2, "write": 8, "read": 4, "lseek": 3, "setxattr": 3, "getxattr": 2, "listxattr": 1,
    "removexattr": 2, "rmtree": 1, "mmap_write": 2, "utime": 2,
}
XATTR_NAMES = ["user.a", "user.b"]
_OPS = list(WEIGHTS)
_W = [WEIGHTS[k] for k in _OPS]


def _offset(r: random.Random, bs: int, far: int) -> int:
    k = r.random()
    if k < 0.45:
        return r.randrange(0, min(2 * bs, 256 * KiB))
    if k < 0.75:  # near a block boundary
        return max(0, r.randrange(0, 4) * bs + r.randint(-300, 300))
    if k < 0.93:
        return r.randrange(0, far // 4)
    return r.randrange(far // 2, far)  # far: leaves a hole


def _size(r: random.Random, bs: int, big: int) -> int:
    k = r.random()
    if k < 0.55:
        return r.randint(1, 4096)
    if k < 0.85:
        return r.randint(4096, min(bs + bs // 2, 128 * KiB))
    if k < 0.95:
        return r.randint(min(bs, big) // 2, min(2 * bs, big))
    return r.randint(big // 2, big)  # spans more than one block


class _Picker:
    """Chooses paths from the pool, biased (when the reference tree is given) towards useful ones."""

    def __init__(self, r: random.Random, lroot: Path | None) -> None:
        self.r = r
        self.lroot = lroot

    def _existing(self, want: str = "") -> list[str]:
        if self.lroot is None:
            return []
        out = []
        for p in PATHS:
            try:
                m = os.lstat(self.lroot / p).st_mode
            except OSError:
                continue
            if (not want or (want == "dir" and stat.S_ISDIR(m)) or (want == "file" and stat.S_ISREG(m))
                    or (want == "nondir" and not stat.S_ISDIR(m))):
                out.append(p)
        return out

    def any(self) -> str:
        return self.r.choice(PATHS)

    def existing(self, want: str = "", p: float = 0.7) -> str:
        ex = self._existing(want)
        return self.r.choice(ex) if ex and self.r.random() < p else self.any()

    def new_entry(self) -> str:
        """A path for a new entry: mostly a missing name in an existing directory."""
        if self.lroot is not None and self.r.random() < 0.7:
            have = set(self._existing())
            dirs = set(self._existing("dir"))
            free = [p for p in PATHS if p not in have and ("/" not in p or p.split("/")[0] in dirs)]
            if free:
                return self.r.choice(free)
        return self.any()


def gen_ops(seed: int, n: int, bs: int, far: int, big: int, lroot: Path | None = None,
            remount_every: int = 150):
    """Yield the operation sequence for `seed`: `n` operations plus checkpoints.

    With `lroot` (the reference tree, which `run_ops` updates as it goes) path choices lean
    towards entries that exist, so renames, links and removals mostly have something to act on.
    The yielded operations are plain data: a recorded sequence replays without the generator.
    """
    r = random.Random(seed)
    pk = _Picker(r, lroot)
    for i in range(n):
        if r.randrange(remount_every) == 0:
            yield ["remount"]
        else:
            kind = r.choices(_OPS, _W)[0]
            slot = r.randrange(SLOTS)
            if kind == "open":
                flags = r.choice(OPEN_FLAGS)
                p = pk.new_entry() if flags & os.O_CREAT else pk.existing()
                yield ["open", slot, p, flags, r.choice(CREATE_MODES)]
            elif kind == "pwrite":
                yield ["pwrite", slot, _offset(r, bs, far), _size(r, bs, big), r.randrange(1 << 30)]
            elif kind == "pread":
                yield ["pread", slot, _offset(r, bs, far), _size(r, bs, big), r.random() < 0.3]
            elif kind == "ftruncate":
                yield ["ftruncate", slot, r.choice([0, r.randrange(0, 4096), _offset(r, bs, far)])]
            elif kind == "truncate":
                yield ["truncate", pk.existing("file"), r.choice([0, r.randrange(0, 4096), _offset(r, bs, far)])]
            elif kind in ("fsync", "fstat", "close"):
                yield [kind, slot]
            elif kind == "rename":
                src = pk.existing()
                dst = pk.existing(p=0.4) if r.random() < 0.5 else pk.new_entry()
                yield ["rename", src, dst, r.choices([0, RENAME_NOREPLACE, RENAME_EXCHANGE], [6, 1, 1])[0]]
            elif kind == "link":
                yield ["link", pk.existing("file"), pk.new_entry()]
            elif kind == "unlink":
                yield ["unlink", pk.existing("nondir", p=0.8)]
            elif kind == "rmdir":
                yield ["rmdir", pk.existing("dir")]
            elif kind == "mmap_write":
                yield ["mmap_write", slot, r.randrange(1 << 24), r.choice([1, 100, 5000, bs + 10]),
                       r.randrange(1 << 30)]
            elif kind == "utime":
                yield ["utime", pk.existing(), r.randrange(1 << 50), r.randrange(1 << 50), r.random() < 0.7]
            elif kind == "rmtree":
                yield ["rmtree", pk.existing("dir")]
            elif kind in ("readlink", "listdir"):
                yield [kind, pk.existing()]
            elif kind == "mkdir":
                yield ["mkdir", r.choice(TOP) if r.random() < 0.5 else pk.new_entry(), r.choice(DIR_MODES)]
            elif kind == "symlink":
                yield ["symlink", r.choice(LINK_TARGETS), pk.new_entry()]
            elif kind == "chmod":
                yield ["chmod", pk.existing(), r.choice(CHMOD_MODES)]
            elif kind == "stat":
                yield ["stat", pk.existing(), r.random() < 0.5]
            elif kind == "write":
                yield ["write", slot, _size(r, bs, big) if r.random() < 0.3 else r.randint(1, 3000),
                       r.randrange(1 << 30)]
            elif kind == "read":
                yield ["read", slot, r.choice([1, 100, 4096, 65536, bs])]
            elif kind == "lseek":
                whence = r.choice([os.SEEK_SET, os.SEEK_CUR, os.SEEK_END])
                off = _offset(r, bs, far) if whence == os.SEEK_SET else r.randint(-5000, 5000)
                yield ["lseek", slot, off, whence]
            elif kind == "setxattr":
                yield ["setxattr", pk.existing(), r.choice(XATTR_NAMES), r.randbytes(r.choice([0, 3, 40])).hex(),
                       r.choice([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE]), r.random() < 0.7]
            elif kind in ("getxattr", "removexattr"):
                yield [kind, pk.existing(), r.choice(XATTR_NAMES), r.random() < 0.7]
            elif kind == "listxattr":
                yield ["listxattr", pk.existing(), r.random() < 0.7]
            else:  # pragma: no cover
                raise AssertionError(kind)
        if (i + 1) % CHECK_EVERY == 0:
            yield ["check"]
    yield ["check"]
    yield ["remount"]
    yield ["check"]


def _data(dseed: int, size: int) -> bytes:
    if dseed % 3 == 0:  # compressible
        return bytes([dseed % 251 + 1]) * size
    return random.Random(dseed).randbytes(size)


# --------------------------------------------------------------------------------------
# execution
# --------------------------------------------------------------------------------------
class Divergence(AssertionError):
    pass


class Side:
    """One tree: the mount or the local reference."""

    def __init__(self, root: Path, is_mount: bool) -> None:
        self.root = root
        self.is_mount = is_mount
        self.fds: list[int | None] = [None] * SLOTS

    def path(self, p: str) -> str:
        return str(self.root / p)

    def close_all(self) -> None:
        for i, fd in enumerate(self.fds):
            if fd is not None:
                os.close(fd)
                self.fds[i] = None


def _stat_key(s: os.stat_result) -> tuple:
    fmt = stat.S_IFMT(s.st_mode)
    return (stat.filemode(s.st_mode), oct(s.st_mode), s.st_nlink, None if fmt == stat.S_IFDIR else s.st_size)


def _mtime(fd: int, problems: list[str], when: str) -> int | None:
    try:
        return os.fstat(fd).st_mtime_ns
    except OSError as e:
        problems.append(f"fstat of the open fd {when} the write failed: {errno.errorcode.get(e.errno, e.errno)}")
        return None


def _rmtree(path: str) -> None:
    """rm -r without following symlinks; the first failure propagates."""
    if stat.S_ISDIR(os.lstat(path).st_mode):
        for name in sorted(os.listdir(path)):
            _rmtree(os.path.join(path, name))
        os.rmdir(path)
    else:
        os.unlink(path)


def _do(side: Side, op: list, mtimes: list[str]):
    """Run `op` on `side`; return a comparable result. Raises OSError for errno results."""
    kind = op[0]
    P = side.path
    if kind == "open":
        _, slot, p, flags, mode = op
        if side.fds[slot] is not None:
            os.close(side.fds[slot])
            side.fds[slot] = None
        side.fds[slot] = os.open(P(p), flags, mode)
        return "ok"
    if kind in ("close", "pwrite", "pread", "ftruncate", "fsync", "fstat", "write", "read", "lseek", "mmap_write"):
        fd = side.fds[op[1]]
        if fd is None:
            return "no fd"
        if kind == "close":
            side.fds[op[1]] = None
            os.close(fd)
            return "ok"
        if kind == "pwrite":
            _, _, off, size, dseed = op
            before = _mtime(fd, mtimes, "before") if side.is_mount else None
            n = os.pwrite(fd, _data(dseed, size), off)
            if side.is_mount:
                after = _mtime(fd, mtimes, "after")
                if before is not None and after is not None and after < before:
                    mtimes.append(f"mtime went back after write: {before} -> {after}")
            return n
        if kind == "pread":
            _, _, off, size, drop = op
            if drop and side.is_mount:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            data = os.pread(fd, size, off)
            return (len(data), hashlib.blake2b(data, digest_size=8).hexdigest())
        if kind == "write":
            return os.write(fd, _data(op[3], op[2]))
        if kind == "mmap_write":
            _, _, off, size, dseed = op
            fsize = os.fstat(fd).st_size
            if fsize == 0 or stat.S_ISDIR(os.fstat(fd).st_mode):
                return "empty or dir"
            off %= fsize
            size = min(size, fsize - off)
            with mmap.mmap(fd, fsize, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
                mm[off:off + size] = _data(dseed, size)
                mm.flush()
            return (off, size)
        if kind == "read":
            data = os.read(fd, op[2])
            return (len(data), hashlib.blake2b(data, digest_size=8).hexdigest())
        if kind == "lseek":
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                return "dir"  # directory offsets are opaque cookies
            return os.lseek(fd, op[2], op[3])
        if kind == "ftruncate":
            os.ftruncate(fd, op[2])
            return "ok"
        if kind == "fsync":
            os.fsync(fd)
            return "ok"
        if kind == "fstat":
            return _stat_key(os.fstat(fd))
    if kind == "truncate":
        os.truncate(P(op[1]), op[2])
        return "ok"
    if kind == "rename":
        _, p, q, flags = op
        if flags:
            _renameat2(P(p), P(q), flags)
        else:
            os.rename(P(p), P(q))
        return "ok"
    if kind == "link":
        os.link(P(op[1]), P(op[2]), follow_symlinks=False)
        return "ok"
    if kind == "unlink":
        os.unlink(P(op[1]))
        return "ok"
    if kind == "rmdir":
        os.rmdir(P(op[1]))
        return "ok"
    if kind == "mkdir":
        os.mkdir(P(op[1]), op[2])
        return "ok"
    if kind == "symlink":
        os.symlink(op[1], P(op[2]))
        return "ok"
    if kind == "readlink":
        return os.readlink(P(op[1]))
    if kind == "chmod":
        os.chmod(P(op[1]), op[2])
        return "ok"
    if kind == "stat":
        return _stat_key(os.stat(P(op[1]), follow_symlinks=op[2]))
    if kind == "listdir":
        return sorted(os.listdir(P(op[1])))
    if kind == "utime":
        _, p, at, mt, follow = op
        os.utime(P(p), ns=(at, mt), follow_symlinks=follow)
        s = os.stat(P(p), follow_symlinks=follow)
        return (s.st_atime_ns, s.st_mtime_ns)
    if kind == "rmtree":
        _rmtree(P(op[1]))
        return "ok"
    if kind == "setxattr":
        _, p, name, value, flags, follow = op
        os.setxattr(P(p), name, bytes.fromhex(value), flags, follow_symlinks=follow)
        return "ok"
    if kind == "getxattr":
        return os.getxattr(P(op[1]), op[2], follow_symlinks=op[3]).hex()
    if kind == "removexattr":
        os.removexattr(P(op[1]), op[2], follow_symlinks=op[3])
        return "ok"
    if kind == "listxattr":
        return sorted(os.listxattr(P(op[1]), follow_symlinks=op[2]))
    raise AssertionError(f"unknown op {op!r}")


def _result(side: Side, op: list, mtimes: list[str]):
    try:
        return ("ok", _do(side, op, mtimes))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


def _read_all(path: str, drop: bool) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        if drop:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def snapshot_tree(root: Path, drop_cache: bool) -> dict:
    """{relpath: (type/mode/nlink/size key, content hash or link target)} plus hard-link groups."""
    entries: dict[str, tuple] = {}
    by_ino: dict[int, list[str]] = {}

    def walk(rel: str) -> None:
        full = root / rel if rel else root
        for name in sorted(os.listdir(full)):
            r = f"{rel}/{name}" if rel else name
            s = os.lstat(root / r)
            extra = None
            if stat.S_ISREG(s.st_mode):
                data = _read_all(str(root / r), drop_cache)
                extra = (len(data), hashlib.blake2b(data, digest_size=16).hexdigest())
                by_ino.setdefault(s.st_ino, []).append(r)
            elif stat.S_ISLNK(s.st_mode):
                extra = os.readlink(root / r)
                by_ino.setdefault(s.st_ino, []).append(r)
            xattrs = None
            if not stat.S_ISLNK(s.st_mode):
                xattrs = sorted((n, os.getxattr(root / r, n).hex()) for n in os.listxattr(root / r))
            entries[r] = (_stat_key(s), extra, xattrs)
            if stat.S_ISDIR(s.st_mode):
                walk(r)

    entries["."] = (_stat_key(os.lstat(root)), None, sorted(os.listxattr(root)))
    walk("")
    groups = sorted(sorted(g) for g in by_ino.values() if len(g) > 1)
    return {"entries": entries, "links": groups}


def _diff_trees(want: dict, got: dict) -> list[str]:
    out = []
    we, ge = want["entries"], got["entries"]
    for k in sorted(set(we) | set(ge)):
        if we.get(k) != ge.get(k):
            out.append(f"  {k}: local={we.get(k)!r} mount={ge.get(k)!r}")
    if want["links"] != got["links"]:
        out.append(f"  hard-link groups: local={want['links']} mount={got['links']}")
    return out


def run_ops(mount, mroot: Path, lroot: Path, ops, stats: dict | None = None,
            dump: Path | None = None, label: str = "") -> None:
    """Run `ops` (a list, or gen_ops(..., lroot=lroot)) on the mount subtree `mroot` and the local
    tree `lroot`; raise Divergence on a mismatch."""
    mroot.mkdir()
    lroot.mkdir()
    ms, ls = Side(mroot, True), Side(lroot, False)
    log: list[str] = []
    done: list[list] = []

    def fail(msg: str) -> None:
        ms.close_all()
        ls.close_all()
        where = ""
        if dump is not None:
            dump.write_text(json.dumps(done))
            where = (f"\nwhole sequence up to the failure: {dump} "
                     f"(replay: run_ops(mount, mroot, lroot, json.load(open(path))))")
        tail = "\n".join(log[-40:])
        raise Divergence(f"{label} step {len(log) - 1}: {msg}\nlast operations:\n{tail}{where}")

    def compare_trees(what: str) -> None:
        d = _diff_trees(snapshot_tree(lroot, False), snapshot_tree(mroot, True))
        if d:
            fail(what + ":\n" + "\n".join(d))

    try:
        for op in ops:
            done.append(op)
            log.append(f"  {len(log)}: {op!r}")
            kind = op[0]
            if kind == "check":
                compare_trees("trees differ")
                continue
            if stats is not None:
                stats["ops"] = stats.get("ops", 0) + 1
            if kind == "remount":
                ms.close_all()
                ls.close_all()
                mount.remount()
                compare_trees("trees differ after remount")
                continue
            mtimes: list[str] = []
            want = _result(ls, op, mtimes)
            got = _result(ms, op, mtimes)
            if want != got:
                fail(f"{op!r}: local={want!r} mount={got!r}")
            if stats is not None:
                outcome = f"{kind}:{want[1] if want[0] == 'err' else 'ok'}"
                stats.setdefault("outcomes", {})[outcome] = stats.setdefault("outcomes", {}).get(outcome, 0) + 1
            if mtimes:
                fail(f"{op!r} (result {got!r} on both): " + "; ".join(mtimes))
    finally:
        ms.close_all()
        ls.close_all()


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------
SETTINGS = dict(derandomize=True, database=None, deadline=None, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck))


def _model_test(make_mount, tmp_path, fs: dict, examples: int, steps: int, far: int, big: int) -> dict:
    """Run `examples` hypothesis-chosen seeds of `steps` operations each on one mount configured with `fs`."""
    m = make_mount(fs=fs)
    bs = fs.get("block_size_kb", 4096) * KiB
    stats: dict = {"ops": 0, "runs": 0, "seeds": []}
    local = tmp_path / "local"
    local.mkdir()

    @settings(max_examples=examples, **SETTINGS)
    @given(seed=hst.integers(0, 2**32 - 1))
    def run(seed: int) -> None:
        n = stats["runs"]
        stats["runs"] += 1
        stats["seeds"].append(seed)
        lroot = local / f"model{n}"
        ops = gen_ops(seed, steps, bs, far, big, lroot=lroot)
        before = stats["ops"]
        run_ops(m, m.ws / f"model{n}", lroot, ops, stats,
                dump=tmp_path / f"failing-ops-{seed}.json", label=f"seed={seed} fs={fs}")
        assert stats["ops"] - before >= steps

    run()
    # What the runs left behind must also be a consistent store.
    m.umount()
    r = m.cli("fsck")
    assert r.returncode == 0, r.stdout + r.stderr
    return stats


def test_model_small_blocks(make_mount, tmp_path):
    """64 KiB blocks and 1 MiB chunks: multi-block and multi-chunk files stay cheap."""
    stats = _model_test(make_mount, tmp_path, {"block_size_kb": 64, "chunk_size_mb": 1},
                        examples=2, steps=1000, far=3 * MiB, big=200 * KiB)
    assert stats["runs"] == 2
    assert stats["ops"] >= 2000


def test_model_default_blocks(make_mount, tmp_path):
    """The default 4 MiB blocks: some writes span more than one block, far writes leave holes."""
    stats = _model_test(make_mount, tmp_path, {}, examples=1, steps=500, far=12 * MiB, big=5 * MiB)
    assert stats["runs"] == 1
    assert stats["ops"] >= 500


def test_model_eager_background(make_mount, tmp_path):
    """Compaction at 2 slices, a 1 MiB write buffer, a snapshot every 40 records, immediate garbage
    collection and no kernel attribute/entry caching: background work races the model's operations."""
    fs = {"block_size_kb": 64, "chunk_size_mb": 1, "compact_slices": 2, "write_buffer_mb": 1,
          "snapshot_records": 40, "gc_grace_s": 0, "attr_timeout_s": 0, "entry_timeout_s": 0}
    stats = _model_test(make_mount, tmp_path, fs, examples=2, steps=1000, far=3 * MiB, big=200 * KiB)
    assert stats["runs"] == 2
    assert stats["ops"] >= 2000
