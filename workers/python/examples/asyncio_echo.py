"""The baseline of the Python benchmark: an asyncio echo server speaking shmrelay's wire
protocol (each frame is a 4-byte big-endian length and that many bytes), with the
same per-frame work as echo.py (one Python call per frame) but doing its own networking.

    python3 workers/python/examples/asyncio_echo.py 127.0.0.1:9000
"""

import asyncio
import struct
import sys

HEADER = struct.Struct(">I")


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = bytearray()

    def data_received(self, data):
        buf = self.buf
        buf += data
        at = 0
        out = []
        while len(buf) - at >= 4:
            (n,) = HEADER.unpack_from(buf, at)
            if len(buf) - at - 4 < n:
                break
            frame = memoryview(buf)[at + 4 : at + 4 + n]
            out.append(handle(frame))
            frame.release()
            at += 4 + n
        if at:
            del buf[:at]
        if out:
            self.transport.write(b"".join(out))


def handle(frame):
    """The application's work for one frame: echo it back, framed."""
    return HEADER.pack(len(frame)) + frame


async def main(addr):
    host, port = addr.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, host, int(port), backlog=4096)
    print(f"listening on {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9000"))
    except KeyboardInterrupt:
        pass
