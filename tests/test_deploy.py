"""Running where agents run: namespaces as container runtimes make them, shared-propagation
binds, restarts over a stale mountpoint, the systemd unit and notify protocol, the fstab
mount helper, and the one-line errors for a container without /dev/fuse or CAP_SYS_ADMIN.
"""
from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agentmount.procs import wait_exit
from tests.helpers import REPO, Mount, cli, wait_for

PY = sys.executable
VENV_BIN = Path(PY).parent


def _mounted_in_this_ns(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _new_mount(root: Path) -> Mount:
    root.mkdir()
    return Mount(root)


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


class NsAgent:
    """tests/ns_agent.py in a new mount namespace: an agent container's view of the mounts."""

    def __init__(self, propagation: str = "unchanged") -> None:
        self.p = subprocess.Popen(["unshare", "--mount", f"--propagation={propagation}", PY,
                                   str(REPO / "tests" / "ns_agent.py")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self._reply(30) == "ready"

    def _reply(self, timeout: float):
        ready, _, _ = select.select([self.p.stdout], [], [], timeout)
        assert ready, "the namespace agent did not answer"
        line = self.p.stdout.readline()
        assert line, f"the namespace agent exited ({self.p.wait()})"
        return json.loads(line)

    def __call__(self, *cmd, timeout: float = 60):
        self.p.stdin.write(json.dumps(list(cmd)) + "\n")
        return self._reply(timeout)

    def sh(self, cmd: str) -> str:
        rc, out = self("sh", cmd)
        assert rc == 0, f"{cmd}: {out}"
        return out

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write('["exit"]\n')
                self.p.stdin.close()
            except OSError:
                pass
            if self.p.wait(timeout=30) is None:
                self.p.kill()


def test_mount_in_a_fresh_mount_and_pid_namespace_is_invisible_outside(tmp_path):
    """As a container runtime does: new mount + PID namespaces; the peer daemonizes in there."""
    m = _new_mount(tmp_path / "m")
    flags = tmp_path / "flags"
    flags.mkdir()
    script = f"""
set -e
{PY} -m agentmount mount {m.mp} -c {m.conf}
echo inside > {m.mp}/default/made-inside.txt
cat {m.mp}/default/made-inside.txt > {flags}/read-back
awk '$5 == "{m.mp}"' /proc/self/mountinfo > {flags}/mountinfo
echo $$ > {flags}/pid-in-ns
touch {flags}/ready
# wait (bounded) until the test has looked from outside
for i in $(seq 600); do [ -e {flags}/go ] && break; sleep 0.1; done
{PY} -m agentmount umount {m.mp}
"""
    p = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation=private",
                          "bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (flags / "ready").exists() or p.poll() is not None, 60, 0.05,
                 what="the mount inside the namespace")
        assert p.poll() is None, p.communicate()
        assert (flags / "read-back").read_text() == "inside\n"
        assert "fuse.agentmount" in (flags / "mountinfo").read_text()
        assert (flags / "pid-in-ns").read_text().strip() == "1"      # a PID namespace of its own
        # Outside: no mount, an empty directory.
        assert not os.path.ismount(m.mp) and not _mounted_in_this_ns(m.mp)
        assert os.listdir(m.mp) == []
        (flags / "go").touch()
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    # What was written inside is in the store: mount it here and read it.
    m.mount()
    try:
        assert (m.ws / "made-inside.txt").read_text() == "inside\n"
    finally:
        m.cleanup()


def test_host_mount_bound_into_a_namespace_with_shared_propagation(tmp_path):
    """The host mounts under a shared directory; an agent container gets that directory
    through an rshared bind, sees writes from both sides, and sees the new mount after the
    host's peer restarts. A bind of the mountpoint itself instead pins the old mount: after
    the restart the agent gets ENOTCONN there (and the host's unmount still completes)."""
    host = tmp_path / "host"          # stands for the host's /agents: a shared mount
    host.mkdir()
    ctr = tmp_path / "ctr"
    ctr.mkdir()
    subprocess.run(["mount", "--bind", str(host), str(host)], check=True)
    agent = None
    m = Mount(host)
    try:
        subprocess.run(["mount", "--make-rshared", str(host)], check=True)
        m.mount()
        (m.ws / "from-host.txt").write_text("host\n")
        agent = NsAgent()
        # Inside the "container": a private root for its binds, then the host directory bound
        # in rshared (`-v /agents:/agents:rshared`), and the mountpoint itself bound plainly.
        agent.sh(f"mount --bind {ctr} {ctr} && mount --make-private {ctr} && mkdir -p {ctr}/agents {ctr}/pinned && "
                 f"mount --rbind {host} {ctr}/agents && mount --make-rshared {ctr}/agents && "
                 f"mount --rbind {m.mp} {ctr}/pinned")
        assert not os.path.ismount(ctr / "agents")          # the binds stay in the container
        ws = f"{ctr}/agents/mnt/default"
        assert agent("read", f"{ws}/from-host.txt") == "host\n"
        assert agent("write", f"{ws}/from-agent.txt", "agent\n") is True
        assert (m.ws / "from-agent.txt").read_text() == "agent\n"
        assert agent("read", f"{ctr}/pinned/default/from-agent.txt") == "agent\n"
        # The peer restarts: while it is down the agent sees the empty directory under it
        # (ENOENT, not a hang); the new mount then propagates into the container.
        m.umount()
        assert agent("read", f"{ws}/from-host.txt") == {"errno": errno.ENOENT}
        assert agent("read", f"{ctr}/pinned/default/from-host.txt") == {"errno": errno.ENOTCONN}
        m.mount()
        assert agent("read", f"{ws}/from-agent.txt") == "agent\n"
        assert agent("write", f"{ws}/after-restart.txt", "again\n") is True
        assert (m.ws / "after-restart.txt").read_text() == "again\n"
        assert agent("read", f"{ctr}/pinned/default/from-host.txt") == {"errno": errno.ENOTCONN}
    finally:
        if agent is not None:
            agent.close()
        m.cleanup()
        subprocess.run(["umount", "-l", str(host)], capture_output=True)


def _stat_errno(path: Path) -> int | None:
    try:
        os.stat(path)
        return None
    except OSError as e:
        return e.errno


def test_mount_over_a_stale_mountpoint_detaches_it_and_mounts_again(make_mount):
    """Right after the kill (the kernel still has the root's attributes cached, stat works)
    and once the cache expired (stat itself fails with ENOTCONN): both are detached and
    mounted again, and nothing closed before the kill is lost."""
    m = make_mount()
    for round, wait_for_expiry in enumerate((False, True)):
        (m.ws / f"kept{round}.txt").write_text(f"closed before crash {round}\n")
        pid = m.pid
        os.kill(pid, signal.SIGKILL)
        assert wait_exit(pid, 30)
        with pytest.raises(OSError) as ei:
            os.listdir(m.mp)
        assert ei.value.errno == errno.ENOTCONN          # "Transport endpoint is not connected"
        if wait_for_expiry:
            wait_for(lambda: _stat_errno(m.mp) == errno.ENOTCONN, 30, 0.1, what="stat of the dead mount failing")
        r = cli("mount", str(m.mp), "-c", str(m.conf))
        assert r.returncode == 0, r.stderr
        assert "stale mount" in r.stderr and str(m.mp) in r.stderr
        m.pid = int(os.getxattr(m.mp, "user.agentmount.pid"))
        assert m.pid != pid
        for k in range(round + 1):
            assert (m.ws / f"kept{k}.txt").read_text() == f"closed before crash {k}\n"


@pytest.fixture
def installed_binaries():
    """`make install` puts the CLI at /usr/local/bin and the helper in /sbin; do the same for
    the test's lifetime when they are not there already."""
    made = []
    for link, target in [("/usr/local/bin/agentmount", VENV_BIN / "agentmount"),
                         ("/sbin/mount.fuse.agentmount", VENV_BIN / "mount.fuse.agentmount")]:
        if not os.path.lexists(link):
            os.symlink(target, link)
            made.append(link)
    yield
    for link in made:
        os.unlink(link)


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path, installed_binaries):
    unit = (REPO / "systemd" / "agentmount@.service").read_text()
    inst = tmp_path / "agentmount@prod.service"
    inst.write_text(unit)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(inst)], capture_output=True, text=True)
    # verify exits 0 even when it ignores a bad line: every complaint is a failure here.
    assert r.returncode == 0 and r.stderr.strip() == "" and r.stdout.strip() == "", r.stdout + r.stderr
    directives = {line.split("=", 1)[0] for line in unit.splitlines() if "=" in line and not line.startswith("#")}
    assert {"Type", "ExecStart", "ExecStop", "Restart", "After", "NoNewPrivileges", "DeviceAllow"} <= directives
    assert "Type=notify" in unit and "After=network-online.target" in unit and " -f" in unit


