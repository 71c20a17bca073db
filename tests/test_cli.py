"""CLI contract: config errors exit 2 naming the key; bad mount input gives one clear line."""
import os
import subprocess

import pytest

from tests.helpers import Mount, cli


@pytest.mark.parametrize("fs,snippet,key", [
    ({"block_size_kb": 100}, "", "fs.block_size_kb"),
    ({"bogus": 1}, "", "fs.bogus"),
    ({"zstd_level": "fast"}, "", "fs.zstd_level"),
    (None, "[nonsense]\nx = 1\n", "nonsense"),
    (None, "[[workspace]]\nname = \"bad/name\"\n", "workspace[1].name"),
    (None, "[log]\nlevel = \"loud\"\n", "log.level"),
    (None, "[[store]]\nname = \"two\"\nkind = \"ftp\"\n", "store[1].kind"),
])
def test_invalid_config_exits_2_naming_the_key(tmp_path, fs, snippet, key):
    m = Mount(tmp_path, fs=fs, extra=snippet)
    r = cli("mount", str(m.mp), "-c", str(m.conf))
    assert r.returncode == 2, r.stderr
    assert key in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_not_toml_and_missing_config(tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("[node\n")
    r = cli("status", "-c", str(bad))
    assert r.returncode == 2 and "not valid TOML" in r.stderr
    r = cli("status", "-c", str(tmp_path / "nope.conf"))
    assert r.returncode == 2 and "cannot read config" in r.stderr


def test_mountpoint_missing_nonempty_and_already_mounted(make_mount, tmp_path):
    m = make_mount(mount=False)
    r = cli("mount", str(tmp_path / "missing"), "-c", str(m.conf))
    assert r.returncode == 1 and "does not exist" in r.stderr
    (m.mp / "junk").write_text("x")
    r = cli("mount", str(m.mp), "-c", str(m.conf))
    assert r.returncode == 1 and "not empty" in r.stderr
    (m.mp / "junk").unlink()
    m.mount()
    r = cli("mount", str(m.mp), "-c", str(m.conf))
    assert r.returncode == 1 and "already mounted" in r.stderr
    # A second peer on the same data dir is refused too.
    other = tmp_path / "other"
    other.mkdir()
    r = cli("mount", str(other), "-c", str(m.conf))
    assert r.returncode == 1 and "in use" in r.stderr
    assert "Traceback" not in r.stderr


def test_unwritable_store_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        m = Mount(tmp_path / "m", store=ro / "store") if (tmp_path / "m").mkdir() is None else None
        r = cli("mount", str(m.mp), "-c", str(m.conf))
        assert r.returncode == 1
        assert "store directory" in r.stderr and "Traceback" not in r.stderr
        assert not os.path.ismount(m.mp)
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_embedded_default_and_workspace_commands(tmp_path):
    home = tmp_path / "home"
    mp = tmp_path / "mnt"
    mp.mkdir()
    env = {"AGENTMOUNT_HOME": str(home)}
    r = cli("mount", str(mp), env=env)
    assert r.returncode == 0, r.stderr
    try:
        (mp / "default" / "x").write_text("hi\n")
        assert (mp / "default" / "x").read_text() == "hi\n"
        r = cli("workspace", "create", "proj", env=env)
        assert r.returncode == 0, r.stderr
        assert (mp / "proj").is_dir()
        os.mkdir(mp / "viamkdir")
        r = cli("workspace", "list", env=env)
        assert r.stdout.split() == ["default", "proj", "viamkdir"]
        (mp / "proj" / "f").write_text("x")
        r = cli("workspace", "delete", "proj", env=env)
        assert r.returncode == 1 and "not empty" in r.stderr.lower()
        with pytest.raises(OSError) as ei:
            os.rmdir(mp / "proj")
        assert ei.value.errno == 39  # ENOTEMPTY
        os.rmdir(mp / "viamkdir")
        r = cli("workspace", "delete", "proj", "--force", env=env)
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(mp)) == ["default"]
        r = cli("status", env=env)
        assert r.returncode == 0 and "running" in r.stdout and "workspace default" in r.stdout
    finally:
        r = cli("umount", str(mp))
        assert r.returncode == 0, r.stderr
    r = cli("status", env=env)
    assert "not running" in r.stdout
    r = cli("mount", str(mp), env=env)
    assert r.returncode == 0
    try:
        assert (mp / "default" / "x").read_text() == "hi\n"
        assert sorted(os.listdir(mp)) == ["default"]
    finally:
        cli("umount", str(mp))


def test_sigterm_commits_and_unmounts(mount):
    import signal

    from agentmount.procs import wait_exit
    f = open(mount.ws / "open-at-term", "wb")
    f.write(b"z" * 100_000)
    f.flush()
    pid = mount.pid
    os.kill(pid, signal.SIGTERM)
    assert wait_exit(pid, 60), "the daemon did not exit after SIGTERM"
    try:
        f.close()
    except OSError:
        pass
    mount.pid = None
    assert not os.path.ismount(mount.mp)
    mount.mount()
    assert (mount.ws / "open-at-term").read_bytes() == b"z" * 100_000


def test_full_disk_gives_enospc_and_loses_nothing_closed(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(small)], check=True)
    (tmp_path / "m").mkdir()
    m = Mount(tmp_path / "m", store=small / "store", fs={"block_size_kb": 1024, "store_timeout_s": 20})
    try:
        m.mount()
        keep = os.urandom(6 << 20)
        (m.ws / "keep").write_bytes(keep)
        with pytest.raises(OSError) as ei:
            with open(m.ws / "too-big", "wb") as f:
                for _ in range(40):
                    f.write(os.urandom(1 << 20))
        assert ei.value.errno == 28  # ENOSPC
        assert (m.ws / "keep").read_bytes() == keep
        os.unlink(m.ws / "too-big")
        # Space comes back: the failed file's blocks were freed, new writes work.
        (m.ws / "after").write_bytes(b"a" * 100_000)
        m.remount()
        assert (m.ws / "keep").read_bytes() == keep
        assert (m.ws / "after").read_bytes() == b"a" * 100_000
        r = m.cli("fsck")
        assert r.returncode == 0, r.stdout
    finally:
        m.cleanup()
        subprocess.run(["umount", "-l", str(small)])


def test_keys_generate_prints_a_loadable_curve_pair():
    from agentmount.peer.keys import load_pair
    r = cli("keys", "generate", check=True)
    vals = dict(line.split(" = ") for line in r.stdout.strip().splitlines())
    pub, sec = vals["public_key"].strip('"'), vals["secret_key"].strip('"')
    load_pair(pub, sec, "generated")
    assert pub != cli("keys", "generate", check=True).stdout.split('"')[1]
