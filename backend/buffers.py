"""Page-aligned read buffers that are reused instead of reallocated.

A cold sequential read fetches one 4 MiB object after another. Reading each into a
fresh allocation costs a round of page faults (zeroing, memory-cgroup charging) and,
for O_DIRECT, a copy out of an aligned bounce buffer; on two cores that was a quarter
of the daemon's CPU time. `AlignedPool` hands out page-aligned, already resident
buffers and takes one back as soon as nothing refers to it any more.

Invariant: a buffer is handed out again only when the pool holds the sole reference
to it (CPython reference counts), so every memoryview, slice or cache entry made from
an earlier read keeps its bytes until it is gone.

Buffers of 2 MiB and more are backed by transparent huge pages where the kernel offers
them (`madvise` mode is enough). An O_DIRECT request is split at the device's segment
limit, one segment per physically contiguous run: 4 MiB of 4 KiB pages is 1,024
segments and several requests, 4 MiB of huge pages is two segments and one request.
Measured here: direct 4 MiB reads 1.3 -> 3.1 GB/s.
"""
from __future__ import annotations

import ctypes
import mmap
import sys
import threading

# References a free buffer has while `take` inspects it: the pool's list and
# getrefcount's own argument.
_FREE_REFS = 2
_PAGE = mmap.PAGESIZE
_HUGE = 2 << 20
_MADV_POPULATE_WRITE = 23  # Linux 5.14; not in the mmap module of every Python


def anonymous(n: int, populate: bool = False) -> mmap.mmap:
    """At least `n` bytes of private anonymous memory, page-aligned (shared anonymous memory is
    shmem: slower to pin for O_DIRECT); huge-page backed from 2 MiB on (module docstring).
    `populate`: fault the first `n` bytes in now."""
    if n < _HUGE:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (mmap.MAP_POPULATE if populate else 0)
        return mmap.mmap(-1, n, flags=flags)
    # A mapping sized in whole huge pages starts on a huge-page boundary (Linux >= 6.7);
    # elsewhere only the aligned part inside it gets huge pages.
    m = mmap.mmap(-1, -(-n // _HUGE) * _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    _advise_huge(m, n)
    if populate:
        _populate(m, n)
    return m


def _advise_huge(m: mmap.mmap, n: int) -> None:
    ref = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(ref)
    del ref  # releases the buffer export (an exported mmap cannot be closed)
    start = -addr % _HUGE
    end = start + max(0, n - start) // _HUGE * _HUGE
    try:
        if end > start:
            m.madvise(mmap.MADV_HUGEPAGE, start, end - start)
        if len(m) > end:
            # The few bytes past the last whole huge page must not take a huge page of their own.
            m.madvise(mmap.MADV_NOHUGEPAGE, end, len(m) - end)
    except (OSError, AttributeError):  # no THP in this kernel: plain pages
        pass


def _populate(m: mmap.mmap, n: int) -> None:
    try:
        m.madvise(_MADV_POPULATE_WRITE, 0, -(-n // _PAGE) * _PAGE)
    except OSError:  # older kernel: touch every page
        for off in range(0, n, _PAGE):
            m[off] = 0


class AlignedPool:
    """At most `keep` resident buffers of `size` bytes each, page-aligned, thread-safe.

    `take(n)` returns a buffer of at least `n` bytes: a free pooled one, a new pooled one
    while fewer than `keep` exist, else a one-off allocation. Beyond `spare` free buffers
    (say, after a cache let go of many blocks at once) the extras are unmapped at the next
    `take`, so idle buffers do not hold memory nobody uses.
    """

    def __init__(self, size: int, keep: int, spare: int = 8) -> None:
        self.size = size
        self.keep = keep
        self.spare = spare
        self._bufs: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> mmap.mmap:
        if n > self.size:
            return anonymous(n)
        with self._lock:
            bufs = self._bufs
            free = [i for i in range(len(bufs)) if sys.getrefcount(bufs[i]) == _FREE_REFS]
            if free:
                b = bufs[free[0]]
                extra = free[1 + self.spare:]
                if extra:
                    for i in extra:
                        bufs[i].close()
                    drop = set(extra)
                    self._bufs = [x for i, x in enumerate(bufs) if i not in drop]
                return b
            b = anonymous(self.size, populate=True)
            if len(bufs) < self.keep:
                bufs.append(b)
            return b

    def __len__(self) -> int:
        return len(self._bufs)
