"""A status line kept at the bottom of a terminal while the program prints above it.

While it is open, ``sys.stdout``, ``sys.stderr`` and the logging handlers that wrote to them go
through a proxy that erases the line, writes the text, and redraws the line once the text ends a
line, so a printed or logged line never shares a row with it. (tqdm's ``write`` clears its bars only
when both streams are the process's current ``sys.stdout``/``sys.stderr``, which its own
redirection replaces, and it leaves logging handlers alone: printed text landed on the bar's row.)
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
from typing import TextIO

CLEAR = "\r\x1b[K"  # back to column 0, erase to the end of the row


class StatusLine:
    """One line drawn on ``terminal`` (default: stderr), truncated to the terminal's width so it
    never wraps; ``close()`` erases it and gives the streams back."""

    def __init__(self, terminal: TextIO | None = None):
        self.terminal = terminal or sys.stderr
        self.text = ""
        self._shown = False
        self._midline = False  # text written without its newline yet: the cursor is mid-row
        self._lock = threading.RLock()
        self._streams: tuple[TextIO, TextIO] | None = None
        self._handlers: list[tuple[logging.StreamHandler, TextIO]] = []

    def open(self) -> StatusLine:
        """Route stdout, stderr and logging's console handlers through the line."""
        if self._streams is None:
            self._streams = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = (_Proxy(self, stream) for stream in self._streams)
            for handler in _stream_handlers():
                for original, proxy in zip(self._streams, (sys.stdout, sys.stderr), strict=True):
                    if handler.stream is original:
                        self._handlers.append((handler, handler.setStream(proxy)))
        return self

    def update(self, text: str) -> None:
        with self._lock:
            self.text = text
            if not self._midline:
                self._draw()

    def close(self) -> None:
        """Erase the line and put stdout, stderr and the logging handlers back."""
        with self._lock:
            self._erase()
            if self._streams is not None:
                sys.stdout, sys.stderr = self._streams
                for handler, original in self._handlers:
                    handler.setStream(original)
                self._streams, self._handlers = None, []

    def write_above(self, stream: TextIO, text: str) -> int:
        """Write ``text`` to ``stream`` on the rows above the line."""
        with self._lock:
            if not text:
                return 0
            if not is_terminal(stream):
                return stream.write(text)
            self._erase()
            written = stream.write(text)
            stream.flush()
            self._midline = not text.endswith("\n")
            if not self._midline:
                self._draw()
            return written

    def _draw(self) -> None:
        if not self.text:
            return
        width = shutil.get_terminal_size(fallback=(120, 24)).columns
        self.terminal.write(CLEAR + self.text[: max(1, width - 1)])
        self.terminal.flush()
        self._shown = True

    def _erase(self) -> None:
        if self._shown:
            self.terminal.write(CLEAR)
            self.terminal.flush()
            self._shown = False


class _Proxy:
    """A text stream that writes through a ``StatusLine`` to the stream it replaces."""

    def __init__(self, line: StatusLine, stream: TextIO):
        self.line, self.stream = line, stream

    def write(self, text: str) -> int:
        return self.line.write_above(self.stream, text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _stream_handlers() -> list[logging.StreamHandler]:
    """Every StreamHandler of the root logger and of named loggers (file handlers excluded)."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    handlers = []
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handlers.append(handler)
    return handlers
