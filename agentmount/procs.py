"""Watching other processes: is a pid alive, and waiting for it to exit (pidfd, no polling).

Used by `agentmount umount` (wait for the daemon to finish committing), the tests and the
benchmark. A zombie counts as exited: its work is done even if nobody reaped it yet.
"""
from __future__ import annotations

import os
import select


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_exit(pid: int, timeout: float) -> bool:
    """Block until `pid` has exited or `timeout` seconds pass; True when it exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)  # readable once the process has exited
        p.poll(max(0, int(timeout * 1000)))
    finally:
        os.close(fd)
    return not pid_alive(pid)
