"""Paths of inodes in one workspace's namespace, kept current record by record.

The namespace state maps (parent, name) -> inode; events need the reverse. `PathIndex`
keeps one name per inode (any one, for hard links) and answers `path(ino)` by walking up
to the root: O(depth). It is built once from the state (O(inodes)) and then updated by
`moved`/`added`/`dropped` as records apply, on the leader only.
"""
from __future__ import annotations

from agentmount.meta.state import ROOT_INO, NamespaceState


class PathIndex:
    """ino -> (parent, name) for every linked inode of `state`."""

    def __init__(self, state: NamespaceState) -> None:
        self.state = state
        self.names: dict[int, tuple[int, bytes]] = {}
        for parent, entries in state.dirs.items():
            for name, ino in entries.items():
                self.names.setdefault(ino, (parent, name))

    def path(self, ino: int) -> str:
        """'/a/b' relative to the workspace root ('/' for the root); '' if unknown."""
        if ino == ROOT_INO:
            return "/"
        parts: list[bytes] = []
        cur = ino
        for _ in range(4096):
            if cur == ROOT_INO:
                return "/" + "/".join(p.decode(errors="replace") for p in reversed(parts))
            where = self.names.get(cur)
            if where is None:
                return ""
            parts.append(where[1])
            cur = where[0]
        return ""

    def child_path(self, parent: int, name: bytes) -> str:
        base = self.path(parent)
        n = name.decode(errors="replace")
        return "/" + n if base == "/" else f"{base}/{n}"

    def added(self, ino: int, parent: int, name: bytes) -> None:
        self.names.setdefault(ino, (parent, name))

    def dropped(self, ino: int, parent: int, name: bytes) -> None:
        """Entry (parent, name) of `ino` is gone; keep another name of it if it has one."""
        if self.names.get(ino) != (parent, name):
            return
        del self.names[ino]
        node = self.state.inodes.get(ino)
        if node is not None and node.nlink > 0 and not node.is_dir:
            for p, entries in self.state.dirs.items():     # rare: a hard link's tracked name went
                for n, i in entries.items():
                    if i == ino:
                        self.names[ino] = (p, n)
                        return

    def moved(self, ino: int, parent: int, name: bytes) -> None:
        self.names[ino] = (parent, name)
