"""Error texts for clients: tracebacks without the server's layout. A leaf: imports nothing of ours."""

from __future__ import annotations

import re
import traceback
from pathlib import PurePosixPath

_PATH_RE = re.compile(r'File "([^"]+)"')


def clean_traceback(exc: BaseException, debug: bool) -> list[str]:
    tb = traceback.format_exception(exc)
    if debug:
        return tb

    def short(m: re.Match) -> str:
        p = m.group(1)
        if not p.startswith("/"):
            return m.group(0)
        parts = PurePosixPath(p).parts
        # Keep the package-relative tail: enough to read, no server layout.
        if "site-packages" in parts:
            parts = parts[parts.index("site-packages") + 1 :]
        else:
            parts = parts[-2:]
        return f'File "<server>/{"/".join(parts)}"'

    return [_PATH_RE.sub(short, line) for line in tb]
