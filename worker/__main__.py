"""python -m worker worker_<uuid> [--dir BASE] [--host H] [--port P] [--control-fd N]
[--listen-fd N] [--quarantine JSON] [--debug]"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker", description="Run one fn-supervise worker.")
    ap.add_argument("worker", help="worker_<uuid> (or the bare uuid)")
    ap.add_argument("--dir", help="FuncNodes config folder (default $FUNCNODES_CONFIG_DIR or ~/.funcnodes)")
    ap.add_argument("--host", help="bind address (default: config host, else 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port (default: config port, else a free one from 9382)")
    ap.add_argument("--control-fd", type=int, help="inherited socket of the supervisor channel")
    ap.add_argument("--listen-fd", type=int, help="inherited listening socket to serve on (the supervisor's)")
    ap.add_argument("--quarantine", metavar="JSON", help='nodes never to run: {"<node id>": "<reason>"}')
    ap.add_argument("--debug", action="store_true", help="full tracebacks in error replies")
    args = ap.parse_args(argv)
    from .deferred import deferred_ca_certificates, defer

    defer("pytest")  # before funcnodes_core (worker/deferred.py); a no-op in a worker forked after preload

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from . import listener, quarantine
    from .config import ConfigError, parse_worker_name

    try:
        quarantined = quarantine.parse_arg(args.quarantine)
        if args.listen_fd is not None:
            listener.adopt(args.listen_fd)
        uid = parse_worker_name(args.worker)
        with deferred_ca_certificates():  # aiohttp's client contexts (worker/deferred.py); no thread yet
            from .runtime import WorkerRuntime

        rt = WorkerRuntime(uid, base=args.dir, host=args.host, port=args.port, control_fd=args.control_fd, debug=args.debug,
                           quarantined=quarantined)
    except (ConfigError, ValueError, OSError) as e:
        print(f"fn-supervise worker: {e}", file=sys.stderr)
        return 3
    from .wakeup import new_loop

    # A loop whose cross-thread hand-offs wake it only when it sleeps (worker/wakeup.py).
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(rt.run())


if __name__ == "__main__":
    sys.exit(main())