def test_notify_ready_once_serving_and_stopping_on_sigterm(tmp_path):
    """Type=notify: READY=1 arrives only when the mount serves; SIGTERM commits and exits 0."""
    m = _new_mount(tmp_path / "m")
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path))
    env.pop("AGENTMOUNT_CONFIG", None)
    p = subprocess.Popen([PY, "-m", "agentmount", "mount", str(m.mp), "-c", str(m.conf), "-f"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        msg = sock.recv(4096).decode()
        fields = dict(f.split("=", 1) for f in msg.splitlines())
        assert fields["READY"] == "1" and fields["MAINPID"] == str(p.pid), msg
        assert os.path.ismount(m.mp)                      # serving when READY arrives
        with open(m.ws / "under-systemd.txt", "w") as f:
            f.write("x" * 100000)
        p.send_signal(signal.SIGTERM)
        stopping = sock.recv(4096).decode()
        assert "STOPPING=1" in stopping.splitlines(), stopping
        assert p.wait(timeout=120) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        sock.close()
    assert not os.path.ismount(m.mp)
    m.mount()
    try:
        assert (m.ws / "under-systemd.txt").read_text() == "x" * 100000
    finally:
        m.cleanup()


def test_mount_helper_mounts_from_an_fstab_line(tmp_path, installed_binaries):
    m = _new_mount(tmp_path / "m")
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# agentmount\n{m.conf}  {m.mp}  fuse.agentmount  "
                     "_netdev,noauto,nofail,x-systemd.automount,x-systemd.mount-timeout=60  0  0\n")
    r = subprocess.run(["mount", "--fstab", str(fstab), str(m.mp)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        m.pid = int(os.getxattr(m.mp, "user.agentmount.pid"))
        (m.ws / "via-fstab.txt").write_text("fstab\n")
        assert (m.ws / "via-fstab.txt").read_text() == "fstab\n"
        with open("/proc/self/mountinfo") as f:
            line = next(ln for ln in f if ln.split()[4] == str(m.mp))
        assert "fuse.agentmount" in line
    finally:
        m.cleanup()
    # `mount -t fuse.agentmount CONFIG MOUNTPOINT` works the same way; a typo in the options
    # is refused naming the option, and nothing is mounted.
    r = subprocess.run(["mount", "-t", "fuse.agentmount", "-o", "noatme", str(m.conf), str(m.mp)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "noatme" in r.stderr and not os.path.ismount(m.mp), r.stderr
    r = subprocess.run(["mount", "-t", "fuse.agentmount", str(m.conf), str(m.mp)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m.pid = int(os.getxattr(m.mp, "user.agentmount.pid"))
    try:
        assert (m.ws / "via-fstab.txt").read_text() == "fstab\n"
    finally:
        m.cleanup()


def test_container_without_dev_fuse_or_cap_sys_admin_gets_one_clear_line(tmp_path):
    m = _new_mount(tmp_path / "m")
    # No /dev/fuse: a /dev without it, as in a container started without --device.
    r = subprocess.run(["unshare", "--mount", "--propagation=private", "sh", "-c",
                        f"mount -t tmpfs tmpfs /dev && exec {PY} -m agentmount mount {m.mp} -c {m.conf}"],
                       capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert r.returncode == 1
    assert "--device /dev/fuse" in _one_line(r.stderr)
    # No CAP_SYS_ADMIN, not even through the setuid fusermount3 (gone from the bounding set).
    r = subprocess.run(["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin",
                        PY, "-m", "agentmount", "mount", str(m.mp), "-c", str(m.conf)],
                       capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert r.returncode == 1
    assert "--cap-add SYS_ADMIN" in _one_line(r.stderr)
    assert not os.path.ismount(m.mp)
    # Both refused before anything was started: the mount works once the flags are there.
    m.mount()
    m.cleanup()


def test_install_script_puts_what_the_unit_and_mount_need_in_place(tmp_path):
    dest = tmp_path / "root"
    r = subprocess.run(["bash", str(REPO / "scripts" / "install.sh")], capture_output=True, text=True,
                       env=dict(os.environ, DESTDIR=str(dest), BIN=str(VENV_BIN)), timeout=60)
    assert r.returncode == 0, r.stderr
    assert os.readlink(dest / "usr/local/bin/agentmount") == str(VENV_BIN / "agentmount")
    assert os.readlink(dest / "sbin/mount.fuse.agentmount") == str(VENV_BIN / "mount.fuse.agentmount")
    assert (dest / "etc/systemd/system/agentmount@.service").read_text() == \
        (REPO / "systemd" / "agentmount@.service").read_text()
    assert (dest / "etc/agentmount").is_dir()


def test_allow_other_for_a_non_root_peer_follows_fuse_conf(tmp_path):
    """fusermount3 refuses allow_other to non-root users unless fuse.conf allows it, so the
    peer asks for it only then (root always asks)."""
    from agentmount.fuse.ops import _user_allow_other
    conf = tmp_path / "fuse.conf"
    conf.write_text("# user_allow_other\nmount_max = 1000\n")
    assert not _user_allow_other(str(conf))
    conf.write_text("mount_max = 1000\nuser_allow_other   # agents share the mount\n")
    assert _user_allow_other(str(conf))
    assert not _user_allow_other(str(tmp_path / "missing.conf"))
