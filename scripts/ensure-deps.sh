#!/usr/bin/env bash
# Install the system packages agentmount needs (Debian/Ubuntu), only when missing.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
pkg-config --exists fuse3 2>/dev/null || need+=(libfuse3-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
command -v getfattr >/dev/null 2>&1 || need+=(attr)
command -v flock >/dev/null 2>&1 || need+=(util-linux)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v mount >/dev/null 2>&1 || need+=(mount)
# for the tests only (make test): the unit is checked with systemd-analyze (systemd need not run)
if [ "${TEST_DEPS:-0}" = 1 ]; then
  command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
  command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
fi
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then need+=(python3-venv); fi
if ! "$PYTHON" -c 'import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' >/dev/null 2>&1; then
  need+=(python3-dev)
fi
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
echo "installing system packages: ${need[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
