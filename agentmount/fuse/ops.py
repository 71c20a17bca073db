"""`Operations`: pyfuse3 request handlers. Decode, call the VFS, encode errno.

Nothing here holds state beyond the VFS reference and cache timeouts. Any
FsError becomes FUSEError(errno); any other exception is logged and becomes
EIO, so a bug never hangs or crashes the mount.

Beyond pyfuse3 (through fuse/lowlevel.py): lock requests (getlk/setlk/flock go to
`vfs.locks`; flush and release drop the locks of their lock owner), and, with
FUSE_HANDLE_KILLPRIV_V2, dropping suid/sgid on write, truncate, open(O_TRUNC) and chown
(see killpriv.py). Handlers read `lowlevel.request()` before their first await.
"""
from __future__ import annotations

import errno
import functools
import json
import logging
import os

import pyfuse3

from agentmount.errors import FsError
from agentmount.meta.actor import ACTOR
from agentmount.fuse import killpriv, lowlevel
from agentmount.vfs.vfs import VFS, Attr

log = logging.getLogger("agentmount.fuse")

# getxattr on the mount root: JSON of Operations.fuse_stats() (requests per opcode, what INIT
# negotiated, lock service counters).
FUSE_STATS_XATTR = b"user.agentmount.fuse"


def _errors(fn):
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        ctx = args[-1] if args else None
        if isinstance(ctx, pyfuse3.RequestContext):
            ACTOR.set((ctx.uid, ctx.pid))      # who to name in the change's event
        try:
            return await fn(*args, **kwargs)
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


