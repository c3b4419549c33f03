"""fn-supervise supervisor: creates, starts, watches and restarts FuncNodes workers.

Decisions live apart from I/O (tests/test_layers.py keeps the imports pointing down):
  policy.py      restart policy (backoff, crash budgets, quarantine)   pure, fake-clock tested
  states.py      the supervisor state machine, with listeners          pure
  attempt.py     one worker start (deadlines, kill, exit meaning) and  pure, fake-clock tested
                 the typed events of the loop
  health.py      heartbeat / hang detection                            pure
  crash.py       crash records and exit classification                mostly pure
  config.py      the `supervisor` timers in the worker config          pure
  files.py       paths, .p/.runstate, the state file, the lock         file I/O
  statefile.py   deferred, coalesced writes of .runstate and the state file
  safemode.py    the quarantined nodes and lift requests               file I/O
  installs.py    installs a running worker asks for, update_on_startup
  process.py     spawning, log capture, staged stop                    process I/O
  launcher.py    fork server or spawn: the launching seam (LauncherPool for host mode)
  runner.py      Supervisor: the one asyncio loop; seams reaper=, launcher=, observers=;
                 verbs request_stop, request_restart, deliver, reap
  status.py      live status and its text (cli and hostctl)
  hostctl.py     the host's control socket: protocol and client
  hostmetrics.py Prometheus metrics of the host, an observer of each Supervisor
  host.py        Fleet (`fn-supervise host`): builds Supervisors, shares launchers and sidecars
  cli.py         `fn-supervise`
"""
