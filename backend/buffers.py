"""Page-aligned read buffers that are reused instead of reallocated.

A cold sequential read fetches one 4 MiB object after another. Reading each into a
fresh allocation costs a round of page faults (zeroing, memory-cgroup charging) and,
for O_DIRECT, a copy out of an aligned bounce buffer; on two cores that was a quarter
of the daemon's CPU time. `AlignedPool` hands out page-aligned, already resident
buffers and takes one back as soon as nothing refers to it any more.

Invariant: a buffer is handed out again only when the pool holds the sole reference
to it (CPython reference counts), so every memoryview, slice or cache entry made from
an earlier read keeps its bytes until it is gone.
"""
from __future__ import annotations

import mmap
import sys
import threading

# References a free buffer has while `take` inspects it: the pool's list, the loop
# variable and getrefcount's own argument.
_FREE_REFS = 3


def anonymous(n: int, populate: bool = False) -> mmap.mmap:
    """`n` bytes of private anonymous memory, page-aligned (shared anonymous memory is shmem:
    slower to pin for O_DIRECT). `populate`: fault every page in now, in one call."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (mmap.MAP_POPULATE if populate else 0)
    return mmap.mmap(-1, n, flags=flags)


class AlignedPool:
    """At most `keep` resident buffers of `size` bytes each, page-aligned, thread-safe.

    `take(n)` returns a buffer of at least `n` bytes: a free pooled one, a new pooled one
    while fewer than `keep` exist, else a one-off allocation.
    """

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self._bufs: list[mmap.mmap] = []
        self._next = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> mmap.mmap:
        if n > self.size:
            return anonymous(n)
        with self._lock:
            bufs = self._bufs
            count = len(bufs)
            for i in range(count):
                j = (self._next + i) % count
                b = bufs[j]
                if sys.getrefcount(b) == _FREE_REFS:
                    self._next = j + 1
                    return b
            b = anonymous(self.size, populate=True)
            if count < self.keep:
                bufs.append(b)
            return b

    def __len__(self) -> int:
        return len(self._bufs)
