"""A base class for external workers defined in local scripts (<data>/local_scripts/*.py).

Same surface as funcnodes-worker's FuncNodesExternalWorker where it matters to clients:
a class-level NODECLASSID, instances with uuid/name/config, started and stopped by the worker.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar


class ExternalWorker:
    NODECLASSID: ClassVar[str] = ""
    NAME: ClassVar[str] = ""

    def __init__(self, workerid: str, name: str | None = None, config: dict | None = None, data_path=None):
        self.uuid = workerid
        self.name = name or self.NAME or type(self).__name__
        self.config: dict[str, Any] = dict(config or {})
        self.data_path = data_path
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def loop(self) -> None:
        """Override: the instance's background work, called repeatedly while running."""
        await asyncio.sleep(3600)

    async def _run(self) -> None:
        while True:
            await self.loop()
            await asyncio.sleep(0)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self, timeout: float = 5.0) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await asyncio.wait_for(self._task, timeout)
            except (asyncio.CancelledError, asyncio.TimeoutError, Exception):
                pass
            self._task = None

    def get_all_nodeclasses(self) -> list:
        """Override: node classes this instance offers; they appear in the library under
        `_external_worker/<instance uuid>` while it runs (as with the stock base class)."""
        return []

    def update_config(self, config: dict) -> None:
        self.config.update(config)

    def serialize(self) -> dict:
        return {"uuid": self.uuid, "nodeclassid": self.NODECLASSID, "running": self.running,
                "name": self.name, "config": self.config}
