"""zoft's messages: one `zoft` logger writing plain lines to stderr.

A library user silences them the standard way, ``logging.getLogger("zoft").setLevel(logging.WARNING)``;
progress bars stay on stderr through tqdm; the one-line errors are the CLI's (zoft.cli).
"""

from __future__ import annotations

import logging
import sys


class _Stderr(logging.Handler):
    """Writes to whatever sys.stderr is when a record arrives (a handler bound to the stream at import
    would miss a redirect, e.g. a notebook's or a test's)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


LOGGER = logging.getLogger("zoft")
if not LOGGER.handlers:
    LOGGER.addHandler(_Stderr())
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False  # zoft's lines once, whatever the host application's root logger does


def log(msg: str) -> None:
    """A progress or status line on stderr, through the `zoft` logger: a library user silences it with
    logging.getLogger("zoft").setLevel(logging.WARNING). Progress bars stay on stderr through tqdm."""
    LOGGER.info(msg)
