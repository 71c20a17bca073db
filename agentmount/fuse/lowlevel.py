"""Load the C extension `_lowlevel` so that it takes effect: with RTLD_GLOBAL, before pyfuse3.

pyfuse3 is loaded RTLD_NOW, so its calls to `fuse_session_new` and `fuse_session_process_buf`
bind when it is imported, to the first definition in the global scope: `_lowlevel`'s, if it is
there by then (see _lowlevel.c). agentmount/fuse/__init__.py imports this module, so any import
of agentmount.fuse.* loads it; code that imports pyfuse3 itself must import agentmount.fuse
first. If pyfuse3 got in first anyway, `HOOKED` is False, the mount works as before (locks stay
local to this host) and `active()` says so once mounted.

Environment: AGENTMOUNT_KILLPRIV_V2=0 keeps FUSE_HANDLE_KILLPRIV_V2 off (the kernel then clears
suid/sgid itself, at the cost of a getxattr request before every write).
"""
from __future__ import annotations

import os
import sys
from typing import NamedTuple

HOOKED = "pyfuse3" not in sys.modules

_flags = sys.getdlopenflags()
sys.setdlopenflags(_flags | os.RTLD_GLOBAL)
try:
    from agentmount.fuse import _lowlevel as ext
finally:
    sys.setdlopenflags(_flags)

KIND_GETLK = ext.KIND_GETLK
KIND_SETLK = ext.KIND_SETLK
KIND_FLOCK = ext.KIND_FLOCK
OFFSET_MAX = ext.OFFSET_MAX
FUSE_SETATTR = ext.FUSE_SETATTR
FUSE_OPEN = ext.FUSE_OPEN
FUSE_WRITE = ext.FUSE_WRITE
FUSE_FLUSH = ext.FUSE_FLUSH
FUSE_RELEASE = ext.FUSE_RELEASE
FUSE_GETXATTR = ext.FUSE_GETXATTR

set_lock_handler = ext.set_lock_handler
reply_err = ext.reply_err
reply_lock = ext.reply_lock
pending = ext.pending
op_counts = ext.op_counts
info = ext.info
killpriv_v2 = ext.killpriv_v2
set_no_capabilities = ext.set_no_capabilities


class Request(NamedTuple):
    """The request being dispatched; read it before the handler's first await."""
    opcode: int
    unique: int
    ino: int
    fh: int             # flush/release only
    uid: int
    gid: int
    pid: int            # the calling thread
    kill_suidgid: bool  # write/setattr/open: the kernel asks us to drop suid/sgid
    lock_owner: int     # flush/release only
    flock_release: bool  # release only


def request() -> Request:
    return Request(*ext.request())


def active() -> bool:
    """Whether the current session runs through the extension (true once mounted, if HOOKED)."""
    return bool(ext.info()["session_hooked"])


ext.enable_killpriv_v2(os.environ.get("AGENTMOUNT_KILLPRIV_V2", "1") not in ("0", "", "no", "false"))
