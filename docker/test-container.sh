#!/usr/bin/env bash
# `make test-container`: build the agentmount image and check it in real containers (podman).
#
#  1. podman, runc and debootstrap are installed when missing (apt).
#  2. A Debian bookworm base image is built with debootstrap and imported as
#     localhost/debian:bookworm (once: reused while it exists), so no registry is needed.
#  3. docker/Dockerfile is built as localhost/agentmount:test on that base.
#  4. Bad input: the image run without --device /dev/fuse, or without --cap-add SYS_ADMIN,
#     must fail with one line (no traceback) saying what to add.
#  5. A peer runs in a container as the image's user (--device /dev/fuse --cap-add
#     SYS_ADMIN, no --privileged) with a host directory as its state volume; files (one of
#     20 MiB, random) are written into /agents/default with `podman exec` and read back; the
#     container is stopped (SIGTERM) right after the last close; a NEW container on the same
#     volume must show every file with its checksum; `agentmount fsck` on it must be clean.
#     The same again with Docker's capability rules for a non-root user (no effective
#     capabilities: the mount goes through the setuid fusermount3).
#  6. Sharing: a root peer mounts on a host directory through an rshared bind of its parent;
#     an agent container binding that parent (rslave) uses the workspace, and keeps using
#     it when the peer is replaced after SIGTERM and after SIGKILL. An agent that bound the
#     mountpoint itself gets ENOTCONN after the first replacement (docker/README.md).
#
# Prints PASS/FAIL lines and the time of each phase; exits 1 if anything failed. Needs
# root (debootstrap, rootful podman). Flags that work on these machines (STACK.md): runc
# with cgroupfs (crun fails on hybrid cgroups) and explicit ulimits (runc fails without).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E "$0" "$@"
fi

IMAGE=${IMAGE:-localhost/agentmount:test}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian:bookworm}
SUITE=bookworm
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)
LIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=1000:1000)
UID_GID=10001:10001          # the image's `agentmount` user
NAME=agentmount-test-$$
WORK=$(mktemp -d /tmp/agentmount-container-test.XXXXXX)
START=$SECONDS
PHASE=
PHASE_START=$SECONDS
FAILS=0
CONTAINERS=()
HOST_MOUNTS=()

pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }
note() { echo "NOTE: $*"; }
indent() { sed 's/^/   | /'; }
phase() {
  if [ -n "$PHASE" ]; then echo "   [$PHASE: $((SECONDS - PHASE_START)) s]"; fi
  PHASE=$1
  PHASE_START=$SECONDS
  [ "$1" = done ] || echo "== $1"
}

