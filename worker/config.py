"""Where a worker's files live and what its config holds.

`<base>` is `--dir`, else `$FUNCNODES_CONFIG_DIR`, else `~/.funcnodes`, as FuncNodes does.
The config is FuncNodes' `worker_<uuid>.json`; unknown keys are kept on every rewrite.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fsutil import atomic_write_json, read_json

WORKER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# Our knobs, beside the FuncNodes fields. Timers in seconds.
DEFAULTS: dict[str, Any] = {
    "nodespace_delay": 0.5,  # fallback sweep for requested triggers; execution itself is event-driven
    "save_delay": 0.2,  # debounce between a mutation and the write of nodespace.json
    "heartbeat_interval": 1.0,  # channel heartbeat to the supervisor
    "required_heartbeat": None,  # stop when no `heartbeat` command arrives in time
    "auth_token": None,
    "cors_origins": [],  # browser origins allowed besides loopback ones
    "max_upload_size": 1 << 30,
    "debug": False,
}


class ConfigError(ValueError):
    """The worker cannot start with this config (exit code 3)."""


def base_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("FUNCNODES_CONFIG_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return Path("~/.funcnodes").expanduser().resolve()


def parse_worker_name(name: str) -> str:
    """'worker_<uuid>' or '<uuid>' -> '<uuid>', refusing anything that could escape workers/."""
    uid = name[len("worker_") :] if name.startswith("worker_") else name
    if not WORKER_ID_RE.match(uid) or ".." in uid:
        raise ConfigError(f"not a worker id: {name!r}")
    return uid


@dataclass(frozen=True)
class WorkerPaths:
    base: Path
    uuid: str
    data: Path

    @classmethod
    def make(cls, base: Path, uuid: str, data_path: str | None = None) -> "WorkerPaths":
        workers = base / "workers"
        data = Path(data_path).expanduser() if data_path else workers / f"worker_{uuid}"
        return cls(base=base, uuid=uuid, data=data)

    @property
    def workers(self) -> Path:
        return self.base / "workers"

    @property
    def config(self) -> Path:
        return self.workers / f"worker_{self.uuid}.json"

    @property
    def pidfile(self) -> Path:
        return self.workers / f"worker_{self.uuid}.p"

    @property
    def runstate(self) -> Path:
        return self.workers / f"worker_{self.uuid}.runstate"

    @property
    def nodespace(self) -> Path:
        return self.data / "nodespace.json"

    @property
    def files(self) -> Path:
        return self.data / "files"

    @property
    def local_scripts(self) -> Path:
        return self.data / "local_scripts"


def default_config(uuid: str) -> dict[str, Any]:
    return {
        "type": "WSWorker",
        "uuid": uuid,
        "name": uuid,
        "data_path": None,
        "env_path": None,
        "worker_dependencies": {},
        "package_dependencies": {},
        "pid": os.getpid(),
        "autostart": "never",
        "update_on_startup": {"funcnodes": True, "funcnodes-core": True, "funcnodes-worker": True},
        "host": "127.0.0.1",
        "port": None,
        "ssl": False,
    }


def load_config(base: Path, uuid: str) -> dict[str, Any]:
    """Read the config (or a fresh default); a corrupt file is an error, never overwritten."""
    path = base / "workers" / f"worker_{uuid}.json"
    cfg = default_config(uuid)
    if path.exists():
        try:
            data = read_json(path)
        except (ValueError, OSError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); fix or remove it") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        if data.get("uuid") not in (None, uuid):
            raise ConfigError(f"{path} belongs to worker {data.get('uuid')!r}, not {uuid!r}")
        cfg.update(data)
    cfg["uuid"] = uuid
    for k, v in DEFAULTS.items():
        cfg.setdefault(k, v)
    deps = cfg.get("package_dependencies") or {}
    if isinstance(deps, list):  # legacy list form
        deps = {d["package"]: d for d in deps if isinstance(d, dict) and "package" in d}
    cfg["package_dependencies"] = deps
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> None:
    # 0600 like the stock worker: the config may hold an auth token.
    atomic_write_json(path, cfg, indent=2, mode=0o600)


def env_size(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def max_message_size() -> int:
    return env_size("FUNCNODES_WS_WORKER_MAX_SIZE", 1 << 20)


def max_data_size() -> int:
    return env_size("FUNCNODES_WS_WORKER_MAX_DATA_SIZE", 10 << 30)
