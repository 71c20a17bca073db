"""PieceBuffer (zero-copy write buffering) against a bytearray model; multi-part block encoding."""
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from agentmount.chunks import block
from agentmount.vfs.pieces import PieceBuffer, gather, nbytes

_ops = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(1, 300_000)),
    st.tuples(st.just("write"), st.floats(0, 1), st.integers(1, 300_000)),
    st.tuples(st.just("take"), st.integers(1, 400_000)),
    st.tuples(st.just("read"), st.floats(0, 1), st.integers(1, 100_000)),
), max_size=40)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_piece_buffer_matches_a_bytearray(ops):
    pb, model, taken, taken_model = PieceBuffer(), bytearray(), [], bytearray()
    for op in ops:
        if op[0] == "append":
            data = os.urandom(op[1])
            pb.append(memoryview(data))
            model += data
        elif op[0] == "write":
            rel = int(op[1] * len(model))
            data = os.urandom(op[2])
            overlap = pb.write_at(rel, memoryview(data))
            assert overlap == min(len(model) - rel, len(data))
            model[rel:rel + len(data)] = data
        elif op[0] == "take":
            parts = pb.take(op[1])
            n = min(op[1], len(model))
            assert nbytes(parts) == n
            taken.append((parts, bytes(model[:n])))
            del model[:n]
        else:
            rel = int(op[1] * len(model))
            assert pb.read(rel, op[2]) == bytes(model[rel:rel + op[2]])
        assert len(pb) == len(model) and bool(pb) == bool(model)
        assert pb.tobytes() == bytes(model)
    # Buffers handed out earlier never change, whatever happened to the buffer afterwards.
    for parts, want in taken:
        assert b"".join(parts) == want
        assert gather(parts, 3, 10) == want[3:13]


def test_big_appends_are_kept_by_reference():
    pb = PieceBuffer()
    data = os.urandom(1 << 20)
    pb.append(memoryview(data)[:512 << 10])
    pb.append(memoryview(data)[512 << 10:])
    parts = pb.take(1 << 20)
    assert all(isinstance(p, memoryview) and p.obj is data for p in parts)


def test_multi_part_blocks_encode_like_the_joined_bytes():
    text = b"agentmount " * 100_000
    rnd = os.urandom(1 << 20)
    for plain in (text, rnd, text[:1000]):
        parts = [memoryview(plain)[:333], plain[333:70_000], bytearray(plain[70_000:])]
        obj = block.encode(parts)
        assert bytes(block.decode(obj)) == plain
        assert block.checksum(parts) == block.checksum(plain)
        header, payload = block.encode_parts(parts)
        assert header + b"".join(payload) == obj
    # Incompressible data is stored raw: the payload is the very same buffers, not a copy.
    halves = [rnd[:1 << 19], rnd[1 << 19:]]
    header, payload = block.encode_parts(halves)
    assert payload[0] is halves[0] and payload[1] is halves[1]
