"""A write-heavy workload for the crash test, run as its own process.

Writes files whose content is a pure function of their name, using three
patterns (write+close, write+fsync, write-to-temp+rename), appends, and
deletes; after each operation returns it appends an acknowledgement line to
a log outside the mount and fsyncs it. Runs until killed or the mount fails.
"""
import hashlib
import os
import random
import sys

from backend.local import fsync_dir


def content(name: str, size: int) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    rnd = random.Random(seed)
    if size > 256 << 10:
        # Mostly compressible with random islands: exercises both codecs.
        return (rnd.randbytes(4096) + bytes(60000)) * (size // 64096) + rnd.randbytes(size % 64096)
    return rnd.randbytes(size)


def main(root: str, ack_path: str, seed: int) -> None:
    rnd = random.Random(seed)
    ack = open(ack_path, "a", buffering=1)

    def acked(line: str) -> None:
        ack.write(line + "\n")
        ack.flush()
        os.fsync(ack.fileno())

    i = 0
    while True:
        i += 1
        name = f"f{seed}-{i}"
        size = rnd.choice([0, 10, 4096, 70000, 1 << 20, 3 << 20 | 123])
        data = content(name, size)
        kind = rnd.choice(["close", "fsync", "rename", "append"])
        path = os.path.join(root, name)
        if kind == "rename":
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.rename(tmp, path)
            fsync_dir(root)  # a rename is durable once its directory is fsync'ed, as on ext4
        elif kind == "append":
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            with open(path, "ab") as f:
                f.write(data[len(data) // 2:])
        else:
            with open(path, "wb") as f:
                f.write(data)
                if kind == "fsync":
                    f.flush()
                    os.fsync(f.fileno())
        acked(f"W {name} {size}")
        if i % 7 == 0:
            victim = f"f{seed}-{i - 3}"
            acked(f"d {victim}")  # intent: in flight at a crash, either outcome is correct
            os.unlink(os.path.join(root, victim))
            fsync_dir(root)
            acked(f"D {victim}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
