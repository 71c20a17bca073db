"""The namespace state machine of one workspace.

`NamespaceState.apply(record)` is the only way the state changes, and it is
deterministic: replaying the same records onto the same snapshot gives the
same state. Records are validated before they are made (by the service), so
apply trusts them. apply returns the slices it dropped, whose blocks become
garbage once the record is durable.

Invariants: every directory entry points at an existing inode; a directory
has exactly one entry naming it (its parent's) and `parent` set to it; nlink
counts entries (+2/+subdirs for directories); inodes with nlink 0 exist only
while open (until a `free` record).
"""
from __future__ import annotations

import stat as st
from typing import Any, Iterable

import xxhash

from agentmount.chunks.layout import Slice, truncate_slices
from agentmount.meta.reqids import RequestIds

ROOT_INO = 1
DIR_SIZE = 4096
# Inode numbers skipped at each new leadership with peers: 2^40 local numbers last 10^6 failovers.
EPOCH_INO_GAP = 1 << 20


class Inode:
    """One inode. Times are integers in nanoseconds. `chunks` maps chunk index to slices, oldest first."""

    __slots__ = ("ino", "mode", "uid", "gid", "nlink", "size", "atime", "mtime", "ctime", "rdev",
                 "version", "xattrs", "target", "chunks", "parent")

    def __init__(self, ino: int, mode: int, uid: int, gid: int, t: int, rdev: int = 0,
                 target: bytes | None = None) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.nlink = 1
        self.size = len(target) if target is not None else 0
        self.atime = self.mtime = self.ctime = t
        self.rdev = rdev
        self.version = 1
        self.xattrs: dict[bytes, bytes] = {}
        self.target = target
        self.chunks: dict[int, list[Slice]] = {}
        self.parent = 0

    @property
    def is_dir(self) -> bool:
        return st.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return st.S_ISREG(self.mode)

    def to_list(self) -> list:
        return [self.ino, self.mode, self.uid, self.gid, self.nlink, self.size, self.atime, self.mtime,
                self.ctime, self.rdev, self.version, self.xattrs, self.target,
                {k: [s.to_tuple() for s in v] for k, v in self.chunks.items()}, self.parent]

    @staticmethod
    def from_list(v: list) -> "Inode":
        i = Inode.__new__(Inode)
        (i.ino, i.mode, i.uid, i.gid, i.nlink, i.size, i.atime, i.mtime, i.ctime, i.rdev, i.version,
         i.xattrs, i.target, chunks, i.parent) = v
        i.chunks = {int(k): [Slice.from_tuple(t) for t in s] for k, s in chunks.items()}
        return i


