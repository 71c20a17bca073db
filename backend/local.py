"""`LocalStore`: an object store in a local directory.

Each key is a file below the root (key segments become directories). Puts
write a temporary file, fsync it, rename it into place and fsync the
directory, so an object is either wholly present or absent after a crash.
Puts with sync=False skip both fsyncs; `sync(keys)` or `barrier()` later makes
them durable. (Small ones are not pushed to the disk early on purpose: on ext4
data=ordered, allocated-but-unsynced data joins every later journal commit,
so early write-back would slow down each durable put of the namespace
journal.) Objects of 256 KiB and more bypass the page cache with O_DIRECT.
`write_at` writes into an object in place (pwrite, fdatasync; the directory
is synced when it creates the file): one data flush instead of a new file's
two. A crash may leave such an object torn past its last durable write; its
only users (journal logs) find that by their frames' checksums. The object
stays open after that, and small appends to it are written on the trio
thread and flushed through native AIO (`backend.aio`): no thread hand-off on
the path of a durable close.
All other disk I/O runs in worker threads, bounded by a capacity limiter.
"""
from __future__ import annotations

import errno
import os
import mmap
import secrets
import threading
from typing import AsyncIterator, Callable, Sequence, TypeVar

import trio

from backend.aio import FdSyncer, NotSubmitted
from backend.buffers import AlignedPool, anonymous
from backend.store import AlreadyExists, NotFound, ObjectInfo, ObjectStore, StoreError, StoreUnavailable

_TMP_SUFFIX = ".tmp-"
# Appends to an object held open are written on the trio thread when at most this big (a
# copy into the page cache); larger ones, and any to an object not held open, use a thread.
_INLINE_APPEND_MAX = 64 << 10
_OPEN_APPENDS = 8
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024

try:
    import ctypes
    import ctypes.util
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:  # pragma: no cover - libc is always there on Linux
    _libc = None
_TRANSIENT = {errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS, errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE}


def fsync_dir(path: str) -> None:
    """Make the entries of directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _classify(e: OSError, key: str) -> StoreError:
    if e.errno == errno.ENOENT:
        return NotFound(key)
    if e.errno in _TRANSIENT:
        return StoreUnavailable(f"{key}: {os.strerror(e.errno or 0)}", e.errno)
    return StoreError(f"{key}: {e}", e.errno)


def _parts(data) -> list[memoryview]:
    return [memoryview(b) for b in ((data,) if isinstance(data, (bytes, bytearray, memoryview)) else data)
            if len(b)]


def writev_all(fd: int, data, pos: int | None = None) -> None:
    """Write `data` (one buffer or a sequence of buffers) fully to `fd`, in IOV_MAX batches:
    at the file offset, or at `pos` (pwritev) when given."""
    bufs = _parts(data)
    i = 0
    while i < len(bufs):
        batch = bufs[i:i + _IOV_MAX]
        if pos is None:
            n = os.writev(fd, batch)
        else:
            n = os.pwritev(fd, batch, pos)
            pos += n
        while i < len(bufs) and n >= len(bufs[i]):
            n -= len(bufs[i])
            i += 1
        if n:
            bufs[i] = bufs[i][n:]


T = TypeVar("T")

_DIRECT_MIN = 256 << 10
_ALIGN = 4096
_direct_buf = threading.local()


def _aligned_buffer(n: int) -> mmap.mmap:
    """This thread's page-aligned buffer of at least `n` bytes (reused, so its pages stay resident)."""
    buf = getattr(_direct_buf, "m", None)
    if buf is None or len(buf) < n:
        if buf is not None:
            buf.close()
        buf = _direct_buf.m = anonymous(max(n, 4 << 20), populate=True)
    return buf


