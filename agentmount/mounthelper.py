"""`mount.fuse.agentmount`: the helper mount(8) runs for `-t fuse.agentmount` and fstab lines.

mount(8) calls `mount.fuse.agentmount SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]`, where
SOURCE is the path of a mount.conf. Generic mount options (`_netdev`, `noauto`, `nofail`,
`x-systemd.*`, `rw`, `defaults`, ...) are for mount(8) and systemd and are accepted and
ignored; the one option that means something here is `config=PATH` (instead of SOURCE).
An unknown option is an error naming it. Exit status follows mount(8): 0 mounted, 1 bad
usage, 32 mount failure.
"""
from __future__ import annotations

import os
import sys

from agentmount import config as config_mod
from agentmount.errors import ConfigError, MountError

EX_USAGE = 1
EX_FAIL = 32

# Options meant for mount(8), the kernel's generic flags, or systemd's fstab generator.
_IGNORED = {"rw", "ro", "defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser",
            "owner", "group", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
            "relatime", "norelatime", "strictatime", "diratime", "nodiratime", "lazytime", "async",
            "sync", "silent", "loud"}
_IGNORED_PREFIXES = ("x-", "comment=", "_")


def parse_options(opts: list[str]) -> dict[str, str]:
    """Options this helper acts on, from `-o` lists; raises ValueError naming an unknown one."""
    out: dict[str, str] = {}
    for group in opts:
        for opt in filter(None, group.split(",")):
            key, eq, value = opt.partition("=")
            if key == "config" and eq:
                out[key] = value
            elif opt in _IGNORED or opt.startswith(_IGNORED_PREFIXES):
                continue
            else:
                raise ValueError(f"unknown mount option {opt!r} (agentmount takes config=PATH; "
                                 "generic options like _netdev, noauto, nofail and x-systemd.* are ignored)")
    return out


def parse_argv(argv: list[str]) -> tuple[str, str, dict[str, str], bool]:
    """(source, mountpoint, options, verbose) from mount(8)'s helper calling convention."""
    pos: list[str] = []
    opts: list[str] = []
    verbose = False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-o":
            if i + 1 >= len(argv):
                raise ValueError("-o needs an option list")
            opts.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("-o"):
            opts.append(a[2:])
        elif a.startswith("-") and len(a) > 1:
            # -s sloppy, -f fake, -n no mtab, -v verbose: the only flags mount(8) passes.
            for flag in a[1:]:
                if flag not in "sfnv":
                    raise ValueError(f"unknown flag -{flag}")
            verbose = verbose or "v" in a
            if "f" in a:
                raise ValueError("-f (fake mount) is not supported")
        else:
            pos.append(a)
        i += 1
    if len(pos) != 2:
        raise ValueError("usage: mount.fuse.agentmount CONFIG MOUNTPOINT [-o OPTIONS]")
    return pos[0], pos[1], parse_options(opts), verbose


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    prog = "mount.fuse.agentmount"
    try:
        source, mp, opts, verbose = parse_argv(argv)
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EX_USAGE
    conf = opts.get("config") or source
    if not os.path.isfile(conf):
        print(f"{prog}: {conf}: no such config file (the fstab source is the path of a mount.conf)",
              file=sys.stderr)
        return EX_USAGE
    from agentmount import daemon
    try:
        cfg = config_mod.load(conf)
        daemon.mount(cfg, mp, foreground=False)
    except ConfigError as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return EX_USAGE
    except MountError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EX_FAIL
    if verbose:
        print(f"{prog}: mounted {os.path.abspath(mp)} from {conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