class Operations(pyfuse3.Operations):
    """See module docstring."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, vfs: VFS, attr_timeout: float = 1.0, entry_timeout: float = 1.0) -> None:
        super().__init__()
        self.vfs = vfs
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        # Lock requests go to the VFS's lock service; without one the kernel keeps locks local.
        self.locks = getattr(vfs, "locks", None)
        # The kernel's security.capability lookups are answered in C while no file has one.
        lowlevel.set_no_capabilities(not vfs.capabilities_seen)
        vfs.on_capability = lambda: lowlevel.set_no_capabilities(False)
        if not lowlevel.HOOKED:
            log.warning("pyfuse3 was imported before agentmount.fuse: no lock requests, no KILLPRIV_V2")
        if self.locks is not None:
            self.locks.replier = lowlevel
            lowlevel.set_lock_handler(self._lock_request, self.locks.interrupt)

    def fuse_stats(self) -> dict:
        return {"info": lowlevel.info(), "ops": {str(k): v for k, v in lowlevel.op_counts().items()},
                "locks": self.locks.status() if self.locks is not None else None}

    def _lock_request(self, token, kind, ino, fh, owner, type, start, end, sleep, pid) -> None:
        """getlk/setlk/flock, called by _lowlevel on the trio thread: decode, call, map errors.
        The lock service answers through lowlevel.reply_*, now or when a waiter is granted."""
        try:
            if kind == lowlevel.KIND_GETLK:
                self.locks.getlk(token, ino, owner, type, start, end)
            elif kind == lowlevel.KIND_SETLK:
                self.locks.setlk(token, ino, fh, owner, type, start, end, bool(sleep), pid)
            else:
                self.locks.flock(token, ino, fh, owner, type, bool(sleep), pid)
        except FsError as e:
            lowlevel.reply_err(token, e.errno)
        except Exception:
            log.exception("lock request failed")
            lowlevel.reply_err(token, errno.ENOLCK)

    async def _drop_privs(self, inode: int, r: lowlevel.Request, rule) -> None:
        """Drop suid/sgid as `rule` (killpriv.after_*) says, for a request the kernel flagged."""
        a = await self.vfs.getattr(inode)
        mode = rule(a.mode, a.gid, r.uid, r.gid, r.pid)
        if mode != a.mode:
            await self.vfs.setattr(inode, {"mode": mode})
            try:
                pyfuse3.invalidate_inode(inode, True)   # attributes only: does not block
            except OSError:
                pass

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        # A follower's kernel may cache only as long as its leader promises to tell of changes.
        e.entry_timeout = min(self.entry_timeout, a.ttl)
        e.attr_timeout = min(self.attr_timeout, a.ttl)
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = 4096
        e.st_blocks = (a.size + 511) // 512
        e.st_atime_ns = a.atime
        e.st_mtime_ns = a.mtime
        e.st_ctime_ns = a.ctime
        return e

    def _ref(self, a: Attr) -> pyfuse3.EntryAttributes:
        """An entry reply: the kernel holds one more lookup reference to the inode until it forgets it."""
        self.vfs.ref(a.ino)
        return self._entry(a)

    @_errors
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            return self._ref(await self.vfs.lookup(parent_inode, name))
        except FsError as e:
            if e.errno != errno.ENOENT or parent_inode == pyfuse3.ROOT_INODE:
                raise
            # A negative entry (inode 0) lets the kernel cache "no such name" like any entry:
            # the create that usually follows skips a round trip. Changes made through this
            # mount update the kernel's dentry; the mount root is left uncached because
            # workspaces also appear through the control socket.
            e2 = pyfuse3.EntryAttributes()
            e2.st_ino = 0
            e2.entry_timeout = min(self.entry_timeout, self.vfs.kernel_ttl(parent_inode))
            return e2

    async def forget(self, inode_list):
        try:
            await self.vfs.forget(inode_list)
        except Exception:  # noqa: BLE001 - forget has no reply to carry an error
            log.exception("forget failed")

    @_errors
    async def getattr(self, inode, ctx=None):
        return self._entry(await self.vfs.getattr(inode))

    @_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        r = lowlevel.request()
        changes = {}
        if fields.update_mode:
            changes["mode"] = attr.st_mode
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_size:
            changes["size"] = attr.st_size
        if fields.update_atime:
            changes["atime"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime"] = attr.st_mtime_ns
        if "mode" not in changes and r.opcode == lowlevel.FUSE_SETATTR and lowlevel.killpriv_v2():
            # The kernel leaves suid/sgid to us and flags truncate by a caller without
            # CAP_FSETID, and chown of a non-directory by anyone; chown(-1, -1) arrives as a
            # setattr of nothing, unflagged.
            chown = "uid" in changes or "gid" in changes or not changes
            if r.kill_suidgid or not changes:
                a = await self.vfs.getattr(inode)
                rule = killpriv.after_chown if chown else killpriv.after_modify
                mode = rule(a.mode, a.gid, r.uid, r.gid, r.pid)
                if mode != a.mode:
                    changes["mode"] = mode
        return self._entry(await self.vfs.setattr(inode, changes))

    @_errors
    async def readlink(self, inode, ctx):
        return await self.vfs.readlink(inode)

    @_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._ref(await self.vfs.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid))

    @_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        import stat
        return self._ref(await self.vfs.mknod(parent_inode, name, (mode & 0o7777) | stat.S_IFDIR, 0,
                                                ctx.uid, ctx.gid))

    @_errors
    async def symlink(self, parent_inode, name, target, ctx):
        import stat
        return self._ref(await self.vfs.mknod(parent_inode, name, stat.S_IFLNK | 0o777, 0, ctx.uid, ctx.gid,
                                                target=target))

    @_errors
    async def unlink(self, parent_inode, name, ctx):
        await self.vfs.unlink(parent_inode, name, is_dir=False)

    @_errors
    async def rmdir(self, parent_inode, name, ctx):
        await self.vfs.unlink(parent_inode, name, is_dir=True)

    @_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.vfs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self._ref(await self.vfs.link(inode, new_parent_inode, new_name))

    @_errors
    async def open(self, inode, flags, ctx):
        r = lowlevel.request()
        if r.kill_suidgid and r.opcode == lowlevel.FUSE_OPEN:   # O_TRUNC, caller without CAP_FSETID
            await self._drop_privs(inode, r, killpriv.after_modify)
        fh = await self.vfs.open(inode, flags)
        return self._file_info(fh, inode)

    @_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        fh, attr = await self.vfs.create(parent_inode, name, mode, flags, ctx.uid, ctx.gid)
        return self._file_info(fh, attr.ino), self._ref(attr)

    def _file_info(self, fh: int, inode: int) -> pyfuse3.FileInfo:
        # A write-only handle never reads through the page cache, and through it every write()
        # that does not start on a page boundary (tar's, say) would reach us as two or three
        # WRITE requests (the kernel ends one at each partly written page). Direct I/O sends
        # each write() whole (vfs.write then does what the page-cache path left to the kernel).
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.vfs.cacheable(inode, pages=True),
                                direct_io=self.vfs.files[fh].direct)

    @_errors
    async def read(self, fh, off, size):
        return await self.vfs.read(fh, off, size)

    @_errors
    async def write(self, fh, off, buf):
        r = lowlevel.request()
        if r.kill_suidgid and r.opcode == lowlevel.FUSE_WRITE:   # caller without CAP_FSETID
            await self._drop_privs(r.ino, r, killpriv.after_modify)
        return await self.vfs.write(fh, off, buf)

    @_errors
    async def flush(self, fh):
        r = lowlevel.request()
        try:
            await self.vfs.flush(fh)
        finally:
            # A close by lock_owner: its POSIX locks go, once the data is flushed.
            if self.locks is not None and r.opcode == lowlevel.FUSE_FLUSH and r.fh == fh:
                await self.locks.flush(r.ino, r.lock_owner)

    @_errors
    async def release(self, fh):
        r = lowlevel.request()
        try:
            await self.vfs.release(fh)
        finally:
            # The last close of the open file description: its flock (and OFD locks) go.
            if self.locks is not None and r.opcode == lowlevel.FUSE_RELEASE and r.fh == fh:
                await self.locks.release(r.ino, fh, r.lock_owner, r.flock_release)

    @_errors
    async def fsync(self, fh, datasync):
        await self.vfs.fsync(fh, datasync)

    @_errors
    async def opendir(self, inode, ctx):
        return await self.vfs.opendir(inode)

    @_errors
    async def readdir(self, fh, start_id, token):
        for name, attr, nxt in await self.vfs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self._entry(attr), nxt):
                break
            if name not in (b".", b".."):
                self.vfs.ref(attr.ino)

    @_errors
    async def releasedir(self, fh):
        await self.vfs.releasedir(fh)

    @_errors
    async def fsyncdir(self, fh, datasync):
        await self.vfs.fsyncdir(fh)

    @_errors
    async def statfs(self, ctx):
        s = await self.vfs.statfs()
        r = pyfuse3.StatvfsData()
        r.f_bsize = s["bsize"]
        r.f_frsize = s["frsize"]
        r.f_blocks = s["blocks"]
        r.f_bfree = s["bfree"]
        r.f_bavail = s["bavail"]
        r.f_files = s["files"]
        r.f_ffree = s["ffree"]
        r.f_favail = s["favail"]
        r.f_namemax = s["namemax"]
        return r

    @_errors
    async def setxattr(self, inode, name, value, ctx):
        await self.vfs.setxattr(inode, name, value)

    @_errors
    async def getxattr(self, inode, name, ctx):
        if inode == pyfuse3.ROOT_INODE and name == FUSE_STATS_XATTR:
            return json.dumps(self.fuse_stats()).encode()
        return await self.vfs.getxattr(inode, name)

    @_errors
    async def listxattr(self, inode, ctx):
        return await self.vfs.listxattr(inode)

    @_errors
    async def removexattr(self, inode, name, ctx):
        await self.vfs.removexattr(inode, name)

    async def access(self, inode, mode, ctx):
        # Only reached without default_permissions; the kernel checks modes itself.
        return True


def mount_options(fsname: str) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts.add(f"fsname={fsname}")
    opts.add("subtype=agentmount")
    if os.getuid() == 0 or _user_allow_other():
        opts.add("allow_other")      # permissions are then checked per user (default_permissions)
    return opts


def _user_allow_other(path: str = "/etc/fuse.conf") -> bool:
    """fusermount3 lets a non-root user mount with allow_other only when fuse.conf says so."""
    try:
        with open(path) as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False
