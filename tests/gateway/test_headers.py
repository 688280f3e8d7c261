"""Hop-by-hop headers (RFC 9110 §7.6.1) stop at olmd, in both directions; the rest pass.

Both ends are raw sockets: aiohttp's own client and server would hide or add some of
these headers, so what crosses each hop is read off the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from tests.helpers import free_port, running_olmd, settings_dict

MODEL = "llama3.1:8b"
# Hop-by-hop headers a client or a node may send, each with a value to look for.
HOP = {
    "Connection": "keep-alive, X-Hop-Named",
    "X-Hop-Named": "named-by-connection",
    "Proxy-Connection": "keep-alive",
    "Keep-Alive": "timeout=99",
    "TE": "trailers",
    "Trailer": "X-Checksum",
    "Upgrade": "example/1",
}
REQUEST_ONLY = {"Proxy-Authorization": "Basic c2VjcmV0OnNlY3JldA=="}
RESPONSE_ONLY = {"Proxy-Authenticate": 'Basic realm="node"'}
END_TO_END = {"X-End-To-End": "kept", "Cache-Control": "no-store"}


def head_lines(raw: bytes) -> dict[str, list[str]]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    out: dict[str, list[str]] = {}
    for line in head:
        name, _, value = line.partition(":")
        out.setdefault(name.strip().lower(), []).append(value.strip())
    return out


class RawNode:
    """A node speaking HTTP/1.1 by hand: it answers probes, records what the proxied
    request carried, and answers it with hop-by-hop headers of its own."""

    def __init__(self, *, chunked: bool) -> None:
        self.chunked = chunked
        self.seen: list[dict[str, list[str]]] = []
        self.port = free_port()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while True:
                    raw = await reader.readuntil(b"\r\n\r\n")
                    headers = head_lines(raw)
                    length = int(headers.get("content-length", ["0"])[0])
                    if length:
                        await reader.readexactly(length)
                    path = raw.split(b" ", 2)[1].decode()
                    writer.write(self.answer(path, headers))
                    await writer.drain()
        finally:
            writer.close()

    def answer(self, path: str, headers: dict[str, list[str]]) -> bytes:
        if path == "/api/version":
            return plain({"version": "0.12.0"})
        if path == "/api/tags":
            return plain({"models": [{"name": MODEL, "model": MODEL}]})
        if path == "/api/ps":
            return plain({"models": []})
        self.seen.append(headers)
        extra = "".join(f"{k}: {v}\r\n" for k, v in {**HOP, **RESPONSE_ONLY, **END_TO_END}.items())
        line = json.dumps({"model": MODEL, "response": "hi", "done": True}).encode() + b"\n"
        if not self.chunked:
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n{extra}"
            return f"{head}Content-Length: {len(line)}\r\n\r\n".encode() + line
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            f"{extra}"
            "Transfer-Encoding: chunked\r\n\r\n"
        )
        body = f"{len(line):x}\r\n".encode() + line + b"\r\n0\r\nX-Checksum: 1\r\n\r\n"
        return head.encode() + body


def plain(body: object) -> bytes:
    data = json.dumps(body).encode()
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )


@contextlib.asynccontextmanager
async def olmd_before(node: RawNode) -> AsyncIterator[int]:
    server = await asyncio.start_server(node.handle, "127.0.0.1", node.port)
    data = settings_dict([])
    data["services"]["ollama"]["nodes"] = [{"name": "raw", "host": "127.0.0.1", "port": node.port}]
    try:
        async with running_olmd(data) as olmd:
            assert olmd.port is not None
            yield olmd.port
    finally:
        server.close()
        await server.wait_closed()


async def raw_request(port: int, headers: dict[str, str]) -> bytes:
    body = json.dumps({"model": MODEL, "prompt": "hi"}).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"POST /api/generate HTTP/1.1\r\nHost: olmd\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{head}\r\n".encode()
            + body
        )
        await writer.drain()
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return raw + await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_hop_by_hop_request_headers_stop_at_olmd() -> None:
    node = RawNode(chunked=False)
    async with olmd_before(node) as port:
        raw = await raw_request(port, {**HOP, **REQUEST_ONLY, **END_TO_END})
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    [seen] = node.seen
    values = {v for vs in seen.values() for v in vs}
    leaked = [k for k, v in {**HOP, **REQUEST_ONLY}.items() if v in values]
    assert leaked == [], f"forwarded to the node: {leaked}"
    assert "x-hop-named" not in seen and "proxy-connection" not in seen
    for name, value in END_TO_END.items():
        assert seen[name.lower()] == [value]


async def test_hop_by_hop_response_headers_stop_at_olmd() -> None:
    for chunked in (False, True):
        node = RawNode(chunked=chunked)
        async with olmd_before(node) as port:
            raw = await raw_request(port, {})
        head = head_lines(raw)
        values = {v for vs in head.values() for v in vs}
        leaked = [k for k, v in {**HOP, **RESPONSE_ONLY}.items() if v in values]
        assert leaked == [], f"chunked={chunked}: sent to the client: {leaked}"
        for name in ("x-hop-named", "proxy-connection", "proxy-authenticate", "trailer", "te"):
            assert name not in head, (chunked, name)
        # olmd frames the answer itself, once.
        assert len(head.get("transfer-encoding", [])) + len(head.get("content-length", [])) == 1
        for name, value in END_TO_END.items():
            assert head[name.lower()] == [value], (chunked, head)
        assert b'"response": "hi"' in raw
