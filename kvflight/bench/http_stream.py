"""A lean HTTP/1.1 client for the serve benchmark's streamed POSTs to http:// servers: an asyncio protocol feeding
httptools' C parser, with a keep-alive connection pool.

Why not httpx for this: the benchmark client must cost little beside the server it measures. Each engine step
sends one SSE chunk to each of ~30 streams at once; httpx parses every chunk in pure Python (h11) and the client's
event loop reads them one after another, so the last stream's chunk (a new request's first token among them) was
read milliseconds late. Here a chunk costs one C parser call and one deque append. https:// URLs (TLS, proxies)
still go through httpx.
"""

from __future__ import annotations

import asyncio
import collections
import urllib.parse
from typing import Any, AsyncIterator


class HttpStreamError(Exception):
    """The connection failed or broke, or the response was not valid HTTP; `kind` says which
    ("connect", "broken", "protocol")."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Connection(asyncio.Protocol):
    """One TCP connection; one response at a time is read from it."""

    def __init__(self) -> None:
        import httptools

        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.keep_alive = False
        self.headers_done = False
        self.complete = False
        self.error: HttpStreamError | None = None
        self.lost = False

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        import httptools

        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HttpStreamError("protocol", f"the server's response is not valid HTTP/1.1: {exc}"))
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.complete:
            why = f": {exc}" if exc else ""
            self._fail(HttpStreamError("broken", f"the server closed the connection mid-response{why}"))
        self._wake()

    # -- httptools callbacks --
    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()  # (the parser answers this only until the message ends)
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True

    # -- reading --
    def _fail(self, error: HttpStreamError) -> None:
        if self.error is None:
            self.error = error

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def wait_headers(self) -> None:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self._wait()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (chunked transfer encoding already undone), until the message ends."""
        while True:
            while self._chunks:
                yield self._chunks.popleft()
            if self.complete:
                return
            if self.error is not None:
                raise self.error
            await self._wait()

    @property
    def reusable(self) -> bool:
        return self.complete and not self.lost and self.error is None and self.keep_alive

    def reset(self) -> None:
        import httptools

        self._parser = httptools.HttpResponseParser(self)
        self._chunks.clear()
        self.status = 0
        self.headers_done = self.complete = self.keep_alive = False

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class StreamResponse:
    """A response being read: `status`, then `aiter_bytes()` or `aread()`."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn

    @property
    def status_code(self) -> int:
        return self._conn.status

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        return self._conn.chunks()

    async def aread(self) -> bytes:
        return b"".join([c async for c in self._conn.chunks()])


class HttpStreamClient:
    """POSTs JSON bodies to one http:// server and streams the responses; idle connections are kept for reuse."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"base url {base_url!r}: the lean client speaks plain http://HOST[:PORT] only")
        self.host = url.hostname
        self.port = url.port or 80
        self.base_path = url.path.rstrip("/")
        host_header = self.host if url.port is None else f"{self.host}:{url.port}"
        self._fixed_headers = "".join(f"{k}: {v}\r\n" for k, v in
                                      {"Host": host_header, **(headers or {})}.items()).encode("latin-1")
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()

    async def _connect(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.lost:
                conn.reset()
                return conn
            self._open.discard(conn)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(_Connection, self.host, self.port)
        except OSError as exc:
            raise HttpStreamError("connect", f"cannot connect to {self.host}:{self.port}: {exc}") from None
        self._open.add(conn)
        return conn

    def stream_post(self, path: str, body: bytes) -> "_PostContext":
        """`async with client.stream_post("/v1/completions", json_bytes) as resp:` (path below the base url)."""
        return _PostContext(self, path, body)

    async def aclose(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()


class _PostContext:
    def __init__(self, client: HttpStreamClient, path: str, body: bytes) -> None:
        self._client = client
        self._path = path
        self._body = body
        self._conn: _Connection | None = None

    async def __aenter__(self) -> StreamResponse:
        client = self._client
        conn = self._conn = await client._connect()
        head = (f"POST {client.base_path}{self._path} HTTP/1.1\r\n").encode("latin-1") + client._fixed_headers + (
            f"Content-Type: application/json\r\nContent-Length: {len(self._body)}\r\n"
            "Accept: text/event-stream\r\n\r\n").encode("latin-1")
        assert conn.transport is not None
        conn.transport.write(head + self._body)
        await conn.wait_headers()
        return StreamResponse(conn)

    async def __aexit__(self, *exc: Any) -> None:
        conn = self._conn
        if conn is None:
            return
        if conn.reusable:
            self._client._idle.append(conn)
        else:  # read partway (cancelled, failed) or the server closes it: never reuse
            conn.close()
            self._client._open.discard(conn)
