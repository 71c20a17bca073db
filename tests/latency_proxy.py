"""A TCP proxy that delays every byte by a fixed latency (without limiting throughput).

Run as a process: `python -m tests.latency_proxy LISTEN_PORT TARGET_PORT DELAY_S` (loopback only).
It prints "ready" once listening. Bytes from the client reach the target `DELAY_S` after they
arrived; replies come back undelayed, so each request/response pays the delay once.
"""
from __future__ import annotations

import sys

import trio


_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def _pump(src: trio.SocketStream, dst: trio.SocketStream, delay: float) -> None:
    send, recv = trio.open_memory_channel(1 << 16)

    async def reader() -> None:
        async with send:
            while True:
                try:
                    data = await src.receive_some(1 << 16)
                except _GONE:
                    return
                if not data:
                    return
                await send.send((trio.current_time() + delay, data))

    async def writer() -> None:
        try:
            async with recv:
                async for due, data in recv:
                    await trio.sleep_until(due)
                    await dst.send_all(data)
            await dst.send_eof()
        except _GONE:
            pass

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        n.start_soon(writer)


async def _handle(client: trio.SocketStream, target_port: int, delay: float) -> None:
    try:
        upstream = await trio.open_tcp_stream("127.0.0.1", target_port)
    except OSError:
        await client.aclose()
        return
    try:
        async with trio.open_nursery() as n:
            n.start_soon(_pump, client, upstream, delay)
            n.start_soon(_pump, upstream, client, 0.0)
    finally:
        await client.aclose()
        await upstream.aclose()


async def main(listen_port: int, target_port: int, delay: float) -> None:
    listeners = await trio.open_tcp_listeners(listen_port, host="127.0.0.1")
    print("ready", flush=True)

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, target_port, delay)

    await trio.serve_listeners(handler, listeners)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
