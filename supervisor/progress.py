"""Progress for long work (venv creation, installs): an updating line on a terminal,
plain lines elsewhere (logs, systemd, CI)."""

from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._width = 0
        self._last = None

    def __call__(self, message: str, fraction: float | None = None) -> None:
        text = message if fraction is None else f"[{fraction * 100:3.0f}%] {message}"
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            if text == self._last:
                return
            self.stream.write(text + "\n")
        self._last = text
        self.stream.flush()

    def done(self, message: str | None = None) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        if message:
            self.stream.write(message + "\n")
        self.stream.flush()
