"""Running the API: inside the worker's process (`tally up`) or alone (`tally api`)."""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any

import uvicorn
from fastapi import FastAPI
from mode import Service

from query_api.view_feed import ViewFeed


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The faust worker owns SIGINT/SIGTERM and stops this service in order.
        yield


class ApiService(Service):
    """uvicorn as a mode Service, so the faust worker starts and stops it with the rest."""

    def __init__(self, app: FastAPI, host: str, port: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = _QuietServer(config)

    @Service.task
    async def _serve(self) -> None:
        await self.server.serve()

    async def on_stop(self) -> None:
        self.server.should_exit = True


class ViewFeedService(Service):
    """The API's usage view feed (query_api/view_feed.py) in `tally up`, whose uvicorn
    runs without a lifespan: loads the view, then follows `tally.rollups`."""

    def __init__(self, feed: ViewFeed, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.feed = feed

    @Service.task
    async def _follow(self) -> None:
        await self.feed.run()
