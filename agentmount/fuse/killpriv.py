"""Which suid/sgid bits to drop, as Linux's VFS does (6.2+), once the kernel leaves it to us.

With FUSE_HANDLE_KILLPRIV_V2 negotiated (see _lowlevel.c) the kernel no longer changes the
mode itself:
  - write, truncate and open(O_TRUNC) by a caller without CAP_FSETID carry a flag (the kernel
    sets it exactly when the caller lacks CAP_FSETID); we then drop S_ISUID, and S_ISGID if
    the file is group-executable or the caller is not in the file's group;
  - chown/chgrp of anything but a directory arrives as a setattr of uid/gid, flagged whoever
    the caller (chown(-1, -1) as a setattr of nothing, unflagged): S_ISUID always goes;
    S_ISGID goes if the file is group-executable, or if the caller is neither in the file's
    (current) group nor has CAP_FSETID.
The caller's supplementary groups and capabilities come from /proc/<tid>/status, read only in
the rare case that decides the outcome (sgid without group-exec, caller's gid not the file's).
"""
from __future__ import annotations

import stat

CAP_FSETID = 4


def _proc_status(pid: int) -> tuple[frozenset[int], int] | None:
    """(supplementary groups, effective capabilities) of thread `pid`, None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read()
    except OSError:
        return None
    groups: frozenset[int] = frozenset()
    caps = 0
    for line in text.splitlines():
        if line.startswith(b"Groups:"):
            groups = frozenset(int(g) for g in line.split()[1:])
        elif line.startswith(b"CapEff:"):
            caps = int(line.split()[1], 16)
    return groups, caps


def _in_group(gid: int, pid: int, file_gid: int) -> bool:
    if gid == file_gid:
        return True
    st = _proc_status(pid)
    return st is not None and file_gid in st[0]


def _capable_fsetid(uid: int, pid: int) -> bool:
    st = _proc_status(pid)
    if st is None:
        return uid == 0
    return bool(st[1] >> CAP_FSETID & 1)


def after_modify(mode: int, file_gid: int, uid: int, gid: int, pid: int) -> int:
    """The mode after a write/truncate/open(O_TRUNC) the kernel flagged: the caller lacks CAP_FSETID."""
    if not stat.S_ISREG(mode) or not mode & (stat.S_ISUID | stat.S_ISGID):
        return mode
    new = mode & ~stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not _in_group(gid, pid, file_gid)):
        new &= ~stat.S_ISGID
    return new


def after_chown(mode: int, file_gid: int, uid: int, gid: int, pid: int) -> int:
    """The mode after chown/chgrp (any caller) of a file whose group was `file_gid`."""
    if stat.S_ISDIR(mode) or not mode & (stat.S_ISUID | stat.S_ISGID):
        return mode
    new = mode & ~stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not (_in_group(gid, pid, file_gid)
                                                          or _capable_fsetid(uid, pid))):
        new &= ~stat.S_ISGID
    return new
