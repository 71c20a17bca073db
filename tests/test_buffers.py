"""AlignedPool: a buffer is reused only once nothing refers to it; big buffers sit on huge pages."""
import ctypes
import threading
from pathlib import Path

from backend.buffers import AlignedPool, anonymous


def _addr(buf) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def test_buffers_are_page_aligned_and_reused_only_when_free():
    pool = AlignedPool(8192, keep=2)
    a = pool.take(5000)
    assert len(a) == 8192 and _addr(a) % 4096 == 0
    view = memoryview(a)[:10]
    del a
    b = pool.take(100)
    assert b is not view.obj                 # the first is still seen through a view
    del view
    c = pool.take(100)
    assert c is not b and len(pool) == 2     # the freed first one, not a third
    d = pool.take(100)                       # both held: a one-off buffer, not kept
    assert d is not b and d is not c and len(pool) == 2
    big = pool.take(10_000)                  # larger than the pool's size: one-off
    assert len(big) >= 10_000 and len(pool) == 2


def test_threads_never_share_a_buffer_they_hold():
    pool = AlignedPool(4096, keep=8)
    errors = []

    def work(tag: int) -> None:
        for _ in range(2000):
            buf = pool.take(4096)
            view = memoryview(buf)
            del buf
            view[:8] = tag.to_bytes(8, "little")
            view[4088:] = tag.to_bytes(8, "little")
            if bytes(view[:8]) != bytes(view[4088:]) or int.from_bytes(view[:8], "little") != tag:
                errors.append(tag)
            view.release()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(pool) <= 8


def test_free_buffers_beyond_the_spare_ones_are_unmapped():
    pool = AlignedPool(4096, keep=10, spare=2)
    held = [pool.take(4096) for _ in range(6)]
    assert len(pool) == 6
    held.clear()                             # a cache let go of everything at once
    b = pool.take(4096)
    assert len(pool) == 3 and b in pool._bufs   # the one handed out plus two spare
    again = pool.take(4096)
    assert again is not b and len(pool) == 3


def _vma_flags(addr: int) -> set[str]:
    """The VmFlags of this process's mapping that contains `addr`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {addr:#x}")


def test_big_buffers_ask_for_huge_pages_and_their_tail_does_not():
    n = (4 << 20) + 4096                     # a 4 MiB block object plus its header, page-padded
    buf = anonymous(n, populate=True)
    assert len(buf) >= n
    addr = _addr(buf)
    assert addr % 4096 == 0
    buf[n - 8:n] = b"lastpage"
    buf[:8] = b"firstpgs"
    assert buf[:8] == b"firstpgs" and buf[n - 8:n] == b"lastpage"
    if not Path("/sys/kernel/mm/transparent_hugepage").exists():
        return                                # a kernel without THP: plain pages, checked above
    huge = 2 << 20
    first = -(-addr // huge) * huge           # the first whole huge page inside the buffer
    end = first + (addr + n - first) // huge * huge
    assert end > first
    # Whether the kernel then finds free huge pages is its business (fragmentation, defrag
    # settings, cgroup limits); what the buffer asks for is checked here.
    assert "hg" in _vma_flags(first) and "nh" not in _vma_flags(first)
    assert "nh" in _vma_flags(end)            # the 4 KiB past them must not take a huge page
