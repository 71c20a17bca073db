"""Can this process mount FUSE here? Checks made before mounting, each failing with one line.

Containers are where mounts most often fail, always for the same few reasons: no
/dev/fuse device, no CAP_SYS_ADMIN, or a setuid fusermount3 that cannot gain
privileges. Each check names the flag to add instead of surfacing libfuse's error.
"""
from __future__ import annotations

import errno
import os
import shutil

from agentmount.errors import MountError

CAP_SYS_ADMIN = 21
DEVICE_HINT = "run the container with --device /dev/fuse (on a host: modprobe fuse)"
CAP_HINT = "run the container with --cap-add SYS_ADMIN (--privileged is not needed)"


def _status() -> dict[str, str]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = v.strip()
    except OSError:
        pass
    return out


def _has_cap(mask: str | None, cap: int) -> bool | None:
    if not mask:
        return None
    try:
        return bool(int(mask, 16) >> cap & 1)
    except ValueError:
        return None


def check_fuse_device(path: str = "/dev/fuse") -> None:
    """/dev/fuse exists and this process may open it."""
    if not os.path.exists(path):
        raise MountError(f"{path} is missing: {DEVICE_HINT}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EACCES:
            # The node is there but its mode keeps this user out (a host without the udev rule
            # that makes it 0666 passes its mode on through --device).
            mode = os.stat(path).st_mode & 0o777
            raise MountError(f"{path} (mode {mode:o}) cannot be opened by uid {os.getuid()}: run the peer as "
                             "root (--user root), or make /dev/fuse mode 666 on the host") from None
        if e.errno in (errno.EPERM, errno.ENXIO, errno.ENODEV):
            raise MountError(f"{path} cannot be opened ({e.strerror}): {DEVICE_HINT}") from None
        raise MountError(f"{path}: {e.strerror}") from None
    os.close(fd)


def check_mount_capability() -> None:
    """This process can mount: CAP_SYS_ADMIN itself, or through the setuid fusermount3."""
    st = _status()
    bounding = _has_cap(st.get("CapBnd"), CAP_SYS_ADMIN)
    effective = _has_cap(st.get("CapEff"), CAP_SYS_ADMIN)
    if effective:
        return
    if bounding is False:
        raise MountError(f"mounting needs CAP_SYS_ADMIN, which this process cannot get: {CAP_HINT}")
    if effective is None:
        return   # no /proc: let the mount itself say what is wrong
    # Without the capability the mount goes through the setuid-root fusermount3.
    if shutil.which("fusermount3") is None:
        raise MountError("mounting without CAP_SYS_ADMIN needs fusermount3 (apt-get install fuse3), "
                         "or run as root")
    if st.get("NoNewPrivs") == "1":
        raise MountError("no_new_privs is set, so the setuid fusermount3 cannot mount: run as root with "
                         "CAP_SYS_ADMIN, or without no-new-privileges")


def explain_mount_failure(mp: str, err: BaseException) -> MountError:
    """libfuse refused to mount after the checks passed: the usual cause in a container."""
    return MountError(f"cannot mount {mp}: {err} (in a container: --device /dev/fuse --cap-add SYS_ADMIN; "
                      "Docker's default AppArmor profile also blocks mounts: --security-opt apparmor:unconfined)")
