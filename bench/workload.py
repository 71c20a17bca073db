"""The benchmark workload: the same steps, in the same order, on every target.

Each phase runs on every target; inside a phase the repetitions are interleaved across targets
(rep 1 on local, agentmount, juicefs; then rep 2 ...), so slow drifts of a noisy machine hit all
targets alike. A step returns samples {figure_key: (value, seconds)}; the report takes medians.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import random
import subprocess
import sys
import sysconfig
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
CACHE = Path(__file__).resolve().parent / ".cache"


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    unit: str          # "MiB/s", "ops/s", "files/s" (rates) or "s" (times)
    big: bool = False  # repeated --repeat-big times instead of --repeat

    @property
    def is_time(self) -> bool:
        return self.unit == "s"


@dataclass
class Sizes:
    seq_bytes: int = GiB
    piece: int = MiB
    rand_file: int = 256 * MiB
    rand_reads: int = 2000
    rand_io: int = 4 * KiB
    small_files: int = 2000
    small_size: int = KiB
    dirs: int = 1000
    renames: int = 1000
    flocks: int = 2000
    tar_every: int = 1   # keep every n-th file of the stdlib in the tarball

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(seq_bytes=GiB // 8, rand_file=32 * MiB, rand_reads=250, small_files=250, dirs=125,
                   renames=125, flocks=250, tar_every=8)


def human_bytes(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


def figures(sz: Sizes) -> list[Figure]:
    sb = human_bytes(sz.seq_bytes)
    return [
        Figure("seq_write_random", f"seq write {sb} random (+fsync+close)", "MiB/s", big=True),
        Figure("seq_write_zeros", f"seq write {sb} zeros (+fsync+close)", "MiB/s", big=True),
        Figure("seq_read_cold", f"seq read {sb} cold", "MiB/s", big=True),
        Figure("seq_read_warm", f"seq read {sb} warm", "MiB/s", big=True),
        Figure("rand_read_4k", f"4 KiB random reads ({sz.rand_reads} in {human_bytes(sz.rand_file)}, cold)",
               "ops/s"),
        Figure("small_create", f"small files: create+write 1 KiB+close ({sz.small_files})", "files/s"),
        Figure("small_stat", f"small files: stat ({sz.small_files})", "files/s"),
        Figure("small_read", f"small files: open+read+close ({sz.small_files})", "files/s"),
        Figure("small_unlink", f"small files: unlink ({sz.small_files})", "files/s"),
        Figure("mkdir", f"mkdir ({sz.dirs})", "ops/s"),
        Figure("rename", f"rename file ({sz.renames})", "ops/s"),
        Figure("tar_extract", "tar -xf stdlib tarball", "s"),
        Figure("rm_rf", "rm -rf extracted tree", "s"),
        Figure("flock", f"flock LOCK_EX/LOCK_UN cycles ({sz.flocks})", "ops/s"),
    ]


# ---------------------------------------------------------------------------------------------
# tarball

def stdlib_tarball(every: int, log) -> tuple[Path, int]:
    """A tarball of this Python's stdlib (site-/dist-packages left out), built once into bench/.cache/.

    Returns (path, number of entries). every > 1 keeps only every n-th file (for --quick)."""
    src = Path(sysconfig.get_paths()["stdlib"])
    tag = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}" + ("" if every == 1 else f"-every{every}")
    path = CACHE / f"{tag}.tar"
    count_file = CACHE / f"{tag}.count"
    if path.exists() and count_file.exists():
        return path, int(count_file.read_text())
    CACHE.mkdir(parents=True, exist_ok=True)
    log(f"building {path} from {src} (once) ...")
    entries: list[tuple[Path, str]] = []
    nfile = 0
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages"))
        rel = Path(root).relative_to(src)
        entries.append((Path(root), str(Path("stdlib") / rel)))
        for f in sorted(files):
            nfile += 1
            if (nfile - 1) % every == 0:
                entries.append((Path(root) / f, str(Path("stdlib") / rel / f)))
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tf:
        for p, arc in entries:
            try:
                tf.add(p, arcname=arc, recursive=False)
            except OSError:
                continue
        n = len(tf.getmembers())
    os.replace(tmp, path)
    count_file.write_text(str(n))
    return path, n


def count_tree(root: Path) -> int:
    n = 0
    for _, dirs, files in os.walk(root):
        n += len(dirs) + len(files)
    return n + 1  # the root itself


# ---------------------------------------------------------------------------------------------
# steps

def _write_file(path: Path, pieces, fsync: bool = True) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for p in pieces:
            mv = memoryview(p)
            while mv:
                n = os.write(fd, mv)
                mv = mv[n:]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def seq_write(path: Path, data, size: int, piece: int) -> float:
    """data: one buffer of `size` bytes, or one `piece`-sized buffer written size/piece times."""
    if len(data) == size:
        mv = memoryview(data)
        pieces = (mv[i:i + piece] for i in range(0, size, piece))
    else:
        pieces = (data for _ in range(size // piece))
    return _write_file(path, pieces)


def seq_read(path: Path, size: int, piece: int) -> float:
    buf = bytearray(piece)
    mv = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(mv)
            if not n:
                break
            total += n
    dt = time.perf_counter() - t0
    if total != size:
        raise OSError(f"short read: {total} of {size} bytes from {path.name}")
    return dt


def file_digest(path: Path, piece: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    buf = bytearray(piece)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.hexdigest()


def rand_reads(path: Path, size: int, count: int, io: int, seed: int = 1234) -> float:
    rng = random.Random(seed)
    offsets = [rng.randrange(size // io) * io for _ in range(count)]
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for off in offsets:
            if len(os.pread(fd, io, off)) != io:
                raise OSError(f"short 4 KiB read at offset {off} of {path.name}")
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def small_files(d: Path, count: int, size: int) -> dict[str, float]:
    payloads = [os.urandom(size) for _ in range(count)]
    names = [str(d / f"f{i:05d}.txt") for i in range(count)]
    d.mkdir()
    out = {}
    t0 = time.perf_counter()
    for name, data in zip(names, payloads):
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    out["small_create"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name in names:
        if os.stat(name).st_size != size:
            raise OSError(f"stat {name}: wrong size")
    out["small_stat"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name, data in zip(names, payloads):
        fd = os.open(name, os.O_RDONLY)
        got = os.read(fd, size + 1)
        os.close(fd)
        if got != data:
            raise OSError(f"read {name}: content differs from what was written ({len(got)} bytes)")
    out["small_read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name in names:
        os.unlink(name)
    out["small_unlink"] = time.perf_counter() - t0
    os.rmdir(d)
    return out


def mkdirs(d: Path, count: int) -> float:
    d.mkdir()
    names = [str(d / f"d{i:05d}") for i in range(count)]
    t0 = time.perf_counter()
    for n in names:
        os.mkdir(n)
    dt = time.perf_counter() - t0
    for n in names:
        os.rmdir(n)
    os.rmdir(d)
    return dt


def renames(d: Path, count: int) -> float:
    d.mkdir()
    src = [str(d / f"a{i:05d}") for i in range(count)]
    dst = [str(d / f"b{i:05d}") for i in range(count)]
    for s in src:
        os.close(os.open(s, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    t0 = time.perf_counter()
    for s, t in zip(src, dst):
        os.rename(s, t)
    dt = time.perf_counter() - t0
    for t in dst:
        os.unlink(t)
    os.rmdir(d)
    return dt


def tar_extract(tarball: Path, dest: Path, entries: int, timeout: float) -> dict[str, float]:
    dest.mkdir()
    t0 = time.perf_counter()
    r = subprocess.run(["tar", "-xf", str(tarball), "-C", str(dest)], capture_output=True, text=True,
                       timeout=timeout)
    t_tar = time.perf_counter() - t0
    if r.returncode != 0:
        raise OSError(f"tar -xf exited {r.returncode}: {r.stderr.strip()[-1500:]}")
    got = count_tree(dest / "stdlib")
    if got != entries:
        raise OSError(f"tar -xf: {got} entries in the extracted tree, expected {entries}")
    os.sync()
    t0 = time.perf_counter()
    r = subprocess.run(["rm", "-rf", str(dest)], capture_output=True, text=True, timeout=timeout)
    t_rm = time.perf_counter() - t0
    if r.returncode != 0:
        raise OSError(f"rm -rf exited {r.returncode}: {r.stderr.strip()[-1500:]}")
    if dest.exists():
        raise OSError(f"rm -rf left {dest} behind")
    return {"tar_extract": t_tar, "rm_rf": t_rm}


def flocks(path: Path, count: int) -> float:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        t0 = time.perf_counter()
        for _ in range(count):
            fcntl.flock(fd, fcntl.LOCK_EX)
            fcntl.flock(fd, fcntl.LOCK_UN)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    os.unlink(path)
    return dt
