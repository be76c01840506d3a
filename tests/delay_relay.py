"""A UDP relay that delays every datagram by a fixed time: the lab's stand-in for netem delay
(this kernel has no sch_netem). Run in the LB's namespace on an extra address; servers publish
to that address, the relay forwards each datagram to the LB agent `--delay-ms` later (order
kept, no loss). Counts go to stderr on exit.

    python tests/delay_relay.py --listen 10.103.0.201:7390 --to 10.103.0.1:7390 --delay-ms 200
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys


class Relay(asyncio.DatagramProtocol):
    def __init__(self, target: tuple[str, int], delay_s: float) -> None:
        self.target = target
        self.delay_s = delay_s
        self.out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.relayed = 0

    def datagram_received(self, data: bytes, addr) -> None:
        asyncio.get_running_loop().call_later(self.delay_s, self._forward, data)

    def _forward(self, data: bytes) -> None:
        try:
            self.out.sendto(data, self.target)
            self.relayed += 1
        except OSError:
            pass


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main_async(listen: tuple[str, int], target: tuple[str, int], delay_s: float) -> int:
    loop = asyncio.get_running_loop()
    transport, relay = await loop.create_datagram_endpoint(lambda: Relay(target, delay_s),
                                                           local_addr=listen)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    transport.close()
    print(f"relayed {relay.relayed}", file=sys.stderr, flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="ADDRESS:PORT to receive on")
    parser.add_argument("--to", required=True, help="ADDRESS:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, required=True)
    args = parser.parse_args()
    return asyncio.run(main_async(_address(args.listen), _address(args.to), args.delay_ms / 1e3))


if __name__ == "__main__":
    sys.exit(main())