def _write_direct(fd: int, parts: Sequence, total: int) -> None:
    """Write the concatenation of `parts` to an O_DIRECT `fd` through an aligned buffer.

    Big objects skip the page cache: one copy into a buffer this thread reuses (its pages
    stay resident), then DMA to the disk, instead of a copy into freshly allocated page
    cache pages and a later write-back. The file is padded to the alignment, then cut
    back to `total`.
    """
    padded = -(-total // _ALIGN) * _ALIGN
    view = memoryview(_aligned_buffer(padded))
    try:
        pos = 0
        for b in parts:
            view[pos:pos + len(b)] = b
            pos += len(b)
        view[pos:padded] = bytes(padded - pos)
        done = 0
        while done < padded:
            done += os.write(fd, view[done:padded])
        if padded != total:
            os.ftruncate(fd, total)
    finally:
        view.release()


class LocalStore(ObjectStore):
    """Directory-backed store; see module docstring for durability guarantees."""

    is_local = True
    appendable = True

    def __init__(self, root: str, name: str = "local", *, max_threads: int = 8, fsync: bool = True,
                 direct: bool = True, read_buffer_size: int = (4 << 20) + _ALIGN,
                 read_buffers: int = 32) -> None:
        self.name = name
        self.root = os.path.abspath(root)
        self.fsync = fsync
        self._limiter = trio.CapacityLimiter(max_threads)
        self._known_dirs: set[str] = set()
        self._direct = direct
        # Buffers for whole-object reads whose result is checked then cached (blocks):
        # the caller may keep them as long as it likes, the pool reuses them after.
        self._read_pool = AlignedPool(-(-read_buffer_size // _ALIGN) * _ALIGN, read_buffers)
        # Objects appended to lately (journal logs): key -> (open fd, size written). Later
        # appends to them write on the trio thread and flush through native AIO.
        self._appends: dict[str, tuple[int, int]] = {}
        self._syncer = FdSyncer()

    # -- helpers (run in threads) -------------------------------------------------
    def _path(self, key: str) -> str:
        parts = key.split("/")
        if "" in parts or ".." in parts or "." in parts or _TMP_SUFFIX in key:
            raise StoreError(f"invalid key {key!r}")
        return os.path.join(self.root, key)

    def _ensure_dir(self, d: str) -> None:
        if d in self._known_dirs:
            return
        missing = []
        p = d
        while not os.path.isdir(p):
            missing.append(p)
            p = os.path.dirname(p)
        for m in reversed(missing):
            try:
                os.mkdir(m)
            except FileExistsError:
                pass
            if self.fsync:
                fsync_dir(os.path.dirname(m))
        self._known_dirs.add(d)

    def _open_tmp(self, tmp: str, direct: bool) -> int:
        """Open a new temporary file; -1 when O_DIRECT is refused (then never tried again)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        if not direct:
            return os.open(tmp, flags, 0o600)
        try:
            return os.open(tmp, flags | os.O_DIRECT, 0o600)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._direct = False
            return -1

    def _put_sync(self, key: str, data, create_only: bool, sync: bool = True) -> None:
        path = self._path(key)
        d = os.path.dirname(path)
        try:
            self._ensure_dir(d)
            tmp = path + _TMP_SUFFIX + secrets.token_hex(6)
            parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
            total = sum(len(b) for b in parts)
            direct = self._direct and total >= _DIRECT_MIN
            fd = self._open_tmp(tmp, direct)
            if fd < 0:
                direct, fd = False, self._open_tmp(tmp, False)
            try:
                if direct:
                    _write_direct(fd, parts, total)
                else:
                    writev_all(fd, parts)
                if self.fsync and sync:
                    os.fdatasync(fd)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
            os.close(fd)
            try:
                if create_only:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        raise AlreadyExists(key) from None
                    finally:
                        os.unlink(tmp)
                else:
                    os.rename(tmp, path)
            except OSError:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            if self.fsync and sync:
                fsync_dir(d)
        except OSError as e:
            if e.errno == errno.ENOENT:
                self._known_dirs.discard(d)
            raise _classify(e, key) from e

    def _write_at_sync(self, key: str, data, offset: int, sync: bool) -> None:
        path = self._path(key)
        d = os.path.dirname(path)
        try:
            self._ensure_dir(d)
            created = False
            if offset == 0:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    created = True
                except FileExistsError:
                    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            else:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                if size < offset:
                    raise StoreError(f"{key}: {size} bytes, cannot write at {offset}")
                if size > offset:
                    os.ftruncate(fd, offset)
                writev_all(fd, data, offset)
                if self.fsync and sync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            if created and self.fsync and sync:
                fsync_dir(d)
        except OSError as e:
            if e.errno == errno.ENOENT:
                self._known_dirs.discard(d)
            raise _classify(e, key) from e

    def _get_sync(self, key: str, start: int | None, end: int | None, pooled: bool = False) -> bytes:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise _classify(e, key) from e
        try:
            size = os.fstat(fd).st_size
            lo = min(start or 0, size)
            hi = size if end is None else min(end, size)
            if self._direct and lo == 0 and hi == size >= _DIRECT_MIN:
                data = self._read_direct(key, size, pooled)
                if data is not None:
                    return data
            # Ask for the whole range at once: the kernel then reads it in large requests
            # instead of growing its readahead window from 128 KiB on every object.
            os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)
            parts = []
            pos = lo
            while pos < hi:
                chunk = os.pread(fd, hi - pos, pos)
                if not chunk:
                    break
                parts.append(chunk)
                pos += len(chunk)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        except OSError as e:
            raise _classify(e, key) from e
        finally:
            os.close(fd)

    def _read_direct(self, key: str, size: int, pooled: bool = False) -> bytes | None:
        """Read a whole big object with O_DIRECT (None when the file system refuses it): no
        page cache pages to allocate and evict. `pooled`: the result is a memoryview into a
        buffer of the read pool (no copy, no page faults); otherwise fresh bytes."""
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._direct = False
            return None
        try:
            padded = -(-size // _ALIGN) * _ALIGN
            view = memoryview(self._read_pool.take(padded) if pooled else _aligned_buffer(padded))
            try:
                got = 0
                while got < size:
                    n = os.preadv(fd, [view[got:padded]], got)
                    if n <= 0:
                        break
                    got += n
                if pooled:
                    return view[:min(got, size)]  # type: ignore[return-value]  # a bytes-like view
                return bytes(view[:min(got, size)])
            finally:
                if not pooled:
                    view.release()
        finally:
            os.close(fd)

    def _head_sync(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise _classify(e, key) from e
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def _delete_sync(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _classify(e, key) from e

    def _list_sync(self, prefix: str) -> list[ObjectInfo]:
        # Walk only the directory that can contain the prefix.
        base_dir = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = os.path.join(self.root, base_dir)
        out: list[ObjectInfo] = []
        if not os.path.isdir(top):
            return out
        for dirpath, dirnames, filenames in os.walk(top):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel + "/"
            dirnames[:] = [d for d in dirnames if (rel + d + "/").startswith(prefix) or prefix.startswith(rel + d + "/")]
            for fn in filenames:
                key = rel + fn
                if _TMP_SUFFIX in fn or not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, fn))
                except FileNotFoundError:
                    continue
                out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        out.sort(key=lambda i: i.key)
        return out

    async def _run(self, fn, *args):
        # Abandon on cancel: a disk that hangs must not hang the caller past its timeout.
        # Puts stay safe to abandon: they are atomic and idempotent per key.
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter, abandon_on_cancel=True)

    # -- ObjectStore ---------------------------------------------------------------
    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        return await self._run(self._get_sync, key, start, end)

    async def get_checked(self, key: str, check: Callable[[bytes], T] | None, *,
                          buffer: bool = False) -> tuple[bytes, T | None]:
        # Read and check in one worker-thread call: a second hop per block costs a thread
        # handoff and GIL round trips that cap cold sequential reads.
        return await self._run(self._get_checked_sync, key, check, buffer)

    def _get_checked_sync(self, key: str, check, buffer: bool):
        data = self._get_sync(key, None, None, pooled=buffer)
        return data, (check(data) if check is not None else None)

    async def put(self, key: str, data, *, create_only: bool = False, sync: bool = True) -> None:
        self._forget_append(key)
        await self._run(self._put_sync, key, data, create_only, sync)

    def _put_many_sync(self, items, sync: bool) -> None:
        for key, data in items:
            self._put_sync(key, data, False, sync)

    async def put_many(self, items, *, sync: bool = True) -> None:
        await self._run(self._put_many_sync, list(items), sync)

    async def write_at(self, key: str, data, offset: int, *, sync: bool = True) -> None:
        data = _parts(data)
        n = sum(len(b) for b in data)
        app = self._appends.get(key)
        if app is not None and sync and offset <= app[1] and n <= _INLINE_APPEND_MAX:
            fd, size = self._appends.pop(key)
            try:
                if size > offset:
                    os.ftruncate(fd, offset)
                writev_all(fd, data, offset)
                try:
                    await self._syncer.fdatasync(fd)
                except NotSubmitted:
                    await self._run(os.fdatasync, fd)
            except BaseException as e:
                os.close(fd)       # also when cancelled: the next append finds the size out again
                if isinstance(e, OSError):
                    raise _classify(e, key) from e
                raise
            self._appends[key] = (fd, offset + n)
            return
        self._forget_append(key)
        await self._run(self._write_at_sync, key, data, offset, sync)
        if sync and self.fsync and self._syncer.available():
            self._keep_open(key, offset + n)

    def _keep_open(self, key: str, size: int) -> None:
        """Hold `key` open for the next appends (done on the trio thread: the file exists and
        its directory is cached, so this is a page-cache lookup)."""
        try:
            fd = os.open(self._path(key), os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return          # gone meanwhile: the next append takes the thread path
        self._appends[key] = (fd, size)
        while len(self._appends) > _OPEN_APPENDS:
            os.close(self._appends.pop(next(iter(self._appends)))[0])

    def _forget_append(self, key: str) -> None:
        app = self._appends.pop(key, None)
        if app is not None:
            os.close(app[0])

    async def aclose(self) -> None:
        for fd, _ in self._appends.values():
            os.close(fd)
        self._appends.clear()
        self._syncer.close()

    def _barrier_sync(self) -> None:
        if not self.fsync:
            return
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc is not None and _libc.syncfs(fd) == 0:
                return
            os.sync()
        finally:
            os.close(fd)

    async def barrier(self) -> None:
        await self._run(self._barrier_sync)

    def _sync_keys_sync(self, keys: Sequence[str]) -> None:
        for key in keys:
            try:
                fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue   # deleted meanwhile (or never landed here: a replica's repair queue has it)
            except OSError as e:
                raise _classify(e, key) from e
            try:
                os.fdatasync(fd)
            except OSError as e:
                raise _classify(e, key) from e
            finally:
                os.close(fd)

    def _sync_dirs_sync(self, dirs: Sequence[str]) -> None:
        for d in dirs:
            try:
                fsync_dir(d)
            except OSError as e:
                raise _classify(e, d) from e

    async def sync(self, keys: Sequence[str]) -> None:
        """fdatasync the objects (a few threads at once, so the file system batches its
        journal commits), then their directories."""
        if not self.fsync or not keys:
            return
        keys = list(keys)
        lanes = min(4, len(keys))
        errors: list[StoreError] = []

        async def lane(part: list[str]) -> None:
            try:
                await self._run(self._sync_keys_sync, part)
            except StoreError as e:
                errors.append(e)

        async with trio.open_nursery() as n:
            for i in range(lanes):
                n.start_soon(lane, keys[i::lanes])
        if errors:
            raise errors[0]
        dirs = sorted({os.path.dirname(self._path(k)) for k in keys})
        await self._run(self._sync_dirs_sync, dirs)

    async def head(self, key: str) -> ObjectInfo | None:
        return await self._run(self._head_sync, key)

    async def delete(self, key: str) -> None:
        self._forget_append(key)
        await self._run(self._delete_sync, key)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:  # type: ignore[override]
        for info in await self._run(self._list_sync, prefix):
            yield info

    def _check_sync(self) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise StoreError(f"store directory {self.root}: {e.strerror}") from e
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"store directory {self.root} is not writable")
        probe = os.path.join(self.root, ".probe" + _TMP_SUFFIX + secrets.token_hex(4))
        try:
            with open(probe, "wb") as f:
                f.write(b"x")
            os.unlink(probe)
        except OSError as e:
            raise StoreError(f"store directory {self.root} is not writable: {e.strerror}") from e

    async def check(self) -> None:
        await self._run(self._check_sync)