class NamespaceState:
    """Inodes and directory entries of one workspace, changed only by `apply`."""

    def __init__(self, ws: str, chunk_size: int, root_mode: int = 0o755, root_uid: int = 0,
                 root_gid: int = 0, t: int = 0) -> None:
        self.ws = ws
        self.chunk_size = chunk_size
        self.seq = 0                      # last applied record
        self.next_ino = ROOT_INO + 1
        root = Inode(ROOT_INO, st.S_IFDIR | (root_mode & 0o7777), root_uid, root_gid, t)
        root.nlink = 2
        root.size = DIR_SIZE
        root.parent = ROOT_INO
        self.inodes: dict[int, Inode] = {ROOT_INO: root}
        self.dirs: dict[int, dict[bytes, int]] = {ROOT_INO: {}}
        # Request id -> (seq, inode) of the record it made: a retried request (same id, maybe at
        # a new leader after failover) gets the first outcome instead of being applied twice.
        self.rids = RequestIds()
        self.lost: list[tuple[int, int]] = []    # inode ranges skipped at new leaderships

    # -- snapshots -------------------------------------------------------------------
    def to_obj(self) -> dict:
        return {"v": 1, "ws": self.ws, "seq": self.seq, "next_ino": self.next_ino, "chunk_size": self.chunk_size,
                "inodes": [i.to_list() for i in self.inodes.values()],
                "dirs": [[d, list(e.items())] for d, e in self.dirs.items()],
                "rids": self.rids.to_bytes(),
                "lost": [list(x) for x in self.lost]}

    @staticmethod
    def from_obj(o: dict) -> "NamespaceState":
        s = NamespaceState.__new__(NamespaceState)
        s.ws = o["ws"]
        s.seq = o["seq"]
        s.next_ino = o["next_ino"]
        s.chunk_size = o["chunk_size"]
        s.inodes = {}
        for v in o["inodes"]:
            i = Inode.from_list(v)
            s.inodes[i.ino] = i
        s.dirs = {d: dict((bytes(n), ino) for n, ino in ents) for d, ents in o["dirs"]}
        s.rids = RequestIds.from_snapshot(o.get("rids"))
        s.lost = [(lo, hi) for lo, hi in o.get("lost", ())]
        return s

    # -- queries -----------------------------------------------------------------------
    def get(self, ino: int) -> Inode | None:
        return self.inodes.get(ino)

    def lookup(self, parent: int, name: bytes) -> int | None:
        d = self.dirs.get(parent)
        return None if d is None else d.get(name)

    def all_slices(self) -> Iterable[Slice]:
        for i in self.inodes.values():
            for sl in i.chunks.values():
                yield from sl

    # -- apply -------------------------------------------------------------------------
    def apply(self, rec: dict[str, Any]) -> list[Slice]:
        """Apply one record (already validated); return slices that became garbage."""
        fn = getattr(self, "_op_" + rec["op"])
        dropped = fn(rec) or []
        self.seq = rec["seq"]
        rid = rec.get("rid")
        if rid is not None:
            self.rids.add(rid, rec["seq"], rec.get("ino", 0), rec.get("t", 0))
        return dropped

    def _op_epoch(self, r: dict) -> None:
        """A new leader's first record: fences records of older epochs from this seq on, and
        skips inode numbers a deposed leader may have handed out in records that never became
        durable, so a peer still holding one gets an error instead of another file."""
        if r.get("gap"):
            self.lost.append((self.next_ino, self.next_ino + EPOCH_INO_GAP))
            self.next_ino += EPOCH_INO_GAP

    def lost_ino(self, ino: int) -> bool:
        """Whether `ino` is one a deposed leader may have handed out and lost."""
        return any(lo <= ino < hi for lo, hi in self.lost)

    def _touch_dir(self, d: Inode, t: int) -> None:
        d.mtime = d.ctime = t
        d.version += 1

    def _op_mknod(self, r: dict) -> None:
        ino = r["ino"]
        node = Inode(ino, r["mode"], r["uid"], r["gid"], r["t"], r.get("rdev", 0), r.get("target"))
        parent = self.inodes[r["parent"]]
        if node.is_dir:
            node.nlink = 2
            node.size = DIR_SIZE
            node.parent = parent.ino
            self.dirs[ino] = {}
            parent.nlink += 1
        self.inodes[ino] = node
        self.dirs[parent.ino][r["name"]] = ino
        self._touch_dir(parent, r["t"])
        self.next_ino = max(self.next_ino, ino + 1)

    def _op_link(self, r: dict) -> None:
        node = self.inodes[r["ino"]]
        parent = self.inodes[r["parent"]]
        self.dirs[parent.ino][r["name"]] = node.ino
        node.nlink += 1
        node.ctime = r["t"]
        node.version += 1
        self._touch_dir(parent, r["t"])

    def _drop_entry(self, parent: Inode, name: bytes, t: int) -> Inode:
        ino = self.dirs[parent.ino].pop(name)
        node = self.inodes[ino]
        if node.is_dir:
            node.nlink = 0
            parent.nlink -= 1
            del self.dirs[ino]
        else:
            node.nlink -= 1
        node.ctime = t
        node.version += 1
        return node

    def _free(self, node: Inode) -> list[Slice]:
        dropped = [s for sl in node.chunks.values() for s in sl]
        del self.inodes[node.ino]
        return dropped

    def _op_unlink(self, r: dict) -> list[Slice]:
        parent = self.inodes[r["parent"]]
        node = self._drop_entry(parent, r["name"], r["t"])
        self._touch_dir(parent, r["t"])
        if node.nlink == 0 and r.get("free"):
            return self._free(node)
        return []

    def _op_free(self, r: dict) -> list[Slice]:
        node = self.inodes.get(r["ino"])
        if node is None or node.nlink > 0:
            return []
        return self._free(node)

    def _op_rename(self, r: dict) -> list[Slice]:
        t = r["t"]
        sp, dp = self.inodes[r["sp"]], self.inodes[r["dp"]]
        sn, dn = r["sn"], r["dn"]
        src = self.inodes[self.dirs[sp.ino][sn]]
        dropped: list[Slice] = []
        if r.get("exchange"):
            dst = self.inodes[self.dirs[dp.ino][dn]]
            self.dirs[sp.ino][sn] = dst.ino
            self.dirs[dp.ino][dn] = src.ino
            if src.is_dir and sp is not dp:
                src.parent = dp.ino
                sp.nlink -= 1
                dp.nlink += 1
            if dst.is_dir and sp is not dp:
                dst.parent = sp.ino
                dp.nlink -= 1
                sp.nlink += 1
            for n in (src, dst):
                n.ctime = t
                n.version += 1
        else:
            old = self.dirs[dp.ino].get(dn)
            if old is not None:
                victim = self._drop_entry(dp, dn, t)
                if victim.nlink == 0 and r.get("free"):
                    dropped = self._free(victim)
            del self.dirs[sp.ino][sn]
            self.dirs[dp.ino][dn] = src.ino
            if src.is_dir and sp is not dp:
                src.parent = dp.ino
                sp.nlink -= 1
                dp.nlink += 1
            src.ctime = t
            src.version += 1
        self._touch_dir(sp, t)
        if dp is not sp:
            self._touch_dir(dp, t)
        return dropped

    def _op_setattr(self, r: dict) -> list[Slice]:
        node = self.inodes[r["ino"]]
        dropped: list[Slice] = []
        if "mode" in r:
            node.mode = (node.mode & ~0o7777) | (r["mode"] & 0o7777)
        if "uid" in r:
            node.uid = r["uid"]
        if "gid" in r:
            node.gid = r["gid"]
        if "atime" in r:
            node.atime = r["atime"]
        if "mtime" in r:
            node.mtime = r["mtime"]
        if "size" in r:
            if "mtime" not in r and r["size"] != node.size:
                node.mtime = r["t"]  # truncate(2) sends no mtime; a size change is a modification
            dropped = self._truncate(node, r["size"])
        node.ctime = r["t"]
        node.version += 1
        return dropped

    def _truncate(self, node: Inode, size: int) -> list[Slice]:
        dropped: list[Slice] = []
        if size < node.size:
            cs = self.chunk_size
            for idx in sorted(node.chunks):
                start = idx * cs
                if start >= size:
                    dropped.extend(node.chunks.pop(idx))
                elif start + cs > size:
                    kept, d = truncate_slices(node.chunks[idx], size - start)
                    dropped.extend(d)
                    if kept:
                        node.chunks[idx] = kept
                    else:
                        del node.chunks[idx]
        node.size = size
        return dropped

    def _op_write(self, r: dict) -> None:
        node = self.inodes[r["ino"]]
        for idx, t in r["slices"]:
            node.chunks.setdefault(idx, []).append(Slice.from_tuple(t))
        if r["end"] > node.size:
            node.size = r["end"]
        node.mtime = r["mtime"]
        node.ctime = r["t"]
        node.version += 1

    def _op_setxattr(self, r: dict) -> None:
        node = self.inodes[r["ino"]]
        node.xattrs[r["name"]] = r["value"]
        node.ctime = r["t"]
        node.version += 1

    def _op_rmxattr(self, r: dict) -> None:
        node = self.inodes[r["ino"]]
        node.xattrs.pop(r["name"], None)
        node.ctime = r["t"]
        node.version += 1

    def _op_written(self, r: dict) -> None:
        """A file written through a handle was closed or fsync'ed: an event, no change."""

    def _op_lock(self, r: dict) -> None:
        """A lock was acquired, released or revoked: an event, no change."""

    def _op_compact(self, r: dict) -> list[Slice]:
        """Swap in compacted slices if the chunk is exactly as the compactor read it."""
        node = self.inodes.get(r["ino"])
        new = [Slice.from_tuple(t) for t in r["new"]]
        cur = node.chunks.get(r["chunk"], []) if node is not None else None
        if cur is None or len(cur) != r["n"] or chunk_digest(cur) != r["digest"]:
            return new  # the chunk changed underneath: the compaction is void, its blocks are garbage
        drop = {tuple(t) for t in r["drop"]}
        kept = [s for s in cur if s.to_tuple() not in drop]
        node.chunks[r["chunk"]] = kept + new
        return [s for s in cur if s.to_tuple() in drop]


def chunk_digest(slices: list[Slice]) -> str:
    """A digest of a chunk's slice list, so a compaction applies only to the list it read."""
    h = xxhash.xxh3_64()
    for s in slices:
        h.update(f"{s.sid}:{s.size}:{s.bsize}:{s.pos}:{s.off}:{s.len};".encode())
    return h.hexdigest()
