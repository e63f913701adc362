"""Chat worker: a connection's first frame names the room it joins (the worker answers with
the room's name); each later frame is pushed to every other connection in that room.

    shmrelay --workers 1 --worker-cmd "/path/to/venv/bin/python workers/python/examples/chat.py"

Rooms live in this worker process: run one worker (or route by room) so that the members of a
room meet in one process.
"""

import shmrelay_worker


class Chat:
    def __init__(self, out):
        self.out = out
        self.room_of = {}  # conn -> room name (bytes)
        self.members = {}  # room name -> set of conns

    def on_frame(self, conn, frame, redelivered):
        room = self.room_of.get(conn)
        if room is None:
            room = bytes(frame)  # a copy: the frame is only valid during this call
            self.room_of[conn] = room
            self.members.setdefault(room, set()).add(conn)
            self.out.send(conn, room)
            return
        for other in self.members[room]:
            if other != conn:
                self.out.push(other, frame)

    def on_close(self, conn, reason):
        room = self.room_of.pop(conn, None)
        if room is not None:
            members = self.members[room]
            members.discard(conn)
            if not members:
                del self.members[room]


def main():
    worker = shmrelay_worker.Worker.from_env()
    worker.run(Chat(worker.out))


if __name__ == "__main__":
    main()
