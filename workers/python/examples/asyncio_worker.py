"""A worker inside an asyncio program: the relay's frames are served from the program's own
event loop (the worker's doorbell with loop.add_reader), between its other tasks. Here the
other task is a clock ticking every 10 ms; the frame `ticks` is answered with the count so
far, any other frame is echoed.

    shmrelay --worker-cmd "/path/to/venv/bin/python workers/python/examples/asyncio_worker.py"
"""

import asyncio
import signal

import shmrelay_worker


class Handler:
    def __init__(self, out):
        self.out = out
        self.ticks = 0

    def on_frame(self, conn, frame, redelivered):
        if frame == b"ticks":
            self.out.send(conn, b"%d" % self.ticks)
        else:
            self.out.send(conn, frame)


def serve(worker, handler, loop):
    """Serves the worker's events from `loop`, one batch per turn of the loop."""

    def ready():
        worker.finish_wait()  # awake: take back the sleep announcement
        if worker.poll_once(handler) or not worker.prepare_wait():
            loop.call_soon(ready)  # more may be waiting: go on after the loop's other work
        # else: announced sleep; the next frame makes worker.fileno() readable

    loop.add_reader(worker.fileno(), ready)
    ready()


async def main():
    worker = shmrelay_worker.Worker.from_env()
    handler = Handler(worker.out)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serve(worker, handler, loop)

    async def clock():
        while True:
            await asyncio.sleep(0.01)
            handler.ticks += 1

    ticking = asyncio.create_task(clock())
    await stop.wait()  # SIGTERM: stop serving, exit 0
    ticking.cancel()
    loop.remove_reader(worker.fileno())


if __name__ == "__main__":
    asyncio.run(main())