cleanup() {
  local c i m
  for c in "${CONTAINERS[@]}"; do
    "${PODMAN[@]}" rm -f -v -t 0 "$c" >/dev/null 2>&1   # -v: its anonymous volumes too
  done
  for ((i = ${#HOST_MOUNTS[@]} - 1; i >= 0; i--)); do
    m=${HOST_MOUNTS[i]}
    umount -l "$m" 2>/dev/null
  done
  rm -rf "$WORK"
}

finish() {
  phase done
  cleanup
  trap - EXIT
  echo "total: $((SECONDS - START)) s"
  if [ "$FAILS" -eq 0 ]; then
    echo "RESULT: PASS"
    exit 0
  fi
  echo "RESULT: FAIL ($FAILS failed)"
  exit 1
}
die() {
  fail "$*"
  finish
}
trap cleanup EXIT
trap 'echo "interrupted"; cleanup; exit 130' INT TERM

# wait_until SECONDS DESCRIPTION CMD...: poll CMD every 0.2 s until it succeeds or time is up.
wait_until() {
  local limit=$1 what=$2
  shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $end ]; then
      echo "   timed out after ${limit}s waiting for: $what"
      return 1
    fi
    sleep 0.2
  done
}

running() { [ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$1" 2>/dev/null)" = "true" ]; }
# mounted CONTAINER MOUNTPOINT: an agentmount FUSE mount serves there in the container.
mounted() { "${PODMAN[@]}" exec "$1" grep -q " $2 fuse.agentmount " /proc/self/mounts; }
host_mounted() { grep -q " $1 fuse.agentmount " /proc/self/mounts; }
stopped() { ! running "$1"; }
up_or_gone() { ! running "$1" || mounted "$1" "$2"; }

# start_peer NAME MOUNTPOINT RUN-ARGS... IMAGE [ARGS...]: run a peer, wait until it serves.
start_peer() {
  local name=$1 mp=$2
  shift 2
  CONTAINERS+=("$name")
  "${PODMAN[@]}" run -d --name "$name" "${LIMITS[@]}" "$@" >/dev/null || return 1
  wait_until 120 "$name: $mp mounted" up_or_gone "$name" "$mp" || return 1
  if ! running "$name"; then
    echo "   $name exited; its output:"
    "${PODMAN[@]}" logs "$name" 2>&1 | tail -20 | indent
    return 1
  fi
}

# stop_peer NAME: SIGTERM (podman stop), then the peer must have exited 0 (committed, unmounted).
stop_peer() {
  local name=$1 t0=$SECONDS code
  "${PODMAN[@]}" stop -t 120 "$name" >/dev/null
  code=$("${PODMAN[@]}" inspect -f '{{.State.ExitCode}}' "$name")
  if [ "$code" = "0" ]; then
    pass "$name stopped by SIGTERM in $((SECONDS - t0)) s, exit status 0"
  else
    fail "$name: exit status $code after podman stop (137: killed, SIGTERM did not end it)"
    "${PODMAN[@]}" logs "$name" 2>&1 | tail -20 | indent
  fi
}

# ---------------------------------------------------------------------------------------
phase "tools (podman, runc, debootstrap)"
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; } || die "apt-get install ${need[*]}"
fi
echo "$(podman --version), $(runc --version | head -1)"
[ -c /dev/fuse ] || die "/dev/fuse is missing on this host (modprobe fuse)"

# --device copies the host node's mode into the container. Debian/Ubuntu hosts make
# /dev/fuse 0666 (udev), which the image's non-root user needs; a host without that udev
# rule has 0600 (only root could open it). Then lend the containers a 0666 node of the
# same device instead of changing the host's.
FUSE_DEV=/dev/fuse
if [ "$(stat -c %a /dev/fuse)" != 666 ]; then
  FUSE_DEV=$WORK/dev-fuse
  mknod -m 0666 "$FUSE_DEV" c "$((16#$(stat -c %t /dev/fuse)))" "$((16#$(stat -c %T /dev/fuse)))" \
    || die "mknod $FUSE_DEV"
  note "this host's /dev/fuse is $(stat -c %a /dev/fuse) (no udev rule); the containers get a 0666" \
       "node of the same device, as on a Debian/Ubuntu host"
fi
FUSE=(--device "$FUSE_DEV:/dev/fuse" --cap-add SYS_ADMIN)

# ---------------------------------------------------------------------------------------
phase "base image $BASE_IMAGE"
if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
  echo "exists: reused (podman rmi $BASE_IMAGE to rebuild it)"
else
  mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  mirror=${mirror:-http://deb.debian.org/debian}
  root="$WORK/rootfs"
  echo "debootstrap --variant=minbase $SUITE from $mirror"
  debootstrap --variant=minbase "$SUITE" "$root" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; die "debootstrap"; }
  # security updates too, and no package lists in the image, as in Debian's official image
  cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $SUITE main
deb $mirror $SUITE-updates main
deb ${mirror%/debian}/debian-security $SUITE-security main
EOF
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" -c . | "${PODMAN[@]}" import - "$BASE_IMAGE" >/dev/null || die "podman import"
  rm -rf "$root"
  pass "base image $BASE_IMAGE built with debootstrap"
fi

# ---------------------------------------------------------------------------------------
phase "image $IMAGE"
build=("${PODMAN[@]}" build --network host --ulimit nofile=20000:20000 --build-arg "BASE=$BASE_IMAGE"
       -f docker/Dockerfile -t "$IMAGE")
# A host behind a TLS-intercepting proxy keeps the proxy's CA in /usr/local/share/ca-certificates:
# lend it to the build (the build's update-ca-certificates adds it; pip then trusts the proxy).
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  build+=(-v /usr/local/share/ca-certificates:/usr/local/share/ca-certificates:ro)
fi
t0=$SECONDS
if "${build[@]}" . >"$WORK/build.log" 2>&1; then
  pass "image built in $((SECONDS - t0)) s ($("${PODMAN[@]}" image inspect -f '{{.Size}}' "$IMAGE" \
        | awk '{printf "%d MB", $1 / 1e6}'))"
else
  tail -40 "$WORK/build.log"
  die "podman build"
fi
user=$("${PODMAN[@]}" image inspect -f '{{.Config.User}}' "$IMAGE")
[ "$user" = agentmount ] && pass "the image runs as user agentmount" || fail "image user is '$user'"

# ---------------------------------------------------------------------------------------
phase "bad input: one clear line, no traceback"
# expect_one_line DESCRIPTION NEEDLE RUN-ARGS...: the image fails with one line containing NEEDLE.
expect_one_line() {
  local what=$1 needle=$2
  shift 2
  local out code lines
  out=$(timeout 120 "${PODMAN[@]}" run --rm "${LIMITS[@]}" "$@" "$IMAGE" 2>&1)
  code=$?
  lines=$(printf '%s\n' "$out" | grep -c .)
  if [ $code -ne 0 ] && [ $code -ne 124 ] && [ "$lines" -eq 1 ] && [[ $out == *"$needle"* ]] \
      && [[ $out != *Traceback* ]]; then
    pass "$what: exit $code, \"$out\""
  else
    fail "$what: expected exit != 0 and one line containing \"$needle\"; got exit $code, $lines line(s):"
    printf '%s\n' "$out" | head -30 | indent
  fi
}
expect_one_line "without --device /dev/fuse" "--device /dev/fuse" --cap-add SYS_ADMIN
expect_one_line "without --cap-add SYS_ADMIN" "--cap-add SYS_ADMIN" --device "$FUSE_DEV:/dev/fuse"
expect_one_line "without both" "--device /dev/fuse"
if [ "$FUSE_DEV" != /dev/fuse ]; then
  out=$(timeout 120 "${PODMAN[@]}" run --rm "${LIMITS[@]}" --device /dev/fuse --cap-add SYS_ADMIN "$IMAGE" 2>&1)
  note "with this host's own $(stat -c %a /dev/fuse) /dev/fuse the non-root peer says: $out"
fi

# ---------------------------------------------------------------------------------------
src="$WORK/src"          # what the agents write, kept on the host to compare
mkdir -p "$src/dir/sub"
echo hello >"$src/hello.txt"
printf 'nested\n' >"$src/dir/sub/file.txt"
seq 1 200000 >"$src/numbers.txt"
: >"$src/empty"
head -c $((20 << 20)) /dev/urandom >"$src/big.bin"
head -c $((5 << 20)) /dev/urandom >"$src/last.bin"
(cd "$src" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$WORK/expected.sha256"
big_sum=$(sha256sum <"$src/big.bin" | cut -c1-64)

# write_restart_read LABEL USER PEER-ARGS... IMAGE [ARGS...]: the write / SIGTERM / new
# container / read cycle (step 5); the agent's commands run as USER (`podman exec --user`).
write_restart_read() {
  local label=$1 user=$2
  shift 2
  x() { "${PODMAN[@]}" exec --user "$user" "$@"; }
  local state="$WORK/state-$label" c1=$NAME-$label-1 c2=$NAME-$label-2 t0 sum target out
  mkdir -p "$state" && chown "$UID_GID" "$state"
  t0=$SECONDS
  if ! start_peer "$c1" /agents "${FUSE[@]}" -v "$state:/var/lib/agentmount" "$@"; then
    fail "[$label] peer $c1 did not mount /agents"
    return
  fi
  pass "[$label] peer $c1 mounted /agents in $((SECONDS - t0)) s"
  t0=$SECONDS
  # Every write through `podman exec` as the container's user, as an agent would.
  tar -C "$src" --exclude ./big.bin --exclude ./last.bin -c . \
    | x -i "$c1" tar -C /agents/default --no-same-owner -x \
    && x "$c1" ln -s dir/sub/file.txt /agents/default/link \
    && x -i "$c1" sh -c 'cat > /agents/default/big.bin' <"$src/big.bin" \
    || fail "[$label] writing into /agents/default"
  sum=$(x "$c1" sha256sum /agents/default/big.bin | cut -c1-64)
  [ "$sum" = "$big_sum" ] && pass "[$label] big.bin (20 MiB) read back in $c1: sha256 $sum" \
    || fail "[$label] big.bin read back in $c1: sha256 $sum, expected $big_sum"
  # The last close (5 MiB more), and SIGTERM right after it.
  x -i "$c1" sh -c 'cat > /agents/default/last.bin' <"$src/last.bin" \
    || fail "[$label] writing last.bin"
  stop_peer "$c1"
  "${PODMAN[@]}" logs "$c1" 2>&1 | grep -q 'unmounted /agents (signal)' \
    && pass "[$label] $c1 committed and unmounted on SIGTERM ('unmounted /agents (signal)' logged)" \
    || fail "[$label] $c1 did not log 'unmounted /agents (signal)'"
  t0=$SECONDS
  if ! start_peer "$c2" /agents "${FUSE[@]}" -v "$state:/var/lib/agentmount" "$@"; then
    fail "[$label] new container $c2 did not mount /agents"
    return
  fi
  pass "[$label] new container $c2 on the same volume mounted /agents in $((SECONDS - t0)) s"
  if x "$c2" sh -c 'cd /agents/default && find . -type f -print0 | sort -z | xargs -0 sha256sum' \
       >"$WORK/got-$label.sha256" 2>&1 && cmp -s "$WORK/expected.sha256" "$WORK/got-$label.sha256"
  then
    pass "[$label] all $(wc -l <"$WORK/expected.sha256") files and checksums are there in $c2 (last.bin too)"
  else
    fail "[$label] files in $c2 differ from what was written:"
    diff "$WORK/expected.sha256" "$WORK/got-$label.sha256" | head | indent
  fi
  target=$(x "$c2" readlink /agents/default/link)
  [ "$target" = dir/sub/file.txt ] && pass "[$label] symlink kept" || fail "[$label] symlink: '$target'"
  sum=$("${PODMAN[@]}" exec --user 20000:20000 "$c2" sha256sum /agents/default/big.bin 2>&1 | cut -c1-64)
  [ "$sum" = "$big_sum" ] && pass "[$label] another uid (20000) reads the peer's mount (allow_other)" \
    || fail "[$label] uid 20000 cannot read the peer's mount: $sum"
  stop_peer "$c2"
  if out=$("${PODMAN[@]}" run --rm "${LIMITS[@]}" -v "$state:/var/lib/agentmount" --entrypoint agentmount \
           "$IMAGE" fsck 2>&1); then
    pass "[$label] agentmount fsck of the volume: clean"
  else
    fail "[$label] agentmount fsck of the volume:"
    printf '%s\n' "$out" | head -20 | indent
  fi
}

phase "write, SIGTERM right after the last close, read back in a new container"
echo "big.bin: 20 MiB random, sha256 $big_sum"
# As podman runs a non-root user: --cap-add also makes CAP_SYS_ADMIN ambient (effective),
# so libfuse mounts with mount(2) itself.
write_restart_read podman agentmount "$IMAGE"
# As Docker runs a non-root user: CAP_SYS_ADMIN only in the bounding set, nothing effective;
# the mount goes through the setuid-root fusermount3. Emulated: start as root, drop to 10001.
phase "the same with Docker's rules for a non-root user (mount through setuid fusermount3)"
caps=$("${PODMAN[@]}" run --rm "${LIMITS[@]}" "${FUSE[@]}" --user root --entrypoint setpriv "$IMAGE" \
        --reuid=10001 --regid=10001 --clear-groups --inh-caps=-all -- grep -E '^Cap(Eff|Bnd)' /proc/self/status \
        | tr '\n\t' '  ')
echo "as the peer will run: $caps"
write_restart_read docker 10001:10001 --user root --entrypoint setpriv "$IMAGE" \
  --reuid=10001 --regid=10001 --clear-groups --inh-caps=-all -- agentmount mount /agents -f

# ---------------------------------------------------------------------------------------
phase "sharing: peer mounts under an rshared bind, agents bind the parent (rslave)"
# rshared needs the host directory on a shared mount (it is on systemd hosts; here / is
# private): bind it onto itself and make that shared.
shared="$WORK/shared"
mkdir -p "$shared" "$WORK/state-shared"
chown "$UID_GID" "$WORK/state-shared"
{ mount --bind "$shared" "$shared" && HOST_MOUNTS+=("$shared") && mount --make-shared "$shared"; } \
  || die "cannot make $shared a shared mount"
# The peer runs as root: only then does agentmount mount with allow_other, which agents of
# other uids (here root) need. The mountpoint is a directory under the bind, not the bind
# itself: the bind target is a mount point already, and a subdirectory can be mounted again
# by the next peer.
mp=/srv/agentmount/peer
peer_run=("${FUSE[@]}" --user root -v "$WORK/state-shared:/var/lib/agentmount"
          -v "$shared:/srv/agentmount:rshared" --entrypoint sh "$IMAGE"
          -c "mkdir -p $mp 2>/dev/null; exec agentmount mount $mp -f")
agent_run=("${LIMITS[@]}" --user root --entrypoint sleep)
ws=$mp/default

# agent_reads AGENT PATH: the agent reads PATH and gets "one".
agent_reads() { [ "$("${PODMAN[@]}" exec "$1" cat "$2" 2>&1)" = one ]; }
# sees_new_mount WHAT: after a peer was replaced, the running agent reads through the new mount.
sees_new_mount() {
  if wait_until 20 "the agent to see the new mount" agent_reads "$agent" "$ws/from-agent"; then
    pass "peer replaced after $1"
  else
    fail "peer replaced after ${1%%:*}: the agent reads '$("${PODMAN[@]}" exec "$agent" cat "$ws/from-agent" 2>&1)'"
  fi
}

p1=$NAME-peer-1
t0=$SECONDS
if start_peer "$p1" "$mp" "${peer_run[@]}"; then
  pass "peer $p1 (root) mounted $mp in $((SECONDS - t0)) s"
  wait_until 20 "the mount on the host" host_mounted "$shared/peer" \
    && pass "the mount propagated to the host: $shared/peer" \
    || fail "no mount on the host at $shared/peer"
  agent=$NAME-agent
  plain=$NAME-agent-plain
  CONTAINERS+=("$agent" "$plain")
  "${PODMAN[@]}" run -d --name "$agent" -v "$shared:/srv/agentmount:rslave" "${agent_run[@]}" "$IMAGE" infinity >/dev/null
  # for comparison, a plain bind of the mountpoint itself (docker/README.md warns about it)
  "${PODMAN[@]}" run -d --name "$plain" -v "$shared/peer:/agents" "${agent_run[@]}" "$IMAGE" infinity >/dev/null
  if "${PODMAN[@]}" exec "$agent" sh -c "echo one > $ws/from-agent" && agent_reads "$agent" "$ws/from-agent"; then
    pass "agent container (uid 0) writes and reads $ws"
  else
    fail "agent container cannot use $ws"
  fi
  agent_reads "$plain" /agents/default/from-agent \
    || fail "the agent with a plain bind of the mountpoint cannot read it"

  # Replace the peer after SIGTERM: the agent keeps running and sees the new mount.
  stop_peer "$p1"
  p2=$NAME-peer-2
  if start_peer "$p2" "$mp" "${peer_run[@]}"; then
    sees_new_mount "SIGTERM: the running agent sees the new mount"
    got=$("${PODMAN[@]}" exec "$plain" cat /agents/default/from-agent 2>&1)
    if [[ $got == *"not connected"* ]]; then
      pass "as documented, the agent with a plain bind of the mountpoint now gets ENOTCONN: \"$got\""
    else
      fail "the agent with a plain bind of the mountpoint: expected ENOTCONN, got \"$got\""
    fi

    # SIGKILL: the host keeps a dead mount; the next peer must detach it and mount again.
    "${PODMAN[@]}" kill -s KILL "$p2" >/dev/null
    wait_until 30 "$p2 to exit" stopped "$p2"
    got=$("${PODMAN[@]}" exec "$agent" cat "$ws/from-agent" 2>&1)
    echo "   after SIGKILL of $p2 the agent reads: $got"
    p3=$NAME-peer-3
    if start_peer "$p3" "$mp" "${peer_run[@]}"; then
      sees_new_mount "SIGKILL: the stale mount was detached and the agent sees the new one"
      stop_peer "$p3"
    else
      fail "a new peer does not mount over the dead mount a SIGKILLed peer left"
    fi
  else
    fail "second peer $p2 did not mount"
  fi
else
  fail "peer $p1 did not mount $mp"
fi

finish
