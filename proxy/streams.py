"""Streaming a response while listening for the client to leave (like Starlette's
StreamingResponse): a client that goes away stops the work done for it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
from starlette.types import Receive


async def until_disconnect(receive: Receive, work: Callable[[], Awaitable[None]]) -> None:
    """Run `work` until it ends or the client disconnects, whichever comes first."""
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            await work()
            tg.cancel_scope.cancel()

        tg.start_soon(run)
        while (await receive())["type"] != "http.disconnect":
            pass
        tg.cancel_scope.cancel()
