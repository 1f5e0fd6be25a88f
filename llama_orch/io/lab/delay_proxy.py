"""Added latency without netem: a transparent TCP proxy that holds every chunk for a while.

It runs inside a lab host, behind an nftables ``redirect`` of that host's inbound TCP
(``Topology.redirect_inbound``): it reads each connection's original destination
(``SO_ORIGINAL_DST``), connects there itself, and relays both ways, each chunk delivered
``delay`` after it arrived, in order (a one-way delay on each direction; a round trip gains
twice it). It can also pace: each connection's chunks at least ``pace`` apart in each direction,
a slow link that still trickles (a stream's every token late, none missing). Both are off at
start; SIGUSR1 turns the delay on, SIGHUP the pacing, SIGUSR2 both off, so a fault is a signal
and no traffic from outside. A connection whose destination cannot be reached is closed.

    ip netns exec lo-gpu2 python -m llama_orch.io.lab.delay_proxy --port 9999 --delay-ms 200 --pace-ms 300
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import struct
import sys

from ..daemon import announce_until_signalled

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
CHUNK = 65536


class DelayProxy:
    def __init__(self, port: int, delay_s: float, pace_s: float) -> None:
        self.port = port
        self.configured_s = delay_s
        self.configured_pace_s = pace_s
        self.delay_s = 0.0
        self.pace_s = 0.0
        self.connections = 0

    def delay(self, on: bool) -> None:
        self.delay_s = self.configured_s if on else 0.0
        if not on:
            self.pace_s = 0.0
        print(f"delay {self.delay_s * 1000:.0f} ms each way, pacing {self.pace_s * 1000:.0f} ms", flush=True)

    def pace(self) -> None:
        self.pace_s = self.configured_pace_s
        print(f"pacing on: chunks {self.pace_s * 1000:.0f} ms apart per connection and direction", flush=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            host = socket.inet_ntoa(packed)
        except OSError:
            writer.close()
            return
        if port == self.port:  # not redirected: a connection to the proxy itself would loop
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        except (OSError, asyncio.TimeoutError):
            writer.close()
            return
        self.connections += 1
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Relay ``reader`` to ``writer``, each chunk due ``delay_s`` after it was read."""
        loop = asyncio.get_running_loop()
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await held.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # the delay being modelled, not a wait for anything
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        delivering = asyncio.ensure_future(deliver())
        last_due = 0.0
        try:
            while True:
                data = await reader.read(CHUNK)
                last_due = max(loop.time() + self.delay_s, last_due + self.pace_s)
                held.put_nowait((last_due, data))
                if not data:
                    break
            await delivering
        except (OSError, asyncio.CancelledError):
            delivering.cancel()
            raise


async def serve(port: int, delay_ms: float, pace_ms: float) -> None:
    proxy = DelayProxy(port, delay_ms / 1000, pace_ms / 1000)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, proxy.delay, True)
    loop.add_signal_handler(signal.SIGHUP, proxy.pace)
    loop.add_signal_handler(signal.SIGUSR2, proxy.delay, False)
    server = await asyncio.start_server(proxy.handle, "0.0.0.0", port)
    async with server:
        await announce_until_signalled(f"delay proxy on :{port} ({delay_ms:g} ms each way on SIGUSR1, chunks "
                                       f"{pace_ms:g} ms apart on SIGHUP, both off on SIGUSR2)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="delay-proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, required=True, help="added to each direction while on")
    p.add_argument("--pace-ms", type=float, default=300.0, help="least time between chunks while pacing (300)")
    args = p.parse_args(argv)
    if args.delay_ms < 0 or args.pace_ms < 0 or not 0 < args.port < 65536:
        print("delay-proxy: error: --delay-ms and --pace-ms must be >= 0 and --port 1-65535", file=sys.stderr)
        return 2
    asyncio.run(serve(args.port, args.delay_ms, args.pace_ms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
