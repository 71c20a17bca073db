"""The kernel's security.capability lookups, answered in the FUSE layer while no file has one.

The kernel asks for that xattr before the first write to a file and at every chown; while no
file of the mount carries one, the C layer answers ENODATA itself. Storing one turns that off
before it exists, and a mount that loads a workspace holding one never turns it on.
"""
from __future__ import annotations

import errno
import json
import os
import struct

import pytest

# struct vfs_cap_data, revision 2, effective, CAP_NET_BIND_SERVICE permitted
CAP = struct.pack("<IIIII", 0x02000000 | 0x1, 1 << 10, 0, 0, 0)


def info(mount) -> dict:
    return json.loads(os.getxattr(mount.mp, "user.agentmount.fuse"))["info"]


def test_capability_lookups_skip_python_until_a_file_has_one(mount):
    assert info(mount)["no_capabilities"] is True
    before = info(mount)["capability_shortcuts"]
    p = mount.ws / "f"
    p.write_bytes(b"x" * 100)
    os.chown(p, 1000, 1000)
    assert info(mount)["capability_shortcuts"] >= before + 1
    with pytest.raises(OSError) as e:
        os.getxattr(p, "security.capability")
    assert e.value.errno == errno.ENODATA

    os.setxattr(p, "security.capability", CAP)
    assert info(mount)["no_capabilities"] is False
    assert os.getxattr(p, "security.capability") == CAP
    shortcuts = info(mount)["capability_shortcuts"]
    q = mount.ws / "g"
    q.write_bytes(b"y")            # the kernel's lookups now reach Python
    assert q.read_bytes() == b"y" and info(mount)["capability_shortcuts"] == shortcuts

    mount.remount()                # a workspace that holds one: never answered in C
    assert info(mount)["no_capabilities"] is False
    assert os.getxattr(mount.ws / "f", "security.capability") == CAP


def test_a_write_removes_the_capability_whatever_the_open_mode(mount):
    """Linux drops security.capability at a file's first write by anyone: the kernel does it
    for writes through the page cache, the daemon for a write-only (direct I/O) handle."""
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND):
        p = mount.ws / f"bin{flags}"
        p.write_bytes(b"\x7fELF" + bytes(60))
        os.setxattr(p, "security.capability", CAP)
        fd = os.open(p, flags)
        try:
            assert os.pwrite(fd, b"patched", 8) == 7 if not flags & os.O_APPEND else os.write(fd, b"patched") == 7
        finally:
            os.close(fd)
        with pytest.raises(OSError) as e:
            os.getxattr(p, "security.capability")
        assert e.value.errno == errno.ENODATA, flags
        assert b"patched" in p.read_bytes()
