"""A lean RESP2 connection for the Redis broker's hot path: the pipelined (S)PUBLISH of
each loop turn and the pub/sub reader. Everything else (scripts, keys, presence, the
Cluster slot map) stays on redis-py.

Why not redis-py here: on this machine a redis-py pipeline of one PUBLISH costs about
165 µs of CPU and each pub/sub message read with `get_message` about 34 µs (docs/
benchmarks.md, "cluster"), which is most of a cross-instance hop at a paced 5,000
msg/s. Here a pipeline is one `transport.write` of bytes built in one join, and replies
and pushes are parsed in `data_received` with no await, task or future per reply.

Measured again with hiredis (2026-12-06, 2 vCPU, rounds alternating, docs/benchmarks.md
"redis-py with hiredis"): this class against the kindest use of redis-py 8.2 with
hiredis 3.5, the same broker code over redis-py's own Connection (commands written as
they are here, replies read by `read_response` through the hiredis parser in one reader
task; its high-level Pipeline and PubSub only add to that):
- `python -m bench cluster --targets hub-cluster --runs 3 --seconds 5`: 77,425 and
  77,663 msgs/s here, 72,846 and 61,521 with redis-py;
- `python -m bench latency --targets hub-cluster --runs 3 --seconds 5` (5,000 msg/s):
  p50 0.84 / 0.79 ms, p99 3.3 / 2.6 ms, hub CPU 0.72 / 0.64 here; p50 1.03 / 1.01 ms,
  p99 3.7 / 3.8 ms, hub CPU 0.84 / 0.83 with redis-py.
redis-py costs 17-30 % more hub CPU per relayed message across instances, so this stays.

Connection settings (host, port, credentials, TLS) are taken from a redis-py
connection pool, so `broker.url` means the same thing on both paths.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import SSLConnection

__all__ = ["RespConnection", "RespError", "command", "open_resp"]

CONNECT_TIMEOUT_S = 2.0
MAX_REPLY_BYTES = 512 * 1024 * 1024  # Redis' own proto-max-bulk-len default


class RespError(Exception):
    """An error reply (`-ERR ...`, `-MOVED ...`): the command failed, the connection
    is fine."""


class _Incomplete(Exception):
    """The buffer ends inside a reply: wait for more bytes."""


_CRLF = b"\r\n"


def command(*args: bytes | str | int) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n" % len(b))
        parts.append(b)
        parts.append(_CRLF)
    return b"".join(parts)


def _parse(buf: bytes | bytearray, pos: int) -> tuple[Any, int]:
    """One reply starting at `pos`: (value, position after it). Bulk strings come back
    as bytes, errors as RespError values (not raised)."""
    end = buf.find(_CRLF, pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        n = int(buf[pos + 1:end])
        if n < 0:
            return None, end + 2
        if n > MAX_REPLY_BYTES:
            raise ConnectionError(f"redis reply of {n} bytes exceeds {MAX_REPLY_BYTES}")
        start = end + 2
        stop = start + n
        if len(buf) < stop + 2:
            raise _Incomplete
        return bytes(buf[start:stop]), stop + 2
    if kind == 42 or kind == 62:  # * array, > push (RESP3; not asked for, accepted)
        n = int(buf[pos + 1:end])
        if n < 0:
            return None, end + 2
        pos = end + 2
        items = []
        for _ in range(n):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 58:  # : integer
        return int(buf[pos + 1:end]), end + 2
    if kind == 43:  # + simple string
        return bytes(buf[pos + 1:end]), end + 2
    if kind == 45:  # - error
        return RespError(buf[pos + 1:end].decode("utf-8", "replace")), end + 2
    raise ConnectionError(f"unexpected RESP type byte {bytes((kind,))!r} from redis")


class RespConnection(asyncio.Protocol):
    """Replies go, in order, to the pipelines waiting for them; with no pipeline
    waiting, a reply is a push (pub/sub messages and (un)subscribe confirmations) and
    goes to `on_push`. A pub/sub connection therefore asks nothing with a reply
    expected once it has subscribed (RESP2 sends its confirmations as pushes)."""

    def __init__(self, on_push: Callable[[Any], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.on_push = on_push
        self._buf = bytearray()
        # (replies wanted, replies so far, future of the list)
        self._waiting: deque[tuple[int, list[Any], asyncio.Future[list[Any]]]] = deque()
        self._loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self.last_rx = 0.0

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:  # a pipeline must not wait for a delayed ACK (Nagle)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                pass
        self.last_rx = self._loop.time()

    def data_received(self, data: bytes) -> None:
        # Usually a read ends on a reply boundary: parse it as it came, copying nothing.
        buf: bytes | bytearray
        if self._buf:
            buf = self._buf
            buf += data
        else:
            buf = data
        self.last_rx = self._loop.time()
        pos = 0
        size = len(buf)
        waiting = self._waiting
        try:
            while pos < size:
                try:
                    value, pos = _parse(buf, pos)
                except _Incomplete:
                    break
                if waiting:
                    want, got, fut = waiting[0]
                    got.append(value)
                    if len(got) == want:
                        waiting.popleft()
                        if not fut.done():
                            fut.set_result(got)
                elif self.on_push is not None:
                    self.on_push(value)
        except (ValueError, ConnectionError) as exc:
            self._fail(ConnectionError(f"bad reply from redis: {exc}"))
            return
        finally:
            if buf is data:
                if pos < len(data):
                    self._buf += data[pos:]
            elif pos:
                del self._buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"redis connection lost: {exc}" if exc
                                   else "redis connection closed"))

    # -- use ----------------------------------------------------------------------

    @property
    def open(self) -> bool:
        return not self.lost.done()

    def send(self, data: bytes, replies: int) -> asyncio.Future[list[Any]]:
        """Write `data` (`replies` commands, see `command`) at once; the future gets
        their replies in order (error replies as RespError values)."""
        fut: asyncio.Future[list[Any]] = self._loop.create_future()
        if not self.open or self.transport is None:
            fut.set_exception(ConnectionError("redis connection closed"))
            return fut
        self.transport.write(data)
        if replies:
            self._waiting.append((replies, [], fut))
        else:
            fut.set_result([])
        return fut

    def write(self, data: bytes) -> None:
        """Write commands whose answers are pushes (SUBSCRIBE and kin, PING once
        subscribed)."""
        if self.open and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # nothing of ours waits to be written
        self._fail(ConnectionError("redis connection closed"))

    def _fail(self, exc: Exception) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        while self._waiting:
            _, _, fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


async def open_resp(pool: Any, on_push: Callable[[Any], None] | None = None) -> RespConnection:
    """A connection to the server `pool` (a redis-py asyncio connection pool) points at,
    with its credentials and TLS settings; AUTH done. Raises ConnectionError (or
    OSError, TimeoutError) when Redis cannot be reached or refuses the credentials."""
    spec = pool.make_connection()  # never connected: only its settings are read
    ssl_ctx = spec.ssl_context.get() if isinstance(spec, SSLConnection) else None
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        _, conn = await loop.create_connection(
            lambda: RespConnection(on_push), spec.host, int(spec.port), ssl=ssl_ctx)
        if spec.password:
            args: list[bytes | str | int] = ["AUTH"]
            if spec.username:
                args.append(spec.username)
            args.append(spec.password)
            try:
                (reply,) = await conn.send(command(*args), 1)
            except BaseException:
                conn.close()
                raise
            if isinstance(reply, RespError):
                conn.close()
                raise ConnectionError(f"redis refused the credentials: {reply}")
    return conn
