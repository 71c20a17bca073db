#!/usr/bin/env bash
# Install agentmount's entry points for the host: the CLI at /usr/local/bin (where the
# systemd unit runs it), the fstab helper at /sbin/mount.fuse.agentmount (where mount(8)
# looks for it), the unit in /etc/systemd/system, and /etc/agentmount for configs.
#   BIN      directory holding the installed `agentmount` and `mount.fuse.agentmount`
#            (default: this checkout's .venv/bin)
#   DESTDIR  staging root (default: /)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$here/.venv/bin}"
DESTDIR="${DESTDIR:-}"
for exe in agentmount mount.fuse.agentmount; do
  if [ ! -x "$BIN/$exe" ]; then
    echo "install: $BIN/$exe is missing (run 'make venv' first, or set BIN)" >&2
    exit 1
  fi
done
install -d "$DESTDIR/usr/local/bin" "$DESTDIR/sbin" "$DESTDIR/etc/systemd/system" "$DESTDIR/etc/agentmount"
ln -sfn "$BIN/agentmount" "$DESTDIR/usr/local/bin/agentmount"
ln -sfn "$BIN/mount.fuse.agentmount" "$DESTDIR/sbin/mount.fuse.agentmount"
install -m 0644 "$here/systemd/agentmount@.service" "$DESTDIR/etc/systemd/system/agentmount@.service"
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
echo "installed: /usr/local/bin/agentmount, /sbin/mount.fuse.agentmount, agentmount@.service"
echo "next: put a config at /etc/agentmount/NAME.conf, then: systemctl enable --now agentmount@NAME"
