"""Journal fencing across leaderships, on a real LocalStore (pure namespace logic, no mount).

A new leader's first record is an `epoch` marker: replay ignores what an older epoch wrote
from that seq on, and inode numbers the deposed leader might have handed out in records that
never became durable are skipped, so later use of one fails with EIO instead of reaching
another file. A request id replayed at the new leader gets the first outcome.
"""
from __future__ import annotations

import errno
import stat as st

import pytest
import trio

from agentmount.errors import Deposed, FsError
from agentmount.meta import journal as jr
from agentmount.meta.service import LocalNamespace
from agentmount.meta.state import EPOCH_INO_GAP, ROOT_INO, NamespaceState
from backend.local import LocalStore

WS = "w"


def fresh() -> NamespaceState:
    return NamespaceState(WS, 1 << 20)


async def leader(store: LocalStore, epoch: int) -> tuple[LocalNamespace, trio.Nursery]:
    loaded = await jr.load(store, WS, fresh())
    j = jr.Journal(store, WS, epoch, loaded.state.seq, window=0.0, timeout=10)
    ns = LocalNamespace(store, loaded.state, j)
    ns.strict_inodes = True
    return ns, loaded


async def test_deposed_epoch_is_fenced_and_its_inodes_give_eio(tmp_path):
    store = LocalStore(str(tmp_path / "store"), "s")
    async with trio.open_nursery() as n:
        old, _ = await leader(store, 1)
        n.start_soon(old.journal.run)
        old._commit({"op": "epoch", "gap": True})
        a = await old.mknod(ROOT_INO, b"a", st.S_IFREG | 0o644, 0, 0)
        await old.sync()
        # The new leader takes over at epoch 2 and writes its marker.
        new, loaded = await leader(store, 2)
        assert loaded.state.inodes[a.ino]
        n.start_soon(new.journal.run)
        new._commit({"op": "epoch", "gap": True})
        await new.sync()
        # The deposed leader, unaware, keeps going: its next segment is at the same seq.
        lost = await old.mknod(ROOT_INO, b"lost", st.S_IFREG | 0o644, 0, 0)
        await old.sync()
        b = await new.mknod(ROOT_INO, b"b", st.S_IFREG | 0o644, 0, 0)
        await new.sync()
        assert b.ino >= lost.ino + EPOCH_INO_GAP - 1 and b.ino != lost.ino
        with pytest.raises(FsError) as e:
            await new.commit_write(lost.ino, [], 10, 0)
        assert e.value.errno == errno.EIO
        with pytest.raises(FsError) as e:
            await new.getattr(lost.ino)
        assert e.value.errno == errno.EIO
        with pytest.raises(FsError) as e:
            await new.getattr(b.ino + 1000)
        assert e.value.errno == errno.ENOENT
        n.cancel_scope.cancel()
    # Replay: the deposed leader's record is ignored, the new leader's are kept.
    again = await jr.load(store, WS, fresh())
    names = set(again.state.dirs[ROOT_INO])
    assert names == {b"a", b"b"}, names
    assert again.state.lost_ino(lost.ino)


async def test_fence_stops_changes_and_acks(tmp_path):
    store = LocalStore(str(tmp_path / "store"), "s")
    valid = True
    async with trio.open_nursery() as n:
        ns, _ = await leader(store, 1)
        ns.journal.fence = lambda: valid

        def fence() -> None:
            if not valid:
                raise Deposed(WS)
        ns.fence = fence
        n.start_soon(ns.journal.run)
        await ns.mknod(ROOT_INO, b"ok", st.S_IFDIR | 0o755, 0, 0)
        await ns.sync()
        ns.journal.window = 5.0        # the next record waits in the group-commit window...
        await ns.mknod(ROOT_INO, b"pending", st.S_IFDIR | 0o755, 0, 0)
        valid = False                  # ...while the lease lapses
        with pytest.raises(Deposed):
            await ns.sync()
        with pytest.raises(Deposed):
            await ns.mknod(ROOT_INO, b"after", st.S_IFDIR | 0o755, 0, 0)
        n.cancel_scope.cancel()
    names = set((await jr.load(store, WS, fresh())).state.dirs[ROOT_INO])
    assert names == {b"ok"}, names


async def test_replayed_request_id_gets_first_outcome_across_snapshot(tmp_path):
    store = LocalStore(str(tmp_path / "store"), "s")
    async with trio.open_nursery() as n:
        ns, _ = await leader(store, 1)
        n.start_soon(ns.journal.run)
        ns.current_rid = b"r" * 16
        node = await ns.mknod(ROOT_INO, b"x", st.S_IFREG | 0o644, 0, 0)
        await ns.snapshot()
        n.cancel_scope.cancel()
    loaded = await jr.load(store, WS, fresh())
    seq, ino, _ = loaded.state.rids[b"r" * 16]    # carried by the snapshot, not only the journal
    assert ino == node.ino and seq >= 1
    assert loaded.replayed == 0
