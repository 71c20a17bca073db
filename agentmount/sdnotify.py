"""systemd's service notification protocol (sd_notify), without libsystemd.

When the peer runs under a unit with `Type=notify`, systemd passes `$NOTIFY_SOCKET`;
the daemon sends `READY=1` once the mount serves, `STOPPING=1` when it starts its
clean shutdown, `STATUS=...` lines along the way, and `WATCHDOG=1` pings when the unit
sets `WatchdogSec=`. Outside systemd every call is a no-op. Invariant: a notification
never raises and never blocks (a datagram to a socket that is gone is dropped).
"""
from __future__ import annotations

import os
import socket

import trio


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or addr[0] not in "/@":
        return None
    return "\0" + addr[1:] if addr[0] == "@" else addr


def enabled() -> bool:
    """True when a service manager listens for notifications."""
    return _address() is not None


def notify(*fields: str) -> bool:
    """Send `KEY=value` fields in one datagram; False when nobody listens or it failed."""
    addr = _address()
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.setblocking(False)
            s.sendto("\n".join(fields).encode(), addr)
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Seconds between `WATCHDOG=1` pings (half of `WatchdogSec=`), or None when not asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not enabled() or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.05)
    except ValueError:
        return None


async def watchdog() -> None:
    """Ping the service manager while the trio loop runs (returns at once when not asked for)."""
    every = watchdog_interval()
    if every is None:
        return
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(every)
