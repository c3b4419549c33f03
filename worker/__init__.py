"""fn-supervise worker: a FuncNodes NodeSpace behind the FuncNodes WebSocket/HTTP protocol.

Kept import-light: the supervisor imports `worker.channel` and `worker.fsutil` without
pulling in funcnodes-core or aiohttp.
"""
