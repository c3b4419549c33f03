"""An external worker for <data>/local_scripts/: copy this file there and it shows up in
`list_local_workers` within a second; `start_local_worker {"worker_id": "ticker"}` runs it.

Written against fn-supervise's base class; classes derived from funcnodes-worker's
FuncNodesExternalWorker load too where that package is installed.
"""

import asyncio

from worker.external import ExternalWorker


class Ticker(ExternalWorker):
    NODECLASSID = "ticker"
    NAME = "Ticker"

    async def loop(self):
        # Count once a second; `config` is what update_external_worker sets.
        self.config["ticks"] = self.config.get("ticks", 0) + 1
        await asyncio.sleep(float(self.config.get("interval", 1.0)))
