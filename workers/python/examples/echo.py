"""Echo worker: every frame back to its sender.

    shmrelay --worker-cmd "/path/to/venv/bin/python workers/python/examples/echo.py"
"""

import shmrelay_worker


class Echo:
    def __init__(self, out):
        self.out = out

    def on_frame(self, conn, frame, redelivered):
        # `frame` is a read-only memoryview over the request ring, valid during this call:
        # sending it copies it into the reply ring. Keep bytes(frame) to hold on to it.
        self.out.send(conn, frame)


def main():
    worker = shmrelay_worker.Worker.from_env()
    worker.run(Echo(worker.out))  # returns on SIGTERM / SIGINT


if __name__ == "__main__":
    main()
