"""WebSocket echo worker, for a `codec = "websocket"` listener: each message back with its kind
(text as text, binary as binary). Each client is greeted with what its handshake carried
(`out.upgrade` in `on_open`). The text message `close CODE REASON` closes the connection with
that close code and reason; a code an endpoint may not send is refused with a text message
saying why, and the connection goes on. `upgrade?` answers what `out.upgrade` is outside
`on_open` (None).

    shmrelay --set codec=websocket --workers 1 \
        --worker-cmd "/path/to/venv/bin/python workers/python/examples/ws_echo.py"

workers/ffi/examples/ws_echo.c is the same worker in C (the same test drives both).
"""

import shmrelay_worker


class WsEcho:
    def __init__(self, out):
        self.out = out

    def on_open(self, conn, peer):
        # (path, subprotocol, authorization, cookie) from the client's handshake; this is where
        # a worker would refuse a client: self.out.close_with(conn, 4003, "forbidden").
        upgrade = self.out.upgrade
        if upgrade is not None:
            greeting = "hello path=%s subprotocol=%s authorization=%s cookie=%s" % upgrade
            self.out.send_text(conn, greeting)

    def on_frame(self, conn, frame, redelivered):
        if self.out.message_kind == "binary":
            self.out.send_binary(conn, frame)
        elif frame[:6] == b"close ":
            code, _, reason = bytes(frame[6:]).decode().partition(" ")
            try:
                self.out.close_with(conn, int(code), reason)
            except (shmrelay_worker.SendError, ValueError, OverflowError) as e:
                # 1005, 1006, 1015, 999, 5000 (SendError), 70000 (OverflowError), "x"
                # (ValueError): nothing was queued, so answer why.
                self.out.send_text(conn, "close refused: %s: %s" % (type(e).__name__, e))
        elif frame == b"upgrade?":
            self.out.send_text(conn, repr(self.out.upgrade))
        else:
            # Text was checked to be UTF-8 by the relay: the frame goes back as it is.
            self.out.send_text(conn, frame)


if __name__ == "__main__":
    worker = shmrelay_worker.Worker.from_env()
    worker.run(WsEcho(worker.out))  # returns on SIGTERM / SIGINT
