"""The websocket hub: ComfyUI's `/ws?clientId=` protocol.

JSON frames are `{"type", "data"}`; latent previews are binary frames, a 4-byte big-endian
event type (1 = preview image) then a 4-byte big-endian image format (2 = PNG) then the image.
The worker thread hands messages over with `send_sync`; one publisher task on the event loop
sends them in the order they were produced, to the job's client (or to everyone when the job
named none), exactly like ComfyUI.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import uuid
from typing import Any, Callable

from aiohttp import WSMsgType, web

log = logging.getLogger(__name__)

PREVIEW_IMAGE = 1
PNG_FORMAT = 2


def preview_frame(png: bytes) -> bytes:
    return struct.pack(">II", PREVIEW_IMAGE, PNG_FORMAT) + png


def encode_png(image: Any) -> bytes:
    """PIL image -> PNG bytes (fast compression: previews are thrown away a second later)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class WebSocketHub:
    def __init__(self, status: Callable[[], dict[str, Any]], features: dict[str, Any]) -> None:
        self._status = status
        self._features = features
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self._queue: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._publisher: asyncio.Task | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._publisher = asyncio.create_task(self._publish())

    async def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
        for ws in list(self.sockets.values()):
            await ws.close()

    # --- sending -------------------------------------------------------------------------

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        """Thread-safe: queue a JSON message (or `bytes` for a binary frame) for `sid` / all."""
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (event, data, sid))
        except RuntimeError:  # the loop closed under us: the server is shutting down
            log.debug("dropped %s message: event loop closed", event)

    def queue_updated(self) -> None:
        self.send_sync("status", {"status": self._status()})

    async def _publish(self) -> None:
        while True:
            event, data, sid = await self._queue.get()
            await self.send(event, data, sid)

    async def send(self, event: str, data: Any, sid: str | None = None) -> None:
        targets = list(self.sockets.values()) if sid is None else [self.sockets[sid]] if sid in self.sockets else []
        for ws in targets:
            try:
                if isinstance(data, (bytes, bytearray)):
                    await ws.send_bytes(bytes(data))
                else:
                    await ws.send_str(json.dumps({"type": event, "data": data}))
            except (ConnectionError, RuntimeError) as exc:  # client went away mid-send
                log.debug("websocket send failed: %s", exc)

    # --- the /ws route ---------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30)
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        old = self.sockets.pop(sid, None)
        if old is not None:
            await old.close()
        self.sockets[sid] = ws
        try:
            await ws.send_str(json.dumps({"type": "status", "data": {"status": self._status(), "sid": sid}}))
            first = True
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    message = json.loads(msg.data)
                except json.JSONDecodeError:
                    log.debug("ignoring non-JSON websocket message from %s", sid)
                    continue
                # ComfyUI's negotiation: a first message of type feature_flags gets ours back.
                if first and isinstance(message, dict) and message.get("type") == "feature_flags":
                    await ws.send_str(json.dumps({"type": "feature_flags", "data": self._features}))
                first = False
        finally:
            if self.sockets.get(sid) is ws:
                del self.sockets[sid]
        return ws
