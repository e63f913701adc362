"""Type stubs of shmrelay_worker (the module is built from src/*.rs)."""

from typing import Callable, Protocol, Union

__version__: str

Data = Union[bytes, bytearray, memoryview, str]

class WorkerError(Exception):
    """The worker could not start (not started by shmrelay) or a front corrupted a ring."""

class SendError(Exception):
    """A reply, push or close could not be queued."""

class Out:
    """Replies, pushes and closes; usable only during a callback, on the worker's thread."""

    @property
    def codec(self) -> str: ...
    def send(self, conn: int, data: Data) -> None: ...
    def push(self, conn: int, data: Data) -> None: ...
    def close(self, conn: int) -> None: ...

class _Handler(Protocol):
    """What `Worker.run` calls; `on_open` and `on_close` are optional."""

    def on_frame(self, conn: int, frame: memoryview, redelivered: bool) -> None: ...

class Worker:
    @staticmethod
    def from_env() -> "Worker": ...
    @property
    def out(self) -> Out: ...
    @property
    def index(self) -> int: ...
    @property
    def codec(self) -> str: ...
    def run(self, handler: Union[_Handler, Callable[[int, memoryview, bool], None]]) -> None: ...
