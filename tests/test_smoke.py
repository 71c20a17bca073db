"""Smoke: mount, write, read back, survive a remount."""
import os


def test_write_read_remount(mount):
    p = mount.ws / "x"
    p.write_text("hi\n")
    assert p.read_text() == "hi\n"
    data = os.urandom(9 << 20)
    (mount.ws / "big").write_bytes(data)
    mount.remount()
    assert (mount.ws / "x").read_text() == "hi\n"
    assert (mount.ws / "big").read_bytes() == data
    r = mount.cli("fsck")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "clean" in r.stdout
