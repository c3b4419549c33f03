"""fn-supervise supervisor: creates, starts, watches and restarts FuncNodes workers.

Decisions live apart from I/O:
  policy.py   restart policy (backoff, crash budgets)           pure, fake-clock tested
  states.py   the supervisor state machine                       pure
  health.py   heartbeat / hang detection                         pure
  crash.py    crash records and exit classification             mostly pure
  config.py   the `supervisor` timers in the worker config       pure
  files.py    paths, .p/.runstate, the state file, the lock      file I/O
  process.py  spawning, log capture, staged stop                 process I/O
  runner.py   the one asyncio loop that ties them together
  cli.py      `fn-supervise`
"""
