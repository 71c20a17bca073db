"""fsck finds and names missing blocks, corrupt blocks and dangling entries; exit status says so."""
import os

import trio

from agentmount.meta import journal as jr
from agentmount.meta import workspaces as wsreg
from backend.local import LocalStore


def _blocks(store_dir):
    out = []
    for d, _, files in os.walk(os.path.join(store_dir, "ws", "default", "blocks")):
        out += [os.path.join(d, f) for f in files]
    return sorted(out)


def test_fsck_clean_then_detects_damage(mount):
    (mount.ws / "a").write_bytes(os.urandom(300_000))
    (mount.ws / "b").write_bytes(b"x" * 5000)
    (mount.ws / "dir").mkdir()
    (mount.ws / "dir" / "c").write_text("c")
    mount.umount()
    r = mount.cli("fsck")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "default: clean" in r.stdout

    blocks = _blocks(mount.store)
    assert len(blocks) >= 3
    os.unlink(blocks[0])
    with open(blocks[1], "r+b") as f:
        f.seek(-3, os.SEEK_END)
        b = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x55]))
    r = mount.cli("fsck")
    assert r.returncode == 1, r.stdout
    assert "missing block" in r.stdout and os.path.basename(blocks[0]) in r.stdout
    assert "corrupt block" in r.stdout and os.path.basename(blocks[1]) in r.stdout
    # The quick mode checks presence only.
    r = mount.cli("fsck", "--quick")
    assert r.returncode == 1 and "missing block" in r.stdout and "corrupt block" not in r.stdout

    # A dangling entry: write a snapshot whose directory names an inode that does not exist.
    async def damage():
        store = LocalStore(str(mount.store))
        info = (await wsreg.list_workspaces(store))["default"]
        loaded = await wsreg.recover(store, "default", info, 64 << 20)
        st = loaded.state
        ino = st.dirs[1][b"dir"]
        victim = st.dirs[ino][b"c"]
        del st.inodes[victim]
        st.seq += 1
        await jr.write_snapshot(store, st)
    trio.run(damage)
    r = mount.cli("fsck", "--quick")
    assert r.returncode == 1
    assert "dangling entry /dir/c" in r.stdout, r.stdout


def test_read_of_corrupt_block_is_eio_not_garbage(mount):
    data = os.urandom(200_000)
    (mount.ws / "f").write_bytes(data)
    mount.umount()
    (blk,) = _blocks(mount.store)
    with open(blk, "r+b") as f:
        f.seek(100)
        f.write(b"\0garbage\0")
    mount.mount()
    try:
        (mount.ws / "f").read_bytes()
    except OSError as e:
        assert e.errno == 5
    else:
        raise AssertionError("a corrupt block was read without error")
